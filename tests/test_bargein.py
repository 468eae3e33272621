"""Pause, then decide, with real speech: the detectors on espeak backchannels and interruptions,
and a session with the scripted backend and a live espeak voice whose frames are pulled in step
with the microphone (as a transport's clock would): a "yeah" over the answer pauses and resumes
it and is no turn; a long interruption cancels it."""

from __future__ import annotations

import asyncio
import shutil
from typing import Any

import numpy as np
import pytest

from agent import events as ev
from agent.config import load_settings
from agent.inference.scripted import ScriptedBackend
from agent.runtime import AgentRuntime
from agent.speech.backchannel import BargeInConfig, DurationDetector, FeatureDetector, OverlapSpeech, load_detector
from agent.speech.overlap import Verdict
from agent.vad import CHUNK
from tests.speech import make_speech

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")

LONG = ("Here is a fairly long answer that keeps going for quite a while. It talks about the lights in "
        "the kitchen, the weather outside, and the music in the living room. It ends only after many "
        "more words than anyone would wait for.")
FRAME = 320  # 20 ms of microphone per frame of voice pulled


def overlap_speech(text: str, ended: bool = True, user_level_db: float | None = None) -> OverlapSpeech:
    audio = make_speech([text]).samples
    n = -(-audio.size // CHUNK)
    audio = np.pad(audio, (0, n * CHUNK - audio.size))
    return OverlapSpeech(audio, np.ones(n, np.float32), ended, user_level_db)


def test_the_feature_detector_tells_backchannels_from_questions_and_commands() -> None:
    features = FeatureDetector(BargeInConfig())
    for word in ("yeah", "uh-huh", "okay", "right"):
        assert features.judge(overlap_speech(word)) is Verdict.BACKCHANNEL, word
        assert features.judge(overlap_speech(word, ended=False)) is Verdict.UNDECIDED, word
    for said in ("what time is it in tokyo", "wait, stop talking please"):
        assert features.judge(overlap_speech(said)) is Verdict.INTERRUPTION, said
        assert features.last is not None and features.last.reasons
    # a "yeah" said much louder than the user usually speaks is not a backchannel
    loud = overlap_speech("yeah")
    assert features.judge(loud) is Verdict.BACKCHANNEL
    assert features.last is not None
    assert features.judge(overlap_speech("yeah", user_level_db=features.last.level_db - 10)) is Verdict.INTERRUPTION
    assert features.last.reasons == ["loud"]
    # the old rule: 0.3 s is enough to interrupt, so a "yeah" does
    assert DurationDetector(BargeInConfig()).judge(overlap_speech("okay")) is Verdict.INTERRUPTION


def test_an_unknown_detector_is_refused_with_the_names_there_are() -> None:
    with pytest.raises(ValueError, match="available: commands, duration, features"):
        load_detector(BargeInConfig(backchannel="psychic"))
    from agent.config import ConfigError

    with pytest.raises(ConfigError, match="unknown interruption detector 'psychic'"):
        load_settings(None, turns={"backchannel": "psychic"})


class Driver:
    """The microphone in 20 ms frames, one frame of the agent's voice pulled per frame."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.heard: list[np.ndarray] = []

    async def feed(self, samples: np.ndarray) -> None:
        player = self.session.voice.player
        for i in range(0, samples.size, FRAME):
            await self.session.push_audio(samples[i : i + FRAME])
            self.heard.append(player.next_frame())
            await asyncio.sleep(0)

    async def silence(self, seconds: float) -> None:
        await self.feed(np.zeros(round(seconds * 16000), np.float32))


async def until(cond: Any, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


async def test_a_yeah_pauses_and_resumes_the_answer_a_long_interruption_cancels_it() -> None:
    settings = load_settings(None, model="tiny-random", tts={"engine": "espeak"})
    backend = ScriptedBackend([LONG, "Sure, I will wait."], delay=0.005)
    runtime = AgentRuntime(settings, backend=backend)
    await runtime.start()
    sub = runtime.bus.subscribe()
    session = runtime.create_session(voice_output="live")
    assert session.voice is not None
    mic = Driver(session)
    question = make_speech([0.5, "turn on the kitchen light"]).samples
    yeah = make_speech(["yeah"]).samples
    stop = make_speech(["wait, stop, I have another question for you"]).samples
    try:
        await mic.feed(question)
        await mic.silence(0.8)  # the turn commits; the answer starts
        await until(lambda: session.voice.player.queued_s > 6.0)  # espeak has spoken ahead
        await mic.silence(1.0)  # the voice plays
        await mic.feed(yeah)
        await mic.silence(1.2)
        events = [e for e in _drain(sub) if e.session_id == session.id]
        kinds = [e.type for e in events]
        assert kinds.count("response.paused") == 1 and kinds.count("response.resumed") == 1
        assert kinds.count("speech.backchannel") == 1 and kinds.count("turn.committed") == 1
        assert "response.cancelled" not in kinds
        assert kinds.index("response.paused") < kinds.index("response.resumed") < kinds.index("speech.backchannel")
        (bc,) = [e for e in events if isinstance(e, ev.SpeechBackchannel)]
        assert bc.detector == "commands" and 0.2 < bc.features["duration_s"] < 0.7
        (resumed,) = [e for e in events if isinstance(e, ev.ResponseResumed)]
        assert resumed.paused_s < 1.2  # "yeah" + the resume wait
        # the history: one user turn (not the "yeah"), the answer once, whole (its text may
        # still have been arriving while the voice was paused)
        await session.wait_idle()
        assert [e[0] for e in session.conversation._entries] == ["user", "assistant"]
        assert session.conversation._entries[1][1] == LONG
        assert session.voice.active and not session.voice.paused  # still speaking after the yeah

        await mic.silence(0.5)
        await mic.feed(stop)
        await mic.silence(1.0)
        # the interruption is the next turn (its answer may have started early: a preemptive request)
        await until(lambda: len({r.turn_id for r in backend.requests}) == 2)
        await session.wait_idle()
        events = [e for e in _drain(sub) if e.session_id == session.id]
        kinds = [e.type for e in events]
        assert kinds.count("response.paused") == 1 and "response.resumed" not in kinds, [(e.type, getattr(e, "t", None), getattr(e, "start", None)) for e in events]
        (cancelled,) = [e for e in events if isinstance(e, ev.ResponseCancelled)]
        assert cancelled.reason == "barge_in" and kinds.index("response.paused") < kinds.index("response.cancelled")
        heard = cancelled.spoken_text
        assert heard and LONG.startswith(heard) and len(heard) < len(LONG)
        assert kinds.count("turn.committed") == 1 and "speech.backchannel" not in kinds, [(e.type, getattr(e, "t", None)) for e in events]
        said = [m["content"] for m in backend.requests[-1].messages if m["role"] == "assistant"]
        assert said in ([heard], [[{"type": "text", "text": heard}]])  # only what was heard
    finally:
        await session.close()
        await runtime.close()


def _drain(sub: Any) -> list[Any]:
    out = []
    while not sub.queue.empty():
        out.append(sub.queue.get_nowait())
    return out


class NeverInterrupts:
    """A detector from another package: everything is a backchannel."""

    def __init__(self, config: BargeInConfig) -> None:
        self.config = config

    def judge(self, speech: OverlapSpeech) -> Verdict:
        return Verdict.BACKCHANNEL if speech.ended else Verdict.UNDECIDED


def test_other_detectors_come_from_the_entry_point_group(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    from agent.speech import backchannel

    ours = importlib.metadata.EntryPoint("patient", f"{__name__}:NeverInterrupts", backchannel.ENTRY_POINT_GROUP)
    real = importlib.metadata.entry_points

    def entry_points(**kw: Any) -> Any:
        found = real(**kw)
        return [*found, ours] if kw.get("group") == backchannel.ENTRY_POINT_GROUP else found

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    settings = load_settings(None, turns={"backchannel": "patient"})
    detector = load_detector(settings.turns.to_bargein_config())
    assert isinstance(detector, NeverInterrupts)
    assert detector.judge(overlap_speech("what time is it in tokyo")) is Verdict.BACKCHANNEL
