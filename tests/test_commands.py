"""Short commands over the agent's voice ("stop", "wait", "hold on") cancel the answer; backchannels
("yeah", "okay") still resume it. The state machine on a virtual clock, the detector with a scripted
spotter (what any spotter plugs in as), PocketSphinx on espeak words, and a live session whose
voice a "stop" cancels with no turn of its own."""

from __future__ import annotations

import asyncio
import shutil

import numpy as np
import pytest

from agent import events as ev
from agent.config import load_settings
from agent.inference.scripted import ScriptedBackend
from agent.runtime import AgentRuntime
from agent.speech.backchannel import BargeInConfig, OverlapSpeech, load_detector
from agent.speech.commands import CommandDetector, normalise, preload
from agent.speech.overlap import Action, Kind, Overlap, Verdict
from agent.vad import CHUNK
from tests.speech import make_speech
from tests.test_bargein import LONG, Driver, _drain, until
from tests.test_overlap import STEP, Clock

espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")


class CommandClock(Clock):
    """The virtual clock's judge, where a short speech is a command."""

    def judge(self, ended: bool) -> Verdict:
        verdict = super().judge(ended)
        return Verdict.COMMAND if verdict is Verdict.BACKCHANNEL else verdict


def test_a_command_cancels_the_paused_answer_once_its_speech_ends_and_is_no_turn() -> None:
    c = CommandClock(Overlap(resume_after_s=0.5))
    c.run(1.0)
    c.speak()  # "stop", 0.3 s
    assert c.run(STEP) == [Action.PAUSE]  # paused at once, as for any speech over the answer
    assert c.run(0.3 - STEP) == []  # still speaking: undecided
    c.o.speech_paused(silent := c.t)
    assert c.run(STEP) == [Action.CANCEL]  # judged at the first chunk of silence: no resume
    assert c.when(Action.CANCEL) - silent <= STEP + 1e-6
    assert c.run(1.0) == []  # once
    assert c.commit() == (Kind.COMMAND, [])  # carried out: no turn to answer
    assert c.o.start is None


def test_a_command_can_also_be_a_turn_and_is_judged_at_commit_if_still_paused() -> None:
    c = CommandClock(Overlap(resume_after_s=0.5, command_turn=True))
    c.speak()
    c.run(0.3)
    c.o.speech_paused(c.t)
    assert c.run(STEP) == [Action.CANCEL]
    assert c.commit() == (None, [])  # command_turn: the model hears "stop" as a turn
    late = Overlap(resume_after_s=5.0)
    late.speech_started(0.0, True)
    late.step(0.1, True, lambda: False, lambda ended: Verdict.UNDECIDED)
    assert late.turn_committed(False, lambda ended: Verdict.COMMAND) == (Kind.COMMAND, [Action.CANCEL])
    without_pause = Overlap(pause=False)  # the old rule: nothing paused, the command still cancels
    without_pause.speech_started(0.0, True)
    assert without_pause.step(0.1, True, lambda: False, lambda ended: Verdict.COMMAND) == [Action.CANCEL]
    assert without_pause.turn_committed(False, lambda ended: Verdict.COMMAND) == (Kind.COMMAND, [])


class Scripted:
    """A spotter that hears what it is told (the tiny model's words are gibberish, so a spotter
    that asks the model is tested this way)."""

    def __init__(self, heard: str | None) -> None:
        self.heard, self.calls = heard, 0

    def spot(self, audio: np.ndarray) -> str | None:
        self.calls += 1
        return self.heard


