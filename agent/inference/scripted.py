"""A backend that replays scripted model outputs: drives tool calls and events in tests
and demos without a model. The real backends feed the same parser and session code."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from agent.inference.base import GenerationRequest, GenerationStats


class ScriptedBackend:
    name = "scripted"
    model_name = "scripted"
    warning: str | None = None
    tokenizer = None

    def __init__(self, outputs: list[str | BaseException], chunk: int = 3, delay: float = 0.0,
                 default: str = "ok") -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {chunk}")
        # One per generate call, in order; then `default`. An exception is raised by that call
        # (e.g. InferenceError("busy", …)) to test failure paths.
        self.outputs: list[str | BaseException] = list(outputs)
        self.chunk = chunk
        self.delay = delay
        self.default = default
        self.requests: list[GenerationRequest] = []
        self.prefills: list[GenerationRequest] = []
        self.dropped: list[str] = []
        self.forgotten: list[str] = []

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def generate(self, request: GenerationRequest,
                       stats: GenerationStats | None = None) -> AsyncIterator[str]:
        self.requests.append(request)
        text = self.outputs.pop(0) if self.outputs else self.default
        if isinstance(text, BaseException):
            raise text
        for i in range(0, len(text), self.chunk):
            if self.delay:
                await asyncio.sleep(self.delay)
            if stats is not None:
                stats.tokens += 1
            yield text[i : i + self.chunk]

    async def prefill(self, request: GenerationRequest) -> None:
        self.prefills.append(request)

    async def drop(self, session_id: str, turn_id: str) -> None:
        self.dropped.append(turn_id)

    async def forget(self, session_id: str) -> None:
        self.forgotten.append(session_id)
