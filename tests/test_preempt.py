"""Preemptive answers: the pure state machine, then through a session with the scripted
backend and real speech (espeak-ng), text and voice: a held answer is never seen when speech
resumes, and a commit publishes and plays it at once."""

from __future__ import annotations

import asyncio

import numpy as np

from agent import events as ev
from agent import turns
from agent.config import load_settings
from agent.inference.base import InferenceError
from agent.inference.scripted import ScriptedBackend
from agent.preempt import Discard, Preemption, Promote, Start
from agent.runtime import AgentRuntime
from agent.speech.base import TTSSettings

SR = 16000
ANSWER = "The kitchen light is on."


def silence(t: float) -> turns.SilenceBegan:
    return turns.SilenceBegan(t, 0.0, np.zeros(int(t * SR), np.float32))


def test_state_machine_starts_after_the_delay_and_keeps_one() -> None:
    p = Preemption(after_s=0.16)
    assert p.on_signal(silence(1.0)) is None
    assert p.tick(1.1) is None  # a breath is no end
    start = p.tick(1.16)
    assert isinstance(start, Start) and start.end == 1.0 and p.running
    assert p.tick(1.5) is None  # at most one
    assert isinstance(p.on_signal(turns.SpeechResumed(1.6)), Discard) and not p.running
    p.on_signal(silence(2.0))
    assert isinstance(p.tick(2.2), Start)
    committed = turns.TurnCommitted(0.0, 2.0, np.zeros(SR, np.float32))
    assert isinstance(p.on_signal(committed), Promote) and not p.running
    assert (p.started, p.promoted, p.discarded) == (2, 1, 1)


def test_state_machine_discards_on_another_commit_and_stays_off_when_told() -> None:
    p = Preemption(after_s=0.16)
    p.on_signal(silence(1.0))
    p.tick(1.2)
    split = turns.TurnCommitted(0.0, 1.0, np.zeros(SR, np.float32), split=True)
    assert isinstance(p.on_signal(split), Discard)  # cut at max_turn_s: not the turn preempted
    assert p.on_signal(turns.SpeechResumed(1.3)) is None  # nothing running: nothing to drop
    p.on_signal(silence(2.0), allowed=False)  # e.g. the agent is speaking
    assert p.tick(3.0) is None
    off = Preemption(after_s=0.16, enabled=False)
    off.on_signal(silence(1.0))
    assert off.tick(2.0) is None and off.cancel() is None


async def _runtime(backend: ScriptedBackend, preemptive: bool = True, tts: bool = False) -> AgentRuntime:
    # The fixed silence rule: these pauses are timed against it (the default end-of-turn policy
    # judges espeak's flat "turn on the" on its own; tests/test_end_of_turn.py covers that).
    settings = load_settings(None, model="tiny-random", turns={"preemptive": preemptive, "end_of_turn": "silence"},
                             tts=TTSSettings(engine="espeak") if tts else None)
    runtime = AgentRuntime(settings, backend=backend)
    await runtime.start()
    return runtime


async def _feed(session, samples: np.ndarray, piece: int = 2048) -> None:
    """In pieces, letting other tasks (the held answer) run between them, as live input does."""
    for i in range(0, samples.size, piece):
        await session.push_audio(samples[i : i + piece])
        await asyncio.sleep(0.005)


def _drain(sub) -> list:
    out = []
    while not sub.queue.empty():
        out.append(sub.queue.get_nowait())
    return out


async def _until(condition, what: str) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


RESPONSE_EVENTS = (ev.ResponseStarted, ev.ResponseDelta, ev.ResponseDone, ev.ResponseCancelled,
                   ev.ResponseAudioStarted, ev.ResponseAudioDone, ev.Error)


async def test_resumed_speech_drops_the_held_answer_and_its_voice_without_a_trace(make_speech_fixture) -> None:
    # A 0.4 s pause mid-sentence: long enough to start an answer, too short to end the turn.
    speech = make_speech_fixture([0.5, "turn on the", 0.4, "kitchen light", 1.0], "preempt-resume")
    backend = ScriptedBackend([ANSWER], chunk=4)
    runtime = await _runtime(backend, tts=True)
    session, sub = runtime.open_session(voice_output="live")
    voice = session.voice
    assert voice is not None
    pause_end = int(speech.segments[1][0] * SR)
    await _feed(session, speech.samples[: pause_end - 1600])  # into the pause: an answer starts, held
    await _until(lambda: any(r.preemptive for r in backend.requests), "a preemptive request")
    await _until(lambda: voice.player.queued_s > 0, "held speech synthesized")
    assert not np.any(voice.player.next_frame())  # held: silence goes out, its audio waits
    await _feed(session, speech.samples[pause_end - 1600 : int(speech.segments[1][1] * SR) + 6400])
    held = [e for e in _drain(sub) if isinstance(e, RESPONSE_EVENTS)]
    assert held == []  # nothing of the dropped answer, not even its cancellation
    assert voice.counters.answers == 0 and voice.counters.flushed_s == 0  # nor in the speech totals
    # The second silence: the same answer is made again, held, and released at the commit.
    await _until(lambda: sum(r.preemptive for r in backend.requests) == 2, "a second preemptive request")
    await _until(lambda: voice.player.queued_s > 0, "held speech synthesized again")
    await _feed(session, speech.samples[int(speech.segments[1][1] * SR) + 6400 :])
    assert np.any(voice.player.next_frame())  # released: its audio goes out from the first frame
    await _until(lambda: not session._agent_busy() or not voice.player.withheld, "release")
    for _ in range(400):
        voice.player.next_frame()
        await asyncio.sleep(0)
    await asyncio.wait_for(session.wait_idle(), 10)
    events = _drain(sub)
    await runtime.close()
    kinds = [e.type for e in events if not isinstance(e, (ev.SpeechStarted, ev.SpeechStopped))]
    assert kinds[:3] == ["turn.committed", "response.started", "response.delta"], [e.type for e in events]
    deltas = "".join(e.text for e in events if isinstance(e, ev.ResponseDelta))
    assert deltas == ANSWER  # once: the dropped answer left no text behind
    assert sum(isinstance(e, ev.ResponseStarted) for e in events) == 1
    assert not any(isinstance(e, (ev.ResponseCancelled, ev.Error)) for e in events)
    (audio_started,) = [e for e in events if isinstance(e, ev.ResponseAudioStarted)]
    assert {"speech_end_to_end_detected", "speech_end_to_commit", "speech_end_to_first_token",
            "speech_end_to_first_clause", "speech_end_to_first_audio",
            "speech_end_to_first_frame"} <= set(audio_started.timings)
    (done,) = [e for e in events if isinstance(e, ev.ResponseDone)]
    assert {"speech_end_to_end_detected", "speech_end_to_commit", "speech_end_to_first_token"} <= set(done.timings)
    assert backend.promoted == [done.turn_id] and backend.dropped.count(done.turn_id) >= 1
    assert session.conversation.request("s", "t").messages[-1] == {"role": "assistant", "content": ANSWER}


