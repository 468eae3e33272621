"""Tools the model can call, Qwen2.5 (Hermes) style.

The tool schemas go into the system prompt inside `<tools>…</tools>`; the model answers
`<tool_call>{"name": …, "arguments": {…}}</tool_call>`; results go back as
`<tool_response>…</tool_response>` in the next user turn. `ToolCallParser` takes the calls
out of the streamed text so they never reach `response.delta`.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import json
import re
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field, ValidationError, create_model

from agent.context import RunContext
from agent.errors import describe_validation_error
from agent.model.qwen2_audio import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, tool_responses_text, tools_system_block

OPEN, CLOSE = TOOL_CALL_OPEN, TOOL_CALL_CLOSE
_ids = itertools.count(1)


class Tool:
    """A function the model may call; arguments are validated against its signature."""

    def __init__(self, fn: Callable[..., Any], name: str | None = None, description: str | None = None,
                 timeout: float | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"@tool needs a function, got {fn!r}")
        self.fn = fn
        self.name = name or fn.__name__
        summary, arg_docs = _parse_docstring(inspect.getdoc(fn) or "")
        self.description = description or summary
        self.timeout = timeout
        functools.update_wrapper(self, fn)  # the decorated name still looks like the function
        # get_type_hints resolves string annotations (`from __future__ import annotations`).
        try:
            hints = typing.get_type_hints(fn, include_extras=True)
        except NameError as exc:
            raise TypeError(f"tool {self.name!r}: cannot resolve its type hints ({exc}); with "
                            "`from __future__ import annotations` the types must be importable "
                            "from the module, not local to a function") from None
        fields: dict[str, Any] = {}
        self.context_param: str | None = None  # a RunContext parameter: injected, not in the schema
        for pname, param in inspect.signature(fn).parameters.items():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue  # the model can only pass named JSON fields
            annotation = hints.get(pname, Any)
            if annotation is RunContext:
                self.context_param = pname
                continue
            default = ... if param.default is inspect.Parameter.empty else param.default
            doc = arg_docs.get(pname)
            # No Field() without a docstring entry: it would hide an Annotated[..., Field(...)].
            fields[pname] = (annotation, Field(default, description=doc) if doc else default)
        self.model: type[BaseModel] = create_model(f"{self.name}_args", **fields)
        schema = self.model.model_json_schema()
        schema.pop("title", None)
        for prop in schema.get("properties", {}).values():
            prop.pop("title", None)  # noise in the prompt: the key already names it
        self.parameters = schema

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def schema(self) -> dict[str, Any]:
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def validate(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments for the function; raises ValidationError for bad arguments."""
        args = self.model.model_validate(arguments)
        return {k: getattr(args, k) for k in type(args).model_fields}

    async def invoke(self, kwargs: dict[str, Any], context: RunContext | None = None) -> Any:
        if self.context_param is not None:
            kwargs = {**kwargs, self.context_param: context}
        if inspect.iscoroutinefunction(self.fn):
            return await self.fn(**kwargs)
        result = await asyncio.to_thread(self.fn, **kwargs)  # a blocking tool must not stall the loop
        if inspect.isawaitable(result):  # e.g. a lambda or partial wrapping a coroutine function
            result = await result
        return result

    async def call(self, arguments: dict[str, Any], context: RunContext | None = None) -> Any:
        """Validate and run; raises ValidationError for bad arguments."""
        return await self.invoke(self.validate(arguments), context)


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """First paragraph as the description; `Args:` entries (Google style) per parameter."""
    parts = re.split(r"\n\s*(?:Args|Arguments|Parameters):[ \t]*\n", doc, maxsplit=1)
    summary = parts[0].strip()
    args: dict[str, str] = {}
    if len(parts) == 2:
        indent: int | None = None
        current = ""
        for line in parts[1].splitlines():
            if not line.strip():
                break  # the Args section ends at a blank line
            depth = len(line) - len(line.lstrip())
            m = re.match(r"\s*(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)", line)
            if m and (indent is None or depth <= indent):
                indent, current = depth, m.group(1)
                args[current] = m.group(2).strip()
            elif current:  # continuation line
                args[current] = f"{args[current]} {line.strip()}".strip()
    return summary, args


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None, description: str | None = None,
         timeout: float | None = None) -> Any:
    """`@tool` or `@tool(name=…, description=…, timeout=…)` on a sync or async function."""
    if fn is None:
        return lambda f: Tool(f, name, description, timeout)
    return Tool(fn, name, description, timeout)


@dataclass
class TextPiece:
    text: str


@dataclass
class ParsedToolCall:
    raw: str
    call_id: str = field(default_factory=lambda: f"call_{next(_ids)}")
    name: str | None = None
    arguments: dict[str, Any] | None = None
    error: str | None = None  # set when the call itself is malformed

    @classmethod
    def parse(cls, raw: str) -> ParsedToolCall:
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # bad JSON, nesting too deep, an integer too long
            return cls(raw, error=f"tool call is not valid JSON: {exc}")
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return cls(raw, error='tool call needs {"name": str, "arguments": object}')
        arguments = data.get("arguments") or {}
        if isinstance(arguments, str):  # some models double-encode the arguments
            try:
                arguments = json.loads(arguments)
            except (ValueError, RecursionError):
                pass
        if not isinstance(arguments, dict):
            return cls(raw, name=data["name"], error="tool call arguments must be a JSON object")
        return cls(raw, name=data["name"], arguments=arguments)


