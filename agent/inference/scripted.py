"""A backend that replays scripted model outputs: tool calls and events without a model.

Tests give it a list of outputs, one per generate call. Users give it a script file
(`voice-agent run --backend scripted --script FILE.yaml`), one entry per user turn, which
every session replays from its first turn:

    turns:
      - - tool_call: {name: set_light, arguments: {room: kitchen, on: true}}
        - The kitchen light is on.          # the answer once the tool result is in
      - '<tool_call>{"name": "current_time", "arguments": {}}</tool_call>'
      - Goodbye.
    default: That is all I was scripted to say.   # after the last turn

An entry is one output, or a list of outputs: one per model round of that turn (a round
that calls tools is followed by one that sees their results). An output is text (Qwen's
`<tool_call>{…}</tool_call>` markup included) or `{tool_call: {name, arguments}}`. The
real backends feed the same parser and session code.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import describe_validation_error, read_yaml
from agent.inference.base import GenerationRequest, GenerationStats
from agent.model.qwen2_audio import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

LOG_LIMIT = 256  # the request log keeps the latest requests only: a long demo must not grow
T = TypeVar("T")


class _Log(list[T]):
    """A list that keeps only its `limit` newest items (tests compare it with lists)."""

    def __init__(self, limit: int = LOG_LIMIT) -> None:
        super().__init__()
        self.limit = limit

    def append(self, item: T) -> None:
        super().append(item)
        if len(self) > self.limit:
            del self[0]


class _ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    arguments: dict[str, Any] = Field(default_factory=dict)


class _ToolCallOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tool_call: _ToolCall


class Script(BaseModel):
    """A script file's settings; `turns` are checked by `rounds()`, one entry per turn."""

    model_config = ConfigDict(extra="forbid")
    turns: list[Any] = Field(min_length=1)
    default: str = "That is all I was scripted to say."
    chunk: int = Field(default=3, ge=1, strict=True)  # characters per streamed delta
    delay_s: float = Field(default=0.02, ge=0, le=5)  # between deltas, so the answer visibly streams

    def rounds(self) -> list[list[str]]:
        """The outputs of each turn, one per round; raises ValueError saying which is wrong."""
        return [[_output(o, f"turns.{i}.{j}") for j, o in enumerate(entry)] if isinstance(entry, list)
                else [_output(entry, f"turns.{i}")] for i, entry in enumerate(self.turns)]


def _output(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected text or {{tool_call: {{name: …, arguments: {{…}}}}}}")
    try:
        call = _ToolCallOutput.model_validate(value).tool_call
    except ValidationError as exc:
        raise ValueError(describe_validation_error(exc, model=_ToolCallOutput, prefix=f"{where}.")) from None
    return f"{TOOL_CALL_OPEN}\n{json.dumps(call.model_dump(), ensure_ascii=False)}\n{TOOL_CALL_CLOSE}"


def load_script(path: str | Path) -> Script:
    """Read and validate a script file; raises ValueError naming the file and the problem."""
    try:
        data = read_yaml(path)
    except ValueError as exc:
        raise ValueError(f"script {exc}") from None
    if isinstance(data, list):
        data = {"turns": data}
    if not isinstance(data, dict):
        raise ValueError(f"script {path}: expected a list of turns or a mapping with `turns:`")
    try:
        script = Script.model_validate(data)
        script.rounds()
    except ValidationError as exc:
        raise ValueError(f"script {path}: {describe_validation_error(exc, 'script', model=Script)}") from None
    except ValueError as exc:
        raise ValueError(f"script {path}: {exc}") from None
    return script


@dataclass
class _Cursor:
    turn_id: str
    turn: int  # index into the script's turns
    round: int  # index into that turn's outputs


class ScriptedBackend:
    name = "scripted"
    model_name = "scripted"
    tokenizer = None

    def __init__(self, outputs: list[str | BaseException] | None = None, chunk: int = 3, delay: float = 0.0,
                 default: str = "ok", *, turns: list[list[str]] | None = None, source: str = "a list") -> None:
        """`outputs`: one per generate call, in order, then `default`; an exception is
        raised by that call (e.g. InferenceError("busy", …)) to test failure paths.
        `turns`: outputs per user turn and round instead, replayed by every session."""
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {chunk}")
        self.outputs: list[str | BaseException] = list(outputs or [])
        self.turns = turns
        self.chunk = chunk
        self.delay = delay
        self.default = default
        self.warning: str | None = f"scripted backend: answers are replayed from {source}, no model runs"
        self._cursors: dict[str, _Cursor] = {}  # turns mode: where each session is
        # A preemptive answer not yet promoted, by session: (turn_id, cursor before, output
        # taken from `outputs`) — a drop puts them back, so the turn's real answer is the same.
        self._undo: dict[str, tuple[str, _Cursor | None, str | BaseException | None]] = {}
        # What the sessions asked for, for tests and demos; bounded (LOG_LIMIT newest).
        self.requests: _Log[GenerationRequest] = _Log()
        self.prefills: _Log[GenerationRequest] = _Log()
        self.dropped: _Log[str] = _Log()
        self.promoted: _Log[str] = _Log()
        self.forgotten: _Log[str] = _Log()

    @classmethod
    def from_script(cls, path: str | Path) -> ScriptedBackend:
        script = load_script(path)
        return cls(chunk=script.chunk, delay=script.delay_s, default=script.default, turns=script.rounds(),
                   source=str(path))

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def _next_output(self, request: GenerationRequest) -> str | BaseException:
        if self.turns is None:
            taken = self.outputs.pop(0) if self.outputs else None
            if request.preemptive:
                self._undo[request.session_id] = (request.turn_id, None, taken)
            return self.default if taken is None else taken
        cursor = self._cursors.get(request.session_id)
        if request.preemptive:
            before = None if cursor is None else _Cursor(cursor.turn_id, cursor.turn, cursor.round)
            self._undo[request.session_id] = (request.turn_id, before, None)
        if cursor is None:
            cursor = _Cursor(request.turn_id, 0, 0)
        elif cursor.turn_id != request.turn_id:
            cursor = _Cursor(request.turn_id, cursor.turn + 1, 0)
        else:
            cursor.round += 1
        self._cursors[request.session_id] = cursor
        if cursor.turn < len(self.turns) and cursor.round < len(self.turns[cursor.turn]):
            return self.turns[cursor.turn][cursor.round]
        return self.default

    async def generate(self, request: GenerationRequest,
                       stats: GenerationStats | None = None) -> AsyncGenerator[str, None]:
        self.requests.append(request)
        text = self._next_output(request)
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
        undo = self._undo.get(session_id)
        if undo is not None and undo[0] == turn_id:  # a preemptive answer never given: unplay it
            del self._undo[session_id]
            _, cursor, taken = undo
            if self.turns is None:
                if taken is not None:
                    self.outputs.insert(0, taken)
            elif cursor is None:
                self._cursors.pop(session_id, None)
            else:
                self._cursors[session_id] = cursor

    async def promote(self, session_id: str, turn_id: str) -> None:
        self.promoted.append(turn_id)
        self._undo.pop(session_id, None)

    async def forget(self, session_id: str) -> None:
        self._cursors.pop(session_id, None)
        self._undo.pop(session_id, None)
        self.forgotten.append(session_id)
