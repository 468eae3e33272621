"""`serve-model`'s wire: chat-completions requests in, errors out, conversation keys kept.

Pure parts of the model server (`agent.server.model_server` is the aiohttp adapter):
- `ChatRequest`: the request body, validated (pydantic), with our two extension fields
  `prefill_only` and `preemptive`; `decode_audio` reads an `input_audio` part.
- `status_of`: an `InferenceError` code → HTTP status and OpenAI error type.
- `ConversationKeys`: the conversation keys the server holds KV for, bounded (LRU) and
  expiring (idle TTL), on an injectable clock; it only decides, the server forgets.
"""

from __future__ import annotations

import binascii
import io
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from agent.errors import Int
from agent.model.qwen2_audio import SAMPLE_RATE, wav_samples

CONVERSATION_HEADER = "X-Conversation-Id"
TURN_HEADER = "X-Turn-Id"
FEATURES_HEADER = "X-Voice-Agent-Features"
FEATURES = ("conversation", "prefill", "drop", "promote", "forget")
KEY_RE = re.compile(r"^[A-Za-z0-9._:/@-]{1,128}$")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class InputAudio(BaseModel):
    model_config = ConfigDict(extra="ignore")
    data: str = Field(min_length=1)
    format: str = "wav"


class AudioPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["input_audio"]
    input_audio: InputAudio


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart | AudioPart] | None = None