def speech(text: str, ended: bool = True, silence_s: float = 0.2) -> OverlapSpeech:
    """The words, then `silence_s` (its VAD probabilities low) once they ended."""
    audio = make_speech([text]).samples
    n = -(-audio.size // CHUNK)
    quiet = round(silence_s / (CHUNK / 16000)) if ended else 0
    audio = np.pad(audio, (0, (n + quiet) * CHUNK - audio.size))
    return OverlapSpeech(audio, np.r_[np.ones(n), np.zeros(quiet)].astype(np.float32), ended)


@espeak
def test_the_detector_asks_its_spotter_once_per_speech_and_only_short_ended_speech() -> None:
    config = BargeInConfig(commands=("Stop", "hold on"))
    stop = Scripted("stop")
    detector = CommandDetector(config, spotter=stop)
    word = speech("stop")
    assert detector.judge(speech("stop", ended=False)) is Verdict.UNDECIDED  # not while it goes on
    assert detector.judge(speech("stop", silence_s=0.03)) is Verdict.BACKCHANNEL  # a dip, not yet its end
    assert stop.calls == 0
    assert detector.judge(word) is Verdict.COMMAND
    assert detector.judge(word) is Verdict.COMMAND and stop.calls == 1  # asked again each chunk: cached
    assert detector.last is not None and "command" in detector.last.reasons
    # a long sentence is an interruption by its features: no spotting needed
    assert detector.judge(speech("what time is it in tokyo")) is Verdict.INTERRUPTION and stop.calls == 1
    # heard a backchannel, or nothing: the feature detector's verdict stands
    assert CommandDetector(config, spotter=Scripted("yeah")).judge(word) is Verdict.BACKCHANNEL
    assert CommandDetector(config, spotter=Scripted(None)).judge(word) is Verdict.BACKCHANNEL
    # the configured words, normalised: "no" is not one of these commands
    assert CommandDetector(config, spotter=Scripted("no")).judge(word) is Verdict.BACKCHANNEL
    assert normalise("Mm-hm!") == "mm hm"


@espeak
def test_pocketsphinx_tells_spoken_commands_from_backchannels() -> None:
    pytest.importorskip("pocketsphinx")
    detector = load_detector(BargeInConfig())
    assert isinstance(detector, CommandDetector) and detector.wait_ready() and detector.spotter is not None
    assert detector.spotter is CommandDetector(BargeInConfig()).spotter  # loaded once, shared
    said = {text: detector.judge(speech(text)) for text in
            ("stop", "cancel", "hold on", "be quiet", "wait", "yeah", "okay", "right", "sure", "I see")}
    commands = [t for t, v in said.items() if v is Verdict.COMMAND]
    assert set(commands) >= {"stop", "cancel", "hold on", "be quiet"}, said
    assert not set(commands) & {"yeah", "okay", "right", "sure", "I see"}, said


@espeak
async def test_stop_over_the_answer_cancels_it_with_no_turn_and_yeah_still_resumes() -> None:
    pytest.importorskip("pocketsphinx")
    settings = load_settings(None, model="tiny-random", tts={"engine": "espeak"})
    spotter = preload(settings.turns.to_bargein_config())
    assert spotter is not None
    spotter.result(60)  # loaded in a thread when the first session starts; here before it
    backend = ScriptedBackend([LONG, LONG], delay=0.005)
    runtime = AgentRuntime(settings, backend=backend)
    await runtime.start()
    sub = runtime.bus.subscribe()
    session = runtime.create_session(voice_output="live")
    assert session.voice is not None
    mic = Driver(session)
    try:
        await mic.feed(make_speech([0.5, "turn on the kitchen light"]).samples)
        await mic.silence(0.8)
        await until(lambda: session.voice.player.queued_s > 6.0)
        await mic.silence(1.0)
        await mic.feed(make_speech(["yeah"]).samples)
        await mic.silence(1.2)
        kinds = [e.type for e in _drain(sub) if e.session_id == session.id]
        assert "response.resumed" in kinds and "response.cancelled" not in kinds, kinds
        await mic.silence(0.5)
        await mic.feed(make_speech(["stop"]).samples)
        await mic.silence(1.5)  # past the resume wait and the turn's end
        await asyncio.sleep(0.2)
        events = [e for e in _drain(sub) if e.session_id == session.id]
        kinds = [e.type for e in events]
        assert "response.paused" in kinds and "response.resumed" not in kinds, kinds
        (cancelled,) = [e for e in events if isinstance(e, ev.ResponseCancelled)]
        assert cancelled.reason == "barge_in"
        assert "speech.backchannel" not in kinds
        assert len({r.turn_id for r in backend.requests if not r.speculative}) == 1  # "stop" is not answered
        assert not session.voice.active
        # and the agent listens on: the next question is answered, aloud
        await mic.feed(make_speech(["turn off the light"]).samples)
        await mic.silence(1.0)
        await until(lambda: len({r.turn_id for r in backend.requests if not r.speculative}) == 2)
        await until(lambda: session.voice.player.queued_s > 1.0, timeout=10)
        await mic.silence(0.5)
        heard = np.concatenate(mic.heard[-25:])
        assert float(np.abs(heard).max()) > 0.05  # its voice is heard, not held paused
    finally:
        await session.close()
        await runtime.close()


def test_speech_that_goes_on_after_a_command_is_judged_again_whole_when_its_turn_ends() -> None:
    c = CommandClock(Overlap(resume_after_s=0.5), max_backchannel_s=0.8)
    c.speak()  # "wait, …
    c.run(0.3)
    c.o.speech_paused(c.t)
    assert c.run(STEP) == [Action.CANCEL]
    c.o.speech_resumed()  # … I have another question for you"
    c.run(1.0)
    assert c.commit() == (None, [])  # too long for a command now: a real turn, answered
    c.speak()  # "stop … stop"
    c.run(0.3)
    c.o.speech_paused(c.t)
    assert c.run(STEP) == [Action.CANCEL]
    c.o.speech_resumed()
    c.spoken = 0.3  # the judge, whole, still hears a command
    c.run(0.2)
    assert c.commit() == (Kind.COMMAND, [])
