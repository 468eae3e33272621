"""The reply state machine (agent/reply.py) on plain calls: its request, its events, its voice."""

from __future__ import annotations

import pytest

from agent import events as ev
from agent.reply import Reply, ReplyError, Stage, TurnStamps, VoiceTurn


def preemptive(instruction: str | None = None) -> Reply:
    reply = Reply("s-t1", end=1.0)
    assert reply.stage is Stage.SPECULATIVE and reply.pending
    assert reply.preempt(instruction)
    return reply


def test_a_preemptive_answer_keeps_its_events_and_voice_until_its_turn_commits() -> None:
    reply = preemptive()
    assert reply.begin_voice() and reply.withheld  # made, not sent
    started, delta = ev.ResponseStarted(turn_id="s-t1"), ev.ResponseDelta(turn_id="s-t1", text="On.")
    assert not reply.admit(started) and not reply.admit(delta)
    assert reply.admit(ev.TurnCommitted(turn_id="s-t1", start=0.0, end=1.0, mode="chat"))  # the session's own
    assert not reply.writes_history  # nothing of it is the conversation's yet
    assert reply.promote(2.0) == [started, delta]  # in order, once
    assert reply.stage is Stage.COMMITTED and reply.writes_history and reply.committed_at == 2.0
    assert reply.voice is VoiceTurn.PLAYING and not reply.withheld
    assert reply.admit(ev.ResponseDone(turn_id="s-t1", text="On.", tokens=2, timings={}))
    reply.finish()
    assert reply.stage is Stage.FINISHED and not reply.drop()  # a finished reply cannot be dropped


def test_a_dropped_reply_is_never_seen() -> None:
    reply = preemptive()
    reply.admit(ev.ResponseStarted(turn_id="s-t1"))
    assert reply.drop() and reply.stage is Stage.DROPPED and reply.kept == []
    assert not reply.admit(ev.ResponseCancelled(turn_id="s-t1", reason="preempt_discarded"))  # its last breath
    assert not reply.drop()  # once
    with pytest.raises(ReplyError):
        reply.promote(1.0)
    speculative = Reply("s-t2", end=3.0)
    assert speculative.drop()  # a prefill only: the backend frees it


def test_a_commit_the_preemptive_answer_does_not_serve_withdraws_it() -> None:
    reply = preemptive(instruction=None)
    reply.begin_voice()
    assert reply.serves(None) and not reply.serves("What emotion?")  # a hook set an instruction
    reply.admit(ev.Error(code="busy", message="no room", turn_id="s-t1"))
    assert reply.failed and not reply.serves(None)  # refused: the commit asks again
    assert reply.withdraw() and reply.stage is Stage.SPECULATIVE and reply.kept == [] and not reply.failed
    assert reply.voice is VoiceTurn.SILENT and not reply.withdraw()
    reply.commit(5.0, TurnStamps(speech_end=4.0))
    assert reply.stage is Stage.COMMITTED and not reply.preempt(None)  # committed: no preemption any more
    with pytest.raises(ReplyError):
        reply.commit(6.0)


def test_a_tts_error_does_not_fail_the_preemptive_answer() -> None:
    reply = preemptive()
    reply.admit(ev.Error(code="tts_failed", message="espeak died", turn_id="s-t1"))
    assert not reply.failed and reply.serves(None)


def test_a_voice_begun_after_the_commit_is_not_withheld() -> None:
    """The preemptive start and the commit in one push: the answer's task begins its voice after
    the promotion, and it must play (issue 27's first bug)."""
    reply = preemptive()
    assert reply.promote(1.5) == []  # its task has not run yet: nothing kept
    assert not reply.begin_voice() and reply.voice is VoiceTurn.PLAYING


def test_its_voice_follows_the_player() -> None:
    reply = Reply.committed("s-t3", 1.0)
    reply.begin_voice()
    reply.observe(ev.ResponsePaused(turn_id="s-t3", t=2.0), 2.0)
    assert reply.voice is VoiceTurn.PAUSED
    reply.observe(ev.ResponseResumed(turn_id="s-t3", t=2.5, paused_s=0.5), 2.5)
    assert reply.voice is VoiceTurn.PLAYING
    reply.observe(ev.ResponseAudioDone(turn_id="s-t3", duration_s=1.0, spoken_text="Hi", interrupted=True), 3.0)
    assert reply.voice is VoiceTurn.INTERRUPTED
    reply.cancel("barge_in")
    reply.cancel("session_closed")
    assert reply.cancel_reason == "barge_in"  # the first reason is its reason


def test_stamps_count_from_the_end_of_speech() -> None:
    stamps = TurnStamps(speech_end=10.0, end_detected=10.05, commit=10.5)
    reply = Reply.committed("s-t4", 10.5, stamps)
    reply.observe(ev.ResponseDelta(turn_id="s-t4", text="Hi"), 10.6)
    reply.observe(ev.ResponseDelta(turn_id="s-t4", text=" there"), 10.7)  # only the first counts
    done = ev.ResponseDone(turn_id="s-t4", text="Hi there", tokens=2, timings={"total": 0.2})
    reply.observe(done, 10.8)
    assert done.timings == {"total": 0.2, "speech_end_at": 10.0, "speech_end_to_end_detected": 0.05,
                            "speech_end_to_commit": 0.5, "speech_end_to_first_token": 0.6}
    audio = ev.ResponseAudioStarted(turn_id="s-t4")
    reply.observe(audio, 11.0)
    assert audio.timings["speech_end_to_first_frame"] == 1.0
    # Before its turn commits, a reply stamps nothing (its events are stamped when they go out).
    early = preemptive()
    early.observe(ev.ResponseDelta(turn_id="s-t1", text="x"), 1.2)
    assert early.stamps.first_token is None