class ChatRequest(BaseModel):
    """What we read of a chat-completions body. Sampling fields (temperature, top_p, seed, …)
    are accepted and ignored: the engine decodes greedily. Fields that would change the
    answer's shape and that the engine cannot honour are refused (`unsupported`)."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    max_tokens: Int | None = Field(default=None, ge=0)
    max_completion_tokens: Int | None = Field(default=None, ge=0)
    n: Int = Field(default=1, ge=1, le=1)
    stream_options: dict[str, Any] | None = None
    # extensions (the `openai` backend sends them only to a server that lists the feature)
    prefill_only: bool = False  # speculative prefill: no tokens, answered 204
    preemptive: bool = False  # a preemptive answer: runs below committed work

    def unsupported(self) -> str | None:
        extra = self.model_extra or {}
        for key in ("tools", "tool_choice", "response_format", "stop", "logprobs", "audio"):
            if extra.get(key) not in (None, False, [], {}):
                return (f"{key!r} is not supported by this server (put tools in the system prompt; "
                        "the model answers in text)")
        return None

    def max_new_tokens(self, default: int) -> int:
        given = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return default if given is None else given

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


def decode_audio(data: str, fmt: str) -> np.ndarray:
    """An `input_audio` part → 16 kHz mono float32. WAV is read directly; any other format
    (mp3, …) and any other rate or channel count go through PyAV. Raises ValueError."""
    try:  # strict, in C (b64decode's validate=True runs a regex over megabytes first)
        raw = binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError):
        raise ValueError("input_audio.data is not valid base64") from None
    from agent.audio import to_mono16k

    if fmt == "wav":
        samples, rate, channels = wav_samples(raw)
        if rate == SAMPLE_RATE and channels == 1:
            return samples
        if not rate or not channels:
            raise ValueError("WAV with no rate or channels")
        # Channels averaged, as `Resampler` does (FFmpeg's downmix would add them).
        mono = samples[: samples.size - samples.size % channels].reshape(-1, channels).mean(axis=1)
        return mono.astype(np.float32) if rate == SAMPLE_RATE else to_mono16k(mono.astype(np.float32), rate)
    return _decode_other(raw, fmt)


def _decode_other(raw: bytes, fmt: str) -> np.ndarray:
    import av

    from agent.audio import Resampler

    resampler = Resampler()
    out: list[np.ndarray] = []
    try:
        with av.open(io.BytesIO(raw), mode="r") as container:
            if not container.streams.audio:
                raise ValueError(f"input_audio ({fmt}) holds no audio stream")
            for frame in container.decode(audio=0):
                out.append(resampler.convert(frame))
    except av.FFmpegError as exc:
        raise ValueError(f"cannot decode input_audio ({fmt}): {exc}") from None
    out.append(resampler.convert(None))
    return np.concatenate(out) if out else np.zeros(0, np.float32)


# ---- errors ---------------------------------------------------------------------------
STATUS = {"busy": 429, "bad_request": 400, "backend_unavailable": 503, "worker_died": 503, "closed": 503,
          "model_load": 503, "out_of_memory": 503, "cancelled": 499, "worker_stalled": 503}


def status_of(code: str) -> tuple[int, str]:
    """(HTTP status, OpenAI error type) for an `InferenceError` code."""
    status = STATUS.get(code, 500)
    kind = ("rate_limit_error" if status == 429 else "invalid_request_error" if status < 500
            else "server_error")
    return status, kind


def error_body(message: str, kind: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": code}}


def retry_after_s(message: str, default: int = 1) -> int:
    """Seconds a client should wait: the pool says when its next restart is due."""
    found = re.search(r"next restart in ([0-9.]+) s", message)
    return max(default, int(float(found.group(1)) + 0.999)) if found else default


# ---- conversation keys ----------------------------------------------------------------
@dataclass
class _Key:
    last_used: float
    active: int = 0  # requests of this key running now: never expired under them
    clips: dict[str, np.ndarray] = field(default_factory=dict)  # base64 → decoded, the last request's


def owner_of(key: str) -> str:
    """The owner part of a scoped key (`owner/…`); the whole key when it has none."""
    return key.split("/", 1)[0]


class ConversationKeys:
    """Conversation keys the pool holds KV for. Bounded: at most `max_keys` (the least
    recently used idle key of the owner holding the most goes first) and each forgotten
    `ttl_s` after its last request.
    The caller forgets what `touch` and `expire` return (and counts it)."""

    def __init__(self, max_keys: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_keys = max_keys
        self.ttl_s = ttl_s
        self.clock = clock
        self._keys: OrderedDict[str, _Key] = OrderedDict()
        self.expired = {"idle": 0, "lru": 0, "deleted": 0}

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def touch(self, key: str) -> list[str]:
        """Use `key` now; returns the keys evicted to stay within `max_keys`."""
        entry = self._keys.get(key)
        if entry is None:
            entry = self._keys[key] = _Key(self.clock())
        entry.last_used = self.clock()
        self._keys.move_to_end(key)
        evicted: list[str] = []
        while len(self._keys) > self.max_keys:
            idle = self._victim(key)
            if idle is None:  # every key has a request running: over the bound until one ends
                break
            del self._keys[idle]
            evicted.append(idle)
        self.expired["lru"] += len(evicted)
        return evicted

    def _victim(self, key: str) -> str | None:
        """The least recently used idle key of the owner holding the most keys: a client that
        opens many conversations evicts its own, not another's (keys are `owner/…`)."""
        held: dict[str, int] = {}
        for k in self._keys:
            held[owner_of(k)] = held.get(owner_of(k), 0) + 1
        for owner in sorted(held, key=held.__getitem__, reverse=True):
            found = next((k for k, e in self._keys.items() if e.active == 0 and k != key and owner_of(k) == owner),
                         None)
            if found is not None:
                return found
        return None

    def begin(self, key: str) -> list[str]:
        evicted = self.touch(key)
        self._keys[key].active += 1
        return evicted

    def end(self, key: str) -> None:
        entry = self._keys.get(key)
        if entry is not None:
            entry.active = max(0, entry.active - 1)
            entry.last_used = self.clock()

    def expire(self) -> list[str]:
        """Keys idle for `ttl_s`: removed and returned."""
        now = self.clock()
        gone = [k for k, e in self._keys.items() if e.active == 0 and now - e.last_used >= self.ttl_s]
        for key in gone:
            del self._keys[key]
        self.expired["idle"] += len(gone)
        return gone

    def remove(self, key: str) -> bool:
        found = self._keys.pop(key, None) is not None
        self.expired["deleted"] += found
        return found

    def clips(self, key: str) -> dict[str, np.ndarray]:
        """The key's decoded clips by their base64 text: history is not decoded again each
        turn, and the pool sees the same arrays (its audio digests are memoised by array)."""
        entry = self._keys.get(key)
        return entry.clips if entry is not None else {}

    def keep_clips(self, key: str, clips: dict[str, np.ndarray]) -> None:
        entry = self._keys.get(key)
        if entry is not None:
            entry.clips = clips
