"""Speech over the agent's voice — pause, then decide — on a virtual clock (no audio, no asyncio).

The judge here is the duration rule on the virtual clock's speech (the detectors themselves
are tested on real speech in test_bargein.py), so each test says exactly when what happens."""

from __future__ import annotations

import numpy as np
import pytest

from agent.speech.backchannel import BargeInConfig
from agent.speech.chunker import Piece
from agent.speech.overlap import Action, Kind, Overlap, Verdict
from agent.speech.playback import Player
from agent.speech.stage import SpeechChunk

STEP = 0.032  # one VAD chunk


class Clock:
    """Drives an Overlap chunk by chunk; the user's speech is on between `speak` and `quiet`."""

    def __init__(self, overlap: Overlap, max_backchannel_s: float = 0.8) -> None:
        self.o = overlap
        self.t = 0.0
        self.max_s = max_backchannel_s
        self.spoken = 0.0  # seconds of the current overlap's speech
        self.log: list[tuple[float, Action]] = []
        self.busy = True
        self.echo = False

    def judge(self, ended: bool) -> Verdict:
        if self.spoken > self.max_s:
            return Verdict.INTERRUPTION
        return Verdict.BACKCHANNEL if ended else Verdict.UNDECIDED

    def run(self, seconds: float) -> list[Action]:
        seen: list[Action] = []
        end = self.t + seconds
        while self.t < end - 1e-9:
            self.t += STEP
            if self.o.talking:
                self.spoken += STEP
            for action in self.o.step(self.t, self.busy, lambda: self.echo, self.judge):
                self.log.append((self.t, action))
                seen.append(action)
        return seen

    def speak(self) -> None:
        self.spoken = 0.0 if self.o.start is None else self.spoken
        self.o.speech_started(self.t, self.busy)

    def commit(self) -> tuple[Kind | None, list[Action]]:
        return self.o.turn_committed(False, self.judge)

    def when(self, action: Action) -> float:
        return next(t for t, a in self.log if a is action)


def test_a_backchannel_pauses_the_voice_at_once_then_resumes_it_and_is_no_turn() -> None:
    c = Clock(Overlap(resume_after_s=0.2))
    c.run(1.0)
    c.speak()  # "yeah", 0.4 s
    assert c.run(STEP) == [Action.PAUSE]  # the first chunk after speech is known: paused
    c.run(0.4 - STEP)
    c.o.speech_paused(silent := c.t)
    assert c.run(0.15) == []  # silence, but not yet long enough to go on
    assert c.run(0.1) == [Action.RESUME]
    assert 0.2 - 1e-6 <= c.when(Action.RESUME) - silent <= 0.2 + STEP + 1e-6
    assert c.run(1.0) == []
    ignored, actions = c.commit()
    assert ignored is Kind.RESUMED and actions == []  # a backchannel: no turn, nothing to do
    assert c.o.start is None


def test_an_interruption_pauses_then_cancels_once_it_is_too_long() -> None:
    c = Clock(Overlap())
    c.run(0.5)
    c.speak()
    assert c.run(STEP) == [Action.PAUSE]
    assert c.run(0.7) == []  # paused, not yet decided
    assert c.run(0.2) == [Action.CANCEL]
    assert c.when(Action.CANCEL) - 0.5 > 0.8
    assert c.run(2.0) == []  # once
    assert c.commit() == (None, [])  # the interruption is a real turn


def test_speech_that_goes_on_after_a_resume_pauses_again_and_interrupts() -> None:
    c = Clock(Overlap(resume_after_s=0.1))
    c.speak()
    c.run(0.3)
    c.o.speech_paused(c.t)
    assert c.run(0.2) == [Action.RESUME]
    c.o.speech_resumed()  # "yeah … but wait, I meant the other one"
    assert c.run(STEP) == [Action.PAUSE]
    assert c.run(1.0) == [Action.CANCEL]
    assert c.commit() == (None, [])


