"""Speech out: the engine interface, its settings and its one error type.

An engine turns text into 16-bit mono PCM at a rate it declares. `synthesize(text)` is an
async generator: closing it (or cancelling the task that iterates it) stops the work and
kills any subprocess. Engines are found only through the `voice_agent.tts` entry-point group,
so a package can add one without touching this code.
"""

from __future__ import annotations

import importlib.metadata
import struct
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.errors import Float, describe_validation_error

ENTRY_POINT_GROUP = "voice_agent.tts"


class TTSError(Exception):
    """A speech-out failure the session reports as an `error` event; the text answer still arrives.

    Codes: `tts_unavailable` (engine missing), `tts_config` (bad options), `tts_unknown_voice`,
    `tts_timeout` (engine hung), `tts_failed` (engine crashed or refused), `tts_unspeakable`
    (one piece of text gave no audio; the stage goes on with the next piece).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def fatal(self) -> bool:
        """Whether the answer's speech stops here (else only one piece is lost)."""
        return self.code != "tts_unspeakable"


def available_engines() -> list[str]:
    return sorted(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


class TTSSettings(BaseModel):
    """The `tts:` config section. `engine: none` (the default) turns speech out off."""

    model_config = ConfigDict(extra="forbid")

    engine: str = "none"  # espeak | piper | openai | none | any installed `voice_agent.tts` entry point
    voice: str | None = None  # espeak voice name, Piper .onnx path, or the server's voice name
    rate: Float = Field(default=1.0, ge=0.25, le=4.0)  # speaking-speed multiplier, 1.0 = the engine's normal
    timeout_s: Float = Field(default=10.0, gt=0, le=300)  # longest wait for the engine's next chunk
    options: dict[str, Any] = Field(default_factory=dict)  # engine-specific, validated by the engine

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, value: str) -> str:
        if value != "none" and value not in available_engines():
            raise ValueError(f"unknown TTS engine {value!r}; available: {', '.join(['none', *available_engines()])}")
        return value


class EngineOptions(BaseModel):
    """Base for an engine's `options`: unknown keys are errors, so typos fail at start."""

    model_config = ConfigDict(extra="forbid")


class SpeechEngine(ABC):
    """Text → 16-bit mono PCM. Construct with settings, `await start()`, then `synthesize`."""

    name: ClassVar[str] = "engine"
    Options: ClassVar[type[EngineOptions]] = EngineOptions

    def __init__(self, settings: TTSSettings) -> None:
        self.settings = settings
        try:
            self.options = self.Options.model_validate(settings.options)
        except ValidationError as exc:
            problems = describe_validation_error(exc, "options")
            raise TTSError("tts_config", f"{self.name} options: {problems}") from None
        self.sample_rate = 0  # declared by start()

    async def start(self) -> None:  # noqa: B027 - an optional hook
        """Check the engine can run and the voice exists (raises TTSError); set `sample_rate`."""

    async def aclose(self) -> None:  # noqa: B027 - an optional hook
        """Release what start() acquired."""

    async def __aenter__(self) -> SpeechEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @abstractmethod
    def synthesize(self, text: str) -> AsyncGenerator[np.ndarray, None]:
        """Yield int16 mono chunks at `sample_rate` for one piece of text (an async generator)."""

    async def stream(self, pieces: AsyncIterable[str]) -> AsyncIterator[np.ndarray]:
        """A stream of text pieces → one PCM stream (pieces are spoken in order)."""
        async for piece in pieces:
            gen = self.synthesize(piece)
            try:
                async for chunk in gen:
                    yield chunk
            finally:
                await gen.aclose()


def load_engine(settings: TTSSettings) -> SpeechEngine | None:
    """The configured engine, not yet started; None for `engine: none`."""
    if settings.engine == "none":
        return None
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    if settings.engine not in eps:
        raise TTSError("tts_unavailable", f"no TTS engine {settings.engine!r}; available: {', '.join(sorted(eps))}")
    try:
        cls = eps[settings.engine].load()
    except ImportError as exc:  # its optional dependency is missing
        raise TTSError("tts_unavailable", f"TTS engine {settings.engine!r} cannot be loaded: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, SpeechEngine)):
        raise TTSError("tts_unavailable", f"{settings.engine!r} does not name a SpeechEngine (got {cls!r})")
    return cls(settings)


class WavStream:
    """Incremental WAV parser for a streamed body (espeak-ng --stdout, an HTTP response).

    Streamed WAVs carry placeholder sizes, so the data chunk is read to the end of the
    stream; samples split across reads are carried over.
    """

    def __init__(self) -> None:
        self._head = b""
        self._rest = b""
        self.sample_rate = 0
        self.channels = 0
        self.in_data = False

    def feed(self, data: bytes) -> np.ndarray:
        """Bytes in; int16 mono samples out (empty until the header is complete)."""
        if not self.in_data:
            self._head += data
            data = self._parse_header()
            if not self.in_data:
                return np.zeros(0, np.int16)
        data = self._rest + data
        frame = 2 * self.channels
        cut = len(data) - len(data) % frame
        self._rest = data[cut:]
        pcm = np.frombuffer(data[:cut], dtype="<i2").astype(np.int16)
        return pcm.reshape(-1, self.channels).mean(axis=1).astype(np.int16) if self.channels > 1 else pcm

    def _parse_header(self) -> bytes:
        head = self._head
        if len(head) >= 12 and (head[:4] != b"RIFF" or head[8:12] != b"WAVE"):
            raise ValueError("not a WAV stream")
        pos = 12
        while len(head) >= pos + 8:
            cid, size = head[pos : pos + 4], struct.unpack("<I", head[pos + 4 : pos + 8])[0]
            if cid == b"data":
                if not self.sample_rate:
                    raise ValueError("WAV data before its fmt chunk")
                self.in_data = True
                self._head = b""
                return head[pos + 8 :]
            if len(head) < pos + 8 + size:
                return b""
            if cid == b"fmt ":
                fmt, self.channels, self.sample_rate, _, _, bits = struct.unpack("<HHIIHH", head[pos + 8 : pos + 24])
                if fmt != 1 or bits != 16:
                    raise ValueError(f"WAV format {fmt} with {bits}-bit samples; want 16-bit PCM")
            pos += 8 + size + size % 2
        return b""


def to_int16(pcm: np.ndarray | bytes) -> np.ndarray:
    """Engines may hand over bytes or float arrays; the stage works on int16."""
    if isinstance(pcm, bytes | bytearray | memoryview):
        return np.frombuffer(bytes(pcm)[: len(pcm) // 2 * 2], dtype="<i2").astype(np.int16)
    if pcm.dtype == np.int16:
        return pcm
    if pcm.dtype.kind == "f":
        return (np.clip(pcm, -1.0, 1.0) * 32767).astype(np.int16)
    raise TypeError(f"unsupported PCM dtype {pcm.dtype}")
