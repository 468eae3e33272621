"""Speech out that goes wrong, end to end: a session hears a spoken turn and its TTS engine
crashes, hangs, or cannot say a piece; and a voice that does not exist at startup. Each is
an `error` event (or a clear exit), and the text answer still arrives in full."""

from __future__ import annotations

import asyncio
import shutil
import sys
from typing import Any

import pytest

from agent import events as ev
from agent.config import load_settings
from agent.inference.scripted import ScriptedBackend
from agent.runtime import AgentRuntime
from agent.speech.base import TTSSettings
from tests.speech import make_speech
from tests.test_speech_stage import FakeEngine

FIRST = "The kitchen light is on now, as you asked. "


async def answer_spoken_by(engine_box: list[FakeEngine], answer: str, monkeypatch: pytest.MonkeyPatch,
                           voice_output: str = "offline") -> list[ev.Event]:
    """One spoken turn through a real runtime whose TTS engine is a FakeEngine (handed in where
    the runtime loads its engine); the session's events until it closed."""

    def load(settings: TTSSettings) -> FakeEngine:
        engine_box.append(FakeEngine(settings))
        return engine_box[-1]

    monkeypatch.setattr("agent.runtime.load_engine", load)
    settings = load_settings(None, model="tiny-random", tts={"engine": "espeak", "timeout_s": 1.0})
    runtime = AgentRuntime(settings, backend=ScriptedBackend([answer], chunk=5))
    await runtime.start()
    assert runtime.tts is engine_box[0]
    session, sub = runtime.open_session(wait_for_responses=True, voice_output=voice_output)
    assert session.voice is not None
    seen: list[ev.Event] = []
    errored = asyncio.Event()

    async def collect() -> None:
        async for event in sub:
            seen.append(event)
            if isinstance(event, ev.Error):
                errored.set()
            if isinstance(event, ev.SessionEnded):
                return

    collector = asyncio.create_task(collect())
    speech = make_speech([0.5, "turn on the kitchen light", 1.0], "tts-failure-turn")
    for i in range(0, speech.samples.size, 1600):
        await session.push_audio(speech.samples[i : i + 1600])
    await asyncio.wait_for(session.finish(), 30)  # offline: the voice is rendered too
    if voice_output == "live":  # nothing plays the frames: wait for the engine's verdict
        await asyncio.wait_for(errored.wait(), 10)
    await session.close("done")
    await asyncio.wait_for(collector, 10)
    sub.close()
    await runtime.close()
    return seen


def of(events: list[ev.Event], kind: type[Any]) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


@pytest.mark.parametrize("bad, code", [("CRASH", "tts_failed"), ("HANG", "tts_timeout"), ("SILENT", "tts_unspeakable")])
async def test_a_failing_engine_is_an_error_event_and_the_text_still_arrives(
        bad: str, code: str, monkeypatch: pytest.MonkeyPatch) -> None:
    answer = f"{FIRST}Then {bad} happens to this part of the answer. And it ends here, all of it."
    engines: list[FakeEngine] = []
    events = await answer_spoken_by(engines, answer, monkeypatch)
    (done,) = of(events, ev.ResponseDone)
    assert done.text == answer  # the text answer, whole
    errors = of(events, ev.Error)
    assert [(e.code, e.turn_id) for e in errors] == [(code, done.turn_id)]
    said = engines[0].said
    assert any(bad in s for s in said) and engines[0].closed == len(said)  # every call was closed
    (audio,) = of(events, ev.ResponseAudioDone)
    assert audio.turn_id == done.turn_id and not audio.interrupted and audio.duration_s > 0
    assert audio.spoken_text.startswith(FIRST.strip()) and bad not in audio.spoken_text
    if code == "tts_unspeakable":  # one piece is lost, the voice goes on with the rest
        assert audio.spoken_text.endswith("all of it.")
    else:  # the answer's voice stops there
        assert "ends here" not in audio.spoken_text
    if code == "tts_timeout":  # the text did not wait for the hung engine
        assert events.index(done) < events.index(errors[0])


async def test_a_live_voice_nobody_plays_does_not_hold_up_the_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """Live output with no transport pulling frames (a stalled peer): the answer's text and
    the hung engine's error both arrive; closing the session ends the voice."""
    answer = f"{FIRST}HANG right here."
    events = await answer_spoken_by([], answer, monkeypatch, voice_output="live")
    (done,) = of(events, ev.ResponseDone)
    assert done.text == answer
    assert [e.code for e in of(events, ev.Error)] == ["tts_timeout"]
    (audio,) = of(events, ev.ResponseAudioDone)  # ended at the close, nothing was played
    assert audio.interrupted and audio.duration_s == 0 and audio.spoken_text == ""
    assert isinstance(events[-1], ev.SessionEnded)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
@pytest.mark.parametrize("command", ["run", "serve"])
async def test_an_unknown_voice_at_startup_is_a_clear_error(command: str, tmp_path: Any) -> None:
    speech = make_speech([0.3, "hello", 0.5], "tts-unknown-voice")
    args = ["-m", "agent.cli", command, "--model", "tiny-random", "--tts", "espeak", "--tts-voice", "nope"]
    args += [str(speech.path)] if command == "run" else ["--port", "0"]
    proc = await asyncio.create_subprocess_exec(sys.executable, *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    stderr = err.decode()
    assert proc.returncode == 2, stderr
    assert "tts_unknown_voice" in stderr and "'nope'" in stderr and "Traceback" not in stderr
    assert out.decode() == ""