def test_a_speech_still_paused_when_its_turn_commits_is_judged_then() -> None:
    c = Clock(Overlap(resume_after_s=5.0))  # never resumes on silence alone
    c.speak()
    c.run(0.3)
    c.o.speech_paused(c.t)
    c.run(0.5)
    assert c.commit() == (Kind.RESUMED, [Action.RESUME])
    c.speak()
    c.run(1.0)  # too long: cancelled while speaking
    assert c.commit() == (None, [])
    undecided = Overlap()
    undecided.speech_started(0.0, True)
    undecided.step(0.1, True, lambda: False, lambda ended: Verdict.UNDECIDED)
    assert undecided.turn_committed(False, lambda ended: Verdict.UNDECIDED) == (None, [Action.CANCEL])


def test_without_pause_the_voice_plays_on_until_the_judge_says_interruption() -> None:
    c = Clock(Overlap(pause=False), max_backchannel_s=0.3)  # the old duration-only rule
    c.speak()
    assert c.run(0.25) == []
    assert c.run(0.2) == [Action.CANCEL]
    c.commit()
    c.speak()
    c.run(0.2)
    c.o.speech_paused(c.t)
    c.run(0.5)
    assert c.commit() == (Kind.RESUMED, [])  # short: a backchannel, never paused


def test_the_agents_own_voice_is_echo_until_the_user_really_joins_in() -> None:
    c = Clock(Overlap())
    c.echo = True
    c.speak()
    assert c.run(1.0) == [Action.ECHO]  # reported once, nothing paused
    c.echo = False  # louder than the echo: the user speaks, and has for long enough to interrupt
    assert c.run(STEP) == [Action.PAUSE, Action.CANCEL]
    e = Clock(Overlap())
    e.echo = True
    e.speak()
    e.run(1.0)
    e.o.speech_paused(e.t)
    assert e.commit() == (Kind.ECHO, [])


def test_speech_when_the_agent_is_quiet_or_stops_meanwhile_is_an_ordinary_turn() -> None:
    c = Clock(Overlap())
    c.busy = False
    c.speak()
    assert c.run(1.0) == [] and c.commit() == (None, [])
    c.busy = True
    c.speak()
    assert c.run(STEP) == [Action.PAUSE]
    c.busy = False  # the answer was cancelled meanwhile (the client, a new answer)
    assert c.run(1.0) == []
    assert c.o.kind is Kind.TURN and c.commit() == (None, [])


def test_a_split_turn_keeps_its_overlap_for_the_next_part() -> None:
    o = Overlap(pause=False)
    o.speech_started(1.0, agent_busy=True)
    o.step(1.1, True, lambda: False, lambda ended: Verdict.UNDECIDED)
    assert o.turn_committed(True, lambda ended: Verdict.UNDECIDED) == (Kind.RESUMED, []) and o.start == 1.0
    assert o.turn_committed(False, lambda ended: Verdict.UNDECIDED) == (Kind.RESUMED, []) and o.start is None


# ---- the echo tail: the far end still plays what was sent ---------------------------------

def _voice_player() -> Player:
    player = Player(sample_rate=16000)
    player.begin("t1")
    piece = Piece("hello there", "hello there")
    player.feed(SpeechChunk(np.full(16000, 3000, np.int16), 16000, piece, 0))
    player.feed(SpeechChunk(np.zeros(0, np.int16), 16000, piece, 0, piece_end=True))
    player.end()
    return player


def test_the_echo_gate_stays_on_for_the_playout_margin_after_the_last_frame() -> None:
    player = _voice_player()
    margin = BargeInConfig().echo_playout_s
    for _ in range(50):  # one second of voice, sent
        player.next_frame()
    player.next_frame()  # the answer is done: nothing is being sent any more …
    assert not player.speaking
    assert player.audible_within(margin)  # … but the far end still plays its buffers
    for _ in range(round(margin / player.frame_s) - 1):
        player.next_frame()
    assert player.audible_within(margin)
    player.next_frame()
    assert not player.audible_within(margin)  # past the margin: an ordinary turn again


