"""The TTS stage of one answer: `response.delta` texts in, timed 16-bit PCM chunks out.

Deltas are read by a task of their own and cut into pieces as they arrive, so the engine
speaks the first clause while the model still writes the rest. Closing the stage (or
cancelling its consumer) cancels that task and closes the engine's generator, which kills
its subprocess or HTTP response.

Errors: a piece that gives no audio (`tts_unspeakable`) is reported through `on_error`
and skipped; `max_failures` of them in a row, or any other `TTSError` (timeout, crash, bad
voice), end the stage by raising it. Other exceptions from an engine become `tts_failed`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterable, Callable
from dataclasses import dataclass, field

import numpy as np

from agent.speech.base import SpeechEngine, TTSError, to_int16
from agent.speech.chunker import Piece, TextChunker

log = logging.getLogger(__name__)
_END = object()


@dataclass(frozen=True)
class SpeechChunk:
    pcm: np.ndarray  # int16 mono; empty on the marker that ends a piece
    sample_rate: int
    piece: Piece  # the text this audio speaks
    piece_index: int
    piece_end: bool = False  # the piece's audio is complete (this chunk carries no samples)
    t: float = 0.0  # seconds after the first delta when this chunk was ready

    @property
    def duration_s(self) -> float:
        return self.pcm.size / self.sample_rate if self.sample_rate else 0.0


@dataclass
class SpeechStats:
    first_delta_at: float | None = None
    first_piece_at: float | None = None  # the first clause went to the engine
    first_audio_at: float | None = None
    audio_s: float = 0.0  # seconds of audio made
    engine_s: float = 0.0  # wall seconds spent waiting on the engine
    pieces: int = 0
    errors: list[TTSError] = field(default_factory=list)

    @property
    def first_audio_s(self) -> float | None:
        """Latency from the first delta to the first audio chunk."""
        if self.first_delta_at is None or self.first_audio_at is None:
            return None
        return self.first_audio_at - self.first_delta_at

    @property
    def rtf(self) -> float | None:
        """Real-time factor: engine wall time per second of audio (< 1 keeps up with playback)."""
        return self.engine_s / self.audio_s if self.audio_s else None

    def timings(self) -> dict[str, float]:
        out = {"tts_audio_s": round(self.audio_s, 3)}
        if self.first_audio_s is not None:
            out["tts_first_audio_s"] = round(self.first_audio_s, 4)
        if self.rtf is not None:
            out["tts_rtf"] = round(self.rtf, 4)
        return out


class SpeechStage:
    """One answer's speech. `async for chunk in stage`, then read `stage.stats`; `await stage.aclose()` stops it."""

    def __init__(self, engine: SpeechEngine, deltas: AsyncIterable[str], *, chunker: TextChunker | None = None,
                 timeout_s: float | None = None, on_error: Callable[[TTSError], None] | None = None,
                 max_failures: int = 3, clock: Callable[[], float] = time.perf_counter) -> None:
        if engine.sample_rate <= 0:
            raise ValueError(f"TTS engine {engine.name!r} is not started (await engine.start() first)")
        self.engine = engine
        self.chunker = chunker or TextChunker()
        self.timeout_s = timeout_s if timeout_s is not None else engine.settings.timeout_s
        self.on_error = on_error
        self.max_failures = max_failures
        self.clock = clock
        self.stats = SpeechStats()
        self.pieces: list[Piece] = []  # every piece cut so far, spoken or not yet
        self._deltas = deltas
        self._gen = self._run()

    def __aiter__(self) -> AsyncGenerator[SpeechChunk, None]:
        return self._gen

    async def aclose(self) -> None:
        await self._gen.aclose()

    async def __aenter__(self) -> SpeechStage:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _feed(self, queue: asyncio.Queue[object]) -> None:
        try:
            async for delta in self._deltas:
                if self.stats.first_delta_at is None:
                    self.stats.first_delta_at = self.clock()
                for piece in self.chunker.push(delta):
                    queue.put_nowait(piece)
            for piece in self.chunker.flush():
                queue.put_nowait(piece)
        finally:
            queue.put_nowait(_END)

    async def _run(self) -> AsyncGenerator[SpeechChunk, None]:
        queue: asyncio.Queue[object] = asyncio.Queue()
        feeder = asyncio.create_task(self._feed(queue), name="tts-deltas")
        failures = 0
        try:
            while (piece := await queue.get()) is not _END:
                assert isinstance(piece, Piece)
                index = len(self.pieces)
                self.pieces.append(piece)
                self.stats.pieces += 1
                self.stats.first_piece_at = self.stats.first_piece_at or self.clock()
                made = 0
                speech = self._speak(piece, index)
                try:
                    async for chunk in speech:
                        made += chunk.pcm.size
                        yield chunk
                    if made == 0:
                        raise TTSError("tts_unspeakable", f"{self.engine.name} made no audio for {piece.speak[:80]!r}")
                except TTSError as exc:
                    self.stats.errors.append(exc)
                    if exc.fatal:
                        raise
                    failures += 1
                    log.warning("tts: %s", exc)
                    if self.on_error is not None:
                        self.on_error(exc)
                    if failures >= self.max_failures:
                        fatal = TTSError("tts_failed", f"{failures} pieces in a row gave no audio; speech stopped")
                        self.stats.errors.append(fatal)
                        raise fatal from None
                    continue
                finally:
                    await speech.aclose()  # `async for` left early does not close it: kill the engine now
                failures = 0
                yield SpeechChunk(np.zeros(0, np.int16), self.engine.sample_rate, piece, index, piece_end=True,
                                  t=self._since_first_delta())
            await feeder  # a failing delta stream ends the stage with its error
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)

    def _since_first_delta(self) -> float:
        return self.clock() - (self.stats.first_delta_at or self.clock())

    async def _speak(self, piece: Piece, index: int) -> AsyncGenerator[SpeechChunk, None]:
        gen = self.engine.synthesize(piece.speak)
        try:
            while True:
                started = self.clock()
                try:
                    async with asyncio.timeout(self.timeout_s):
                        pcm = await anext(gen)
                except StopAsyncIteration:
                    self.stats.engine_s += self.clock() - started
                    return
                except TimeoutError:
                    raise TTSError("tts_timeout", f"{self.engine.name} gave no audio for {self.timeout_s:g} s") from None
                except TTSError:
                    raise
                except Exception as exc:  # an engine bug must not take the session down
                    log.exception("tts engine %s failed", self.engine.name)
                    raise TTSError("tts_failed", f"{self.engine.name}: {type(exc).__name__}: {exc}") from None
                now = self.clock()
                self.stats.engine_s += now - started
                samples = to_int16(pcm)
                if samples.size == 0:
                    continue
                if self.stats.first_audio_at is None:
                    self.stats.first_audio_at = now
                self.stats.audio_s += samples.size / self.engine.sample_rate
                yield SpeechChunk(samples, self.engine.sample_rate, piece, index, t=self._since_first_delta())
        finally:
            await gen.aclose()  # kills the engine's subprocess / closes its response
