"""The TTS stage: streamed deltas → timed PCM; speech starts before the answer ends; cancellation; errors."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import numpy as np
import pytest

from agent.speech.base import SpeechEngine, TTSError, TTSSettings
from agent.speech.espeak import EspeakEngine
from agent.speech.stage import SpeechChunk, SpeechStage

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


class FakeEngine(SpeechEngine):
    """Speaks 10 ms per character; "SILENT" gives no audio, "CRASH" raises, "HANG" never answers."""

    name = "fake"

    def __init__(self, settings: TTSSettings | None = None) -> None:
        super().__init__(settings or TTSSettings(timeout_s=0.2))
        self.sample_rate = 16000
        self.said: list[str] = []
        self.closed = 0

    async def synthesize(self, text: str) -> AsyncGenerator[np.ndarray, None]:
        self.said.append(text)
        try:
            if "SILENT" in text:
                return
            if "CRASH" in text:
                raise RuntimeError("model exploded")
            if "HANG" in text:
                await asyncio.Event().wait()
            for _ in text:
                yield np.full(160, 1000, np.int16)
        finally:
            self.closed += 1


async def from_list(deltas: list[str]) -> AsyncIterator[str]:
    for d in deltas:
        yield d
        await asyncio.sleep(0)


async def run(stage: SpeechStage) -> list[SpeechChunk]:
    return [c async for c in stage]


async def test_chunks_carry_their_piece_and_the_stats_add_up() -> None:
    engine = FakeEngine()
    stage = SpeechStage(engine, from_list(["Sure, I can help ", "with that. The light", " is on."]))
    chunks = await run(stage)
    assert engine.said == ["Sure, I can help with that.", "The light is on."]
    audio = [c for c in chunks if not c.piece_end]
    ends = [c for c in chunks if c.piece_end]
    assert [c.piece_index for c in ends] == [0, 1] and all(c.pcm.size == 0 for c in ends)
    assert sum(c.pcm.size for c in audio) == 160 * (len(engine.said[0]) + len(engine.said[1]))
    assert stage.stats.audio_s == pytest.approx(sum(c.duration_s for c in audio))
    assert stage.stats.first_audio_s is not None and stage.stats.first_audio_s >= 0
    assert stage.stats.rtf is not None and stage.stats.rtf > 0
    assert set(stage.stats.timings()) == {"tts_audio_s", "tts_first_audio_s", "tts_rtf"}
    assert "".join(p.text for p in stage.pieces) == "Sure, I can help with that. The light is on."


@needs_espeak
async def test_speech_starts_before_the_answer_is_complete() -> None:
    """The model is held after its first clause until audio has come out: no deadlock = streaming."""
    first_audio = asyncio.Event()

    async def model() -> AsyncIterator[str]:
        for word in "The kitchen light is now on, and".split():
            yield word + " "
        await asyncio.wait_for(first_audio.wait(), 10)  # a non-streaming stage would time out here
        yield "the heating is set to twenty degrees."

    async with EspeakEngine(TTSSettings(engine="espeak")) as engine:
        pieces = []
        async for chunk in SpeechStage(engine, model()):
            first_audio.set()
            if chunk.piece_end:
                pieces.append(chunk.piece.speak)
    assert pieces == ["The kitchen light is now on,", "and the heating is set to twenty degrees."]


@needs_espeak
async def test_closing_the_stage_stops_the_engine_and_the_delta_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    reader_closed = asyncio.Event()
    procs: list[asyncio.subprocess.Process] = []
    real = asyncio.create_subprocess_exec

    async def spy(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        procs.append(await real(*args, **kwargs))
        return procs[-1]

    async def endless() -> AsyncIterator[str]:
        try:
            yield "This is a very long first sentence " + "that goes on and on " * 300 + ". "
            while True:
                yield "more "
                await asyncio.sleep(0.01)
        finally:
            reader_closed.set()

    async with EspeakEngine(TTSSettings(engine="espeak")) as engine:
        monkeypatch.setattr(asyncio, "create_subprocess_exec", spy)
        stage = SpeechStage(engine, endless())
        first = await anext(aiter(stage))
        assert first.pcm.size
        await stage.aclose()
    assert reader_closed.is_set()
    assert procs and procs[-1].returncode is not None  # not left running


async def test_cancelling_the_consumer_task_stops_everything() -> None:
    engine = FakeEngine(TTSSettings(timeout_s=60))
    got_audio = asyncio.Event()

    async def consume() -> None:
        async for _ in SpeechStage(engine, from_list(["Hello there. ", "Please HANG now. ", "Never said."])):
            got_audio.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_audio.wait(), 5)
    while len(engine.said) < 2:  # noqa: ASYNC110 - the fake engine has no event to wait on
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.said == ["Hello there.", "Please HANG now."]
    assert engine.closed == 2  # the hung generator was closed too


async def test_a_hung_engine_times_out() -> None:
    stage = SpeechStage(FakeEngine(), from_list(["First piece is fine. ", "Then HANG forever."]))
    seen = []
    with pytest.raises(TTSError) as err:
        async for chunk in stage:
            seen.append(chunk)
    assert err.value.code == "tts_timeout" and err.value.fatal
    assert seen and seen[-1].piece_end and seen[-1].piece_index == 0  # the first piece was spoken in full
    assert stage.stats.errors == [err.value]


async def test_an_engine_bug_becomes_tts_failed() -> None:
    with pytest.raises(TTSError) as err:
        await run(SpeechStage(FakeEngine(), from_list(["Please CRASH."])))
    assert err.value.code == "tts_failed" and "model exploded" in err.value.message


async def test_unspeakable_pieces_are_reported_and_skipped_then_give_up() -> None:
    errors: list[TTSError] = []
    stage = SpeechStage(FakeEngine(), from_list(["SILENT one here. Spoken two here. SILENT three. End."]),
                        on_error=errors.append)
    chunks = await run(stage)
    assert [c.piece.speak for c in chunks if c.piece_end] == ["Spoken two here.", "End."]
    assert [e.code for e in errors] == ["tts_unspeakable", "tts_unspeakable"]

    errors.clear()
    stage = SpeechStage(FakeEngine(), from_list(["SILENT a piece. SILENT b piece. SILENT c piece. Lost."]),
                        on_error=errors.append, max_failures=3)
    with pytest.raises(TTSError) as err:
        await run(stage)
    assert err.value.code == "tts_failed" and len(errors) == 3


async def test_tool_markup_never_reaches_the_engine() -> None:
    engine = FakeEngine()
    deltas = ["Turning the light on.", "<tool", '_call>{"name": "light", "arguments": {}}</tool', "_call>",
              "<tool_response>{\"ok\": true}</tool_response>", "It is on now."]
    await run(SpeechStage(engine, from_list(deltas)))
    assert engine.said == ["Turning the light on.", "It is on now."]


async def test_a_failing_delta_stream_ends_the_stage_with_its_error() -> None:
    async def broken() -> AsyncIterator[str]:
        yield "Hello there, friend. "
        raise ConnectionError("model went away")

    with pytest.raises(ConnectionError):
        await run(SpeechStage(FakeEngine(), broken()))


def test_an_engine_that_was_not_started_is_refused() -> None:
    engine = FakeEngine()
    engine.sample_rate = 0
    with pytest.raises(ValueError, match="not started"):
        SpeechStage(engine, from_list([]))
