"""Tools the model can call, in its family's syntax (`agent.model.family.ToolSyntax`).

Hermes (the Qwen families, the default): the tool schemas go into the system prompt inside
`<tools>…</tools>`; the model answers `<tool_call>{"name": …, "arguments": {…}}</tool_call>`;
results go back as `<tool_response>…</tool_response>` in the next user turn. Mistral (Voxtral):
`[AVAILABLE_TOOLS]…[/AVAILABLE_TOOLS]`, answers `[TOOL_CALLS][{"name": …, "arguments": …,
"id": …}, …]`, results as `[TOOL_RESULTS]id[TOOL_CONTENT]…[/TOOL_RESULTS]` right after it.
`ToolCallParser` takes the calls out of the streamed text so they never reach `response.delta`.
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
from agent.model.family import ToolSyntax
from agent.model.qwen2_audio import HERMES, TOOL_CALL_CLOSE, TOOL_CALL_OPEN

OPEN, CLOSE = TOOL_CALL_OPEN, TOOL_CALL_CLOSE
_json = json.JSONDecoder()
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
        return cls._from_json(raw, data)

    @classmethod
    def from_json(cls, raw: str, data: Any, new_id: Callable[[], str] | None = None) -> ParsedToolCall:
        """A call from its decoded JSON; its "id" when it has one (Mistral's), else `new_id()`."""
        call = cls._from_json(raw, data)
        given = data.get("id") if isinstance(data, dict) else None
        if isinstance(given, str) and given:
            call.call_id = given
        elif new_id is not None:
            call.call_id = new_id()
        return call

    @classmethod
    def _from_json(cls, raw: str, data: Any) -> ParsedToolCall:
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

    Only a possible prefix of the family's call marker (`syntax.open`: `<tool_call>`,
    `[TOOL_CALLS]`) is held back between deltas; everything else is passed on as soon as it
    arrives. Hermes: each call runs to `</tool_call>`. Mistral: the marker is followed by one JSON
    list of calls (or one call), complete when its brackets close. With `calls=False` (a response
    offered no tools, e.g. a transcription) everything is text: nothing the model writes can
    become a call.
    """

    def __init__(self, calls: bool = True, syntax: ToolSyntax = HERMES) -> None:
        self._buf = ""
        self._inside = False
        self._calls = calls
        self._syntax = syntax

    def feed(self, delta: str) -> list[TextPiece | ParsedToolCall]:
        if not self._calls:
            return [TextPiece(delta)] if delta else []
        self._buf += delta
        out: list[TextPiece | ParsedToolCall] = []
        opening = self._syntax.open
        while True:
            if self._inside:
                calls = self._close()
                if calls is None:
                    return out
                out += calls
                continue
            start = self._buf.find(opening)
            if start >= 0:
                if start:
                    out.append(TextPiece(self._buf[:start]))
                self._buf, self._inside = self._buf[start + len(opening):], True
                continue
            keep = _partial_suffix(self._buf, opening)
            if len(self._buf) > keep:
                out.append(TextPiece(self._buf[: len(self._buf) - keep]))
                self._buf = self._buf[len(self._buf) - keep:]
            return out

    def _close(self) -> list[ParsedToolCall] | None:
        """The calls that end in the buffer (after the marker), the buffer moved past them;
        None while they are not complete."""
        if self._syntax.close:
            end = self._buf.find(self._syntax.close)
            if end < 0:
                return None
            raw = self._buf[:end].strip()
            self._buf, self._inside = self._buf[end + len(self._syntax.close):], False
            return [ParsedToolCall.parse(raw)]
        text = self._buf.lstrip()
        if not text:
            return None
        if text[0] not in "[{":
            return None  # no JSON follows: the rest of the answer is a malformed call (`flush`)
        try:
            data, end = _json.raw_decode(text)
        except (ValueError, RecursionError):
            return None  # not complete yet (or never: `flush` reports it)
        raw = text[:end]
        self._buf, self._inside = text[end:], False
        items = data if isinstance(data, list) else [data]
        if not items:
            return [ParsedToolCall(raw, error="tool call list is empty", call_id=self._new_id())]
        return [ParsedToolCall.from_json(raw, item, self._syntax.new_call_id) for item in items]

    def _new_id(self) -> str:
        return self._syntax.new_call_id() if self._syntax.new_call_id else f"call_{next(_ids)}"

    def flush(self) -> list[TextPiece | ParsedToolCall]:
        buf, inside = self._buf, self._inside
        self._buf, self._inside = "", False
        if inside:  # the stream ended inside a call: report it, never show it
            if self._syntax.close:
                return [ParsedToolCall(buf, error=f"tool call was not closed with {self._syntax.close}")]
            if not buf.lstrip().startswith(("[", "{")):
                return [ParsedToolCall(buf, error="tool call is not a JSON list of calls", call_id=self._new_id())]
            try:
                json.loads(buf)
            except (ValueError, RecursionError) as exc:
                return [ParsedToolCall(buf, error=f"tool call is not valid JSON: {exc}", call_id=self._new_id())]
            return [ParsedToolCall(buf, error="tool call is not a JSON list of calls", call_id=self._new_id())]
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

    def system_block(self, syntax: ToolSyntax = HERMES) -> str:
        """The tools' declaration in the system message (Hermes: the `<tools>` section)."""
        return syntax.tools_block([t.schema() for t in self._tools.values()])

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


def format_tool_responses(outcomes: list[ToolOutcome], syntax: ToolSyntax = HERMES) -> str:
    """The history entry that returns a round's results, in call order, in the family's syntax
    (Hermes: a user turn of <tool_response> blocks; Mistral: `[TOOL_RESULTS]` blocks)."""
    return syntax.results_text([{"call_id": o.call_id, "name": o.name, "result": o.result} if o.ok else
                                {"call_id": o.call_id, "name": o.name, "error": o.error} for o in outcomes])
