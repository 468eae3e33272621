"""The contract between sessions and whatever runs Qwen2-Audio.

A session hands a `GenerationRequest` (its whole conversation, audio included) to a
`Backend` and reads text deltas back. Backends: the local worker pool
(`agent.inference.pool`), an OpenAI-compatible server (`agent.inference.openai`).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


class InferenceError(Exception):
    """A request that failed; `code` is the `error` event's code (busy, worker_died, …)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# The codes the local pool gives a failed request. Our model server sends them in its OpenAI-style
# errors (`error.code`) and our OpenAI client takes them back, so the `error` events and
# `/metrics{code}` of a frontend are those of one process (`--processes` changes nothing).
POOL_CODES = frozenset({"busy", "worker_died", "worker_stalled", "out_of_memory", "backend_unavailable",
                        "model_load", "closed", "bad_request"})


@dataclass(frozen=True)
class AudioRef:
    """An audio clip the inference worker already holds in a session's KV cache, sent by
    identity instead of samples (`agent.inference.pool`; the worker asks for the samples
    again, error `audio_missing`, when it no longer has them)."""

    digest: str
    samples: int


@dataclass
class GenerationRequest:
    session_id: str
    turn_id: str
    # Chat-template messages: {"role": "system"|"user"|"assistant", "content": str | list of
    # parts}; an audio part is {"type": "audio", "audio": <index into `audios`>}, a text part
    # {"type": "text", "text": str}. Built by agent.conversation.Conversation.
    messages: list[dict[str, Any]]
    audios: list[np.ndarray]  # 16 kHz mono float32, each at most 30 s
    max_new_tokens: int = 256
    # Set when the turn is not final yet (speculative start on silence): prefill only.
    speculative: bool = False
    # A preemptive answer: a full generation started before the turn commits (silence began),
    # its output held by the session until the commit, discarded (the iterator closed) if
    # speech resumes. Backends run it below committed work: admitted after every committed
    # request, counted in max_queue, at most one per session, never evicting another
    # session's cached history. `Backend.promote` lifts it to a committed request.
    preemptive: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class GenerationStats:
    tokens: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0  # tokens of history whose KV cache was reused
    timings: dict[str, float] = field(default_factory=dict)


class Backend(Protocol):
    """What a session needs from an inference backend."""

    name: str
    model_name: str
    warning: str | None  # e.g. "tiny-random: answers are gibberish"
    tokenizer: Any  # the model's text tokenizer once started, for exact budgets; None: count bytes

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def generate(self, request: GenerationRequest, stats: GenerationStats | None = None) -> AsyncGenerator[str, None]:
        """Stream text deltas. Raises InferenceError. Closing the iterator cancels it."""
        ...

    async def prefill(self, request: GenerationRequest) -> None:
        """Speculative start: begin prefill of `request` before the turn commits.

        A later `generate` with the same turn_id continues from it; `drop` discards it.
        Backends without the feature may do nothing.
        """
        ...

    async def drop(self, session_id: str, turn_id: str) -> None: ...

    async def promote(self, session_id: str, turn_id: str) -> None:
        """The turn of a running preemptive `generate` committed: from now on it has the
        priority of committed work. Backends without priorities do nothing."""
        ...

    async def forget(self, session_id: str) -> None:
        """The session ended: free its cached history."""
        ...