class ToolCallParser:
    """Streaming: feed text deltas, get text pieces and complete tool calls back.

    Only a possible prefix of `<tool_call>` is held back between deltas; everything else
    is passed on as soon as it arrives. With `calls=False` (a response offered no tools, e.g. a
    transcription) everything is text: nothing the model writes can become a call.
    """

    def __init__(self, calls: bool = True) -> None:
        self._buf = ""
        self._inside = False
        self._calls = calls

    def feed(self, delta: str) -> list[TextPiece | ParsedToolCall]:
        if not self._calls:
            return [TextPiece(delta)] if delta else []
        self._buf += delta
        out: list[TextPiece | ParsedToolCall] = []
        while True:
            if self._inside:
                end = self._buf.find(CLOSE)
                if end < 0:
                    return out
                out.append(ParsedToolCall.parse(self._buf[:end].strip()))
                self._buf, self._inside = self._buf[end + len(CLOSE):], False
                continue
            start = self._buf.find(OPEN)
            if start >= 0:
                if start:
                    out.append(TextPiece(self._buf[:start]))
                self._buf, self._inside = self._buf[start + len(OPEN):], True
                continue
            keep = _partial_suffix(self._buf, OPEN)
            if len(self._buf) > keep:
                out.append(TextPiece(self._buf[: len(self._buf) - keep]))
                self._buf = self._buf[len(self._buf) - keep:]
            return out

    def flush(self) -> list[TextPiece | ParsedToolCall]:
        buf, inside = self._buf, self._inside
        self._buf, self._inside = "", False
        if inside:  # the stream ended inside a call: report it, never show it
            return [ParsedToolCall(buf, error="tool call was not closed with </tool_call>")]
        return [TextPiece(buf)] if buf else []


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


@dataclass
class ToolOutcome:
    call_id: str
    name: str | None
    ok: bool
    result: Any = None
    error: str | None = None


class ToolRegistry:
    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}

    def add(self, item: Tool | Callable[..., Any]) -> Tool:
        t = item if isinstance(item, Tool) else Tool(item)
        if t.name in self._tools:
            raise ValueError(f"tool {t.name!r} is registered twice")
        self._tools[t.name] = t
        return t

    def extend(self, items: Iterable[Tool | Callable[..., Any]]) -> None:
        for item in items:
            self.add(item)

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def __len__(self) -> int:
        return len(self._tools)

    def system_block(self) -> str:
        """The `<tools>` section of the system message."""
        return tools_system_block([t.schema() for t in self._tools.values()])

    def copy(self) -> ToolRegistry:
        """A registry of its own with the same tools (a session's view, changeable alone)."""
        other = ToolRegistry()
        other._tools = dict(self._tools)
        return other

    async def execute(self, calls: list[ParsedToolCall], timeout: float = 10.0,
                      context: RunContext | None = None) -> list[ToolOutcome]:
        """Run the calls concurrently; every failure becomes an outcome the model can read."""
        return list(await asyncio.gather(*(self._run(c, timeout, context) for c in calls)))

    async def _run(self, call: ParsedToolCall, timeout: float, context: RunContext | None) -> ToolOutcome:
        def fail(message: str) -> ToolOutcome:
            return ToolOutcome(call.call_id, call.name, False, error=message)

        if call.error:
            return fail(call.error)
        t = self._tools.get(call.name or "")
        if t is None:
            return fail(f"unknown tool {call.name!r}; available: {', '.join(self._tools) or 'none'}")
        try:
            kwargs = t.validate(call.arguments or {})
        except ValidationError as exc:
            problems = describe_validation_error(exc, "arguments")
            return fail(f"bad arguments for {t.name}: {problems}")
        limit = t.timeout or timeout
        task = asyncio.ensure_future(t.invoke(kwargs, context))
        try:
            done, _ = await asyncio.wait({task}, timeout=limit)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not done:
            # A sync tool keeps its thread until it returns; its result is then dropped.
            task.cancel()
            return fail(f"{t.name} timed out after {limit:g} s")
        try:
            result = task.result()
        except asyncio.CancelledError:
            return fail(f"{t.name} was cancelled")
        except Exception as exc:
            return fail(f"{t.name} failed: {type(exc).__name__}: {exc}")
        return ToolOutcome(call.call_id, t.name, True, result=_jsonable(result))


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):  # not JSON-serialisable: the model still gets something readable
        return str(value)


def format_tool_responses(outcomes: list[ToolOutcome]) -> str:
    """The next user turn: one <tool_response> per call, in call order."""
    return tool_responses_text([{"name": o.name, "result": o.result} if o.ok else {"name": o.name, "error": o.error}
                                for o in outcomes])