def test_a_paused_player_sends_silence_keeps_its_place_and_goes_on_from_there() -> None:
    player = _voice_player()
    first = [player.next_frame() for _ in range(10)]
    assert player.pause() and not player.speaking
    held = [player.next_frame() for _ in range(30)]
    assert all(not f.any() for f in held) and player.underruns == 0
    assert player.resume()
    rest = [player.next_frame() for _ in range(41)]
    assert sum(f.size for f in first + rest if f.any()) == 16000  # every sample, once
    assert player.spoken_text() == "hello there"


# ---- the adapter: paused at the first chunk of speech, a blip dismissed ---------------------

class FakeVoice:
    """A Playout that records what barge-in does to it."""

    realtime = True
    turn_id = "t1"
    active = True
    sounding = True

    def __init__(self) -> None:
        self.calls: list[str] = []

    def is_echo(self, mic: np.ndarray, mic_rate: int = 16000) -> bool:
        return False

    def pause(self) -> bool:
        self.calls.append("pause")
        return True

    def resume(self) -> bool:
        self.calls.append("resume")
        return True

    def interrupt(self) -> None:
        self.calls.append("interrupt")

    def note_echo(self) -> None:
        pass

    def note_backchannel(self) -> None:
        self.calls.append("backchannel")


def test_the_voice_pauses_at_the_first_chunk_of_speech_and_a_blip_lets_it_go_on() -> None:
    from agent.speech.bargein import BargeIn

    voice, seen = FakeVoice(), []
    b = BargeIn(BargeInConfig(backchannel="duration"), voice, seen.append)
    chunk, t = np.zeros(512, np.float32), 0.0

    def feed(prob: float) -> bool:
        nonlocal t
        t += 0.032
        return b.step(chunk, prob, t, busy=True)

    feed(0.1)
    feed(0.9)  # one chunk of speech: paused now, before the turn detector calls it speech
    assert voice.calls == ["pause"] and [e.type for e in seen] == ["response.paused"]
    feed(0.1)  # gone again: a click, a cough
    assert voice.calls == ["pause", "resume"] and b.start is None
    feed(0.9)
    feed(0.9)
    b.speech_started(t - 0.064, busy=True)  # the turn detector confirms it: the same overlap
    assert voice.calls == ["pause", "resume", "pause"] and b.start == pytest.approx(t - 0.064)
    cancelled = [feed(0.9) for _ in range(10)]  # 0.3 s: the duration rule interrupts
    assert cancelled.count(True) == 1


def test_a_pause_before_the_answers_audio_holds_it_until_resumed_and_a_flush_clears_it() -> None:
    player = Player(sample_rate=16000)
    assert player.pause()  # the user spoke while the answer was still being written
    piece = Piece("hi", "hi")
    player.begin("t1")
    player.feed(SpeechChunk(np.full(3200, 3000, np.int16), 16000, piece, 0))
    assert not player.next_frame().any() and player.paused  # held: its audio waits
    assert player.resume() and player.next_frame().any()
    player.pause()
    player.flush()  # cancelled while paused: the next answer is not held
    assert not player.paused


def test_the_echo_of_an_answer_just_ended_is_no_turn() -> None:
    from agent.speech.bargein import BargeIn

    class Tail(FakeVoice):
        active = False  # the last frame went out: nothing to pause or cancel …
        sounding = True  # … but the far end still plays it (within the playout margin)

        def is_echo(self, mic: np.ndarray, mic_rate: int = 16000) -> bool:
            return True

    voice = Tail()
    b = BargeIn(BargeInConfig(), voice, lambda e: None)
    b.speech_started(1.0, busy=False)
    assert not b.step(np.full(512, 0.01, np.float32), 0.9, 1.032, busy=False)
    assert b.turn_committed(np.zeros(8000, np.float32), False, 1.6) == (Kind.ECHO, False)
    assert voice.calls == []  # nothing paused, nothing cancelled: the agent's own tail
    voice.sounding = False  # past the margin the same speech is the user's turn
    b.speech_started(3.0, busy=False)
    b.step(np.full(512, 0.01, np.float32), 0.9, 3.032, busy=False)
    assert b.turn_committed(np.zeros(8000, np.float32), False, 3.6) == (None, False)