async def _first_delta_at_commit(make_speech_fixture, preemptive: bool) -> tuple[list, ScriptedBackend]:
    speech = make_speech_fixture([0.5, "turn on the kitchen light", 1.0], "preempt-commit")
    backend = ScriptedBackend([ANSWER], chunk=4)
    runtime = await _runtime(backend, preemptive=preemptive)
    session, sub = runtime.open_session()
    end = int(speech.segments[0][1] * SR)
    await _feed(session, speech.samples[: end + 5000])  # 0.31 s of silence: not yet a turn
    await asyncio.sleep(0.2)  # time for a preemptive answer to be made in full
    before = [e for e in _drain(sub) if isinstance(e, RESPONSE_EVENTS)]
    assert before == []  # held: nothing is published before the commit
    await session.push_audio(speech.samples[end + 5000 :])  # the commit
    at_commit = _drain(sub)  # published within the very call that committed
    await asyncio.wait_for(session.wait_idle(), 10)
    await runtime.close()
    return at_commit, backend


async def test_a_commit_publishes_the_held_answer_at_once(make_speech_fixture) -> None:
    at_commit, backend = await _first_delta_at_commit(make_speech_fixture, preemptive=True)
    kinds = [e.type for e in at_commit]
    assert "turn.committed" in kinds and kinds.index("turn.committed") < kinds.index("response.delta")
    assert "".join(e.text for e in at_commit if isinstance(e, ev.ResponseDelta)) == ANSWER
    assert [r.preemptive for r in backend.requests] == [True] and len(backend.promoted) == 1
    # Without preemption the answer only starts at the commit: no delta is out yet.
    at_commit, backend = await _first_delta_at_commit(make_speech_fixture, preemptive=False)
    assert not any(isinstance(e, ev.ResponseDelta) for e in at_commit)
    assert [r.preemptive for r in backend.requests] == [False] and backend.promoted == []


def test_stage_timings_reach_the_metrics_histograms() -> None:
    from agent.server.metrics import Metrics

    metrics = Metrics(runtime=None, active_sessions=lambda: 0)
    metrics.on_event(ev.ResponseDone(turn_id="t1", text="ok", timings={
        "total": 0.3, "speech_end_to_end_detected": 0.05, "speech_end_to_commit": 0.55,
        "speech_end_to_first_token": 0.56}))
    metrics.on_event(ev.ResponseAudioStarted(turn_id="t1", timings={
        "speech_end_to_commit": 0.55, "speech_end_to_first_clause": 0.6, "speech_end_to_first_audio": 0.65,
        "speech_end_to_first_frame": 0.7}))
    text = metrics.render()[0].decode()
    for stage in ("end_detected", "commit", "first_token", "first_clause", "first_audio", "first_frame"):
        assert f'voice_agent_turn_stage_seconds_count{{stage="{stage}"}} 1.0' in text  # each stage once


class BusyForPreemptive(ScriptedBackend):
    """Refuses preemptive work (a full queue): only committed turns are answered."""

    async def generate(self, request, stats=None):
        if request.preemptive:
            self.requests.append(request)
            raise InferenceError("busy", "no room for preemptive work")
        async for delta in super().generate(request, stats):
            yield delta


async def test_a_refused_preemptive_answer_is_asked_again_at_the_commit(make_speech_fixture) -> None:
    speech = make_speech_fixture([0.5, "turn on the kitchen light", 1.0], "preempt-commit")
    backend = BusyForPreemptive([ANSWER], chunk=4)
    runtime = await _runtime(backend)
    session, sub = runtime.open_session()
    await _feed(session, speech.samples)
    await asyncio.wait_for(session.wait_idle(), 10)
    events = _drain(sub)
    await runtime.close()
    assert not any(isinstance(e, ev.Error) for e in events)  # the refusal never reaches the user
    assert "".join(e.text for e in events if isinstance(e, ev.ResponseDelta)) == ANSWER
    assert [r.preemptive for r in backend.requests] == [True, False]
