"""Tools: schema from signatures, streaming parser, concurrent execution, error outcomes."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from pydantic import BaseModel

from agent.inference.base import GenerationRequest, InferenceError
from agent.inference.scripted import ScriptedBackend
from agent.tools import ParsedToolCall, TextPiece, Tool, ToolCallParser, ToolRegistry, format_tool_responses, tool


class Colour(BaseModel):
    r: int
    g: int
    b: int


@tool
def set_light(room: str, on: bool, colour: Colour | None = None) -> str:
    """Switch the light in a room.

    Args:
        room: the room, e.g. kitchen
        on: true to switch it on
    """
    return f"{room}:{'on' if on else 'off'}:{colour.r if colour else '-'}"


@tool(name="clock", description="What time it is.", timeout=5)
async def current_time(timezone: str = "UTC") -> str:
    return f"12:00 {timezone}"


def test_decorator_schema_and_still_callable() -> None:
    assert isinstance(set_light, Tool) and isinstance(current_time, Tool)
    assert set_light("hall", True) == "hall:on:-"  # the function stays callable
    assert set_light.name == "set_light" and set_light.description == "Switch the light in a room."
    props = set_light.parameters["properties"]
    assert props["room"] == {"type": "string", "description": "the room, e.g. kitchen"}
    assert props["on"]["type"] == "boolean"
    assert set_light.parameters["required"] == ["room", "on"]
    assert "Colour" in json.dumps(set_light.parameters)  # nested pydantic model → $defs
    assert current_time.name == "clock" and current_time.timeout == 5
    assert current_time.parameters["properties"]["timezone"]["default"] == "UTC"


def test_system_block_is_qwen25_style() -> None:
    reg = ToolRegistry()
    reg.extend([set_light, current_time])
    assert len(reg) == 2 and reg.get("clock") is current_time and reg.get("nope") is None
    block = reg.system_block()
    assert block.startswith("# Tools\n")
    body = block.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0]
    lines = [json.loads(line) for line in body.splitlines()]
    assert [x["function"]["name"] for x in lines] == ["set_light", "clock"]
    assert all(x["type"] == "function" and "parameters" in x["function"] for x in lines)
    assert block.endswith('<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
    with pytest.raises(ValueError, match="twice"):
        reg.add(set_light)


TEXT = ('Sure, <b>one</b> moment. <tool_call>\n{"name": "set_light", "arguments": {"room": "kitchen", "on": true}}\n'
        '</tool_call> and <tool_call>{"name": "clock", "arguments": {"timezone": "Europe/Paris"}}</tool_call>done <tool')


def _run_parser(chunks: list[str]) -> list[TextPiece | ParsedToolCall]:
    parser = ToolCallParser()
    out: list[TextPiece | ParsedToolCall] = []
    for c in chunks:
        out += parser.feed(c)
    return out + parser.flush()


def _summarise(pieces: list[TextPiece | ParsedToolCall]) -> tuple[str, list[tuple[str | None, dict | None]]]:
    text = "".join(p.text for p in pieces if isinstance(p, TextPiece))
    calls = [(p.name, p.arguments) for p in pieces if isinstance(p, ParsedToolCall)]
    return text, calls


EXPECTED_TEXT = "Sure, <b>one</b> moment.  and done <tool"
EXPECTED_CALLS = [("set_light", {"room": "kitchen", "on": True}), ("clock", {"timezone": "Europe/Paris"})]


def test_parser_every_two_way_split() -> None:
    for i in range(len(TEXT) + 1):
        assert _summarise(_run_parser([TEXT[:i], TEXT[i:]])) == (EXPECTED_TEXT, EXPECTED_CALLS), i


def test_parser_every_three_way_split_and_single_chars() -> None:
    step = 3  # all (i, j) pairs would be ~16k parses: every third start still crosses each tag boundary
    for i in range(0, len(TEXT) + 1, step):
        for j in range(i, len(TEXT) + 1):
            assert _summarise(_run_parser([TEXT[:i], TEXT[i:j], TEXT[j:]])) == (EXPECTED_TEXT, EXPECTED_CALLS)
    assert _summarise(_run_parser(list(TEXT))) == (EXPECTED_TEXT, EXPECTED_CALLS)


def test_parser_streams_text_early_and_never_leaks_calls() -> None:
    parser = ToolCallParser()
    assert parser.feed("Hello wor") == [TextPiece("Hello wor")]  # no reason to hold anything back
    assert parser.feed("ld <tool_") == [TextPiece("ld ")]  # only the possible tag prefix waits
    assert parser.feed('call>{"name": "x", "argu') == []  # inside a call nothing is shown
    assert parser.feed("ments\": {}}</tool_") == []
    (call,) = parser.feed("call>!")[:1]
    assert isinstance(call, ParsedToolCall) and call.name == "x" and call.arguments == {}
    assert parser.flush() == []
    assert ToolCallParser().feed("a <tool_cal b") == [TextPiece("a <tool_cal b")]


def test_parser_bad_calls_are_errors_with_unique_ids() -> None:
    out = _run_parser(['<tool_call>{"name": oops}</tool_call><tool_call>{"arguments": {}}</tool_call>',
                       '<tool_call>{"name": "a", "arguments": [1]}</tool_call><tool_call>{"name": "b"'])
    calls = [p for p in out if isinstance(p, ParsedToolCall)]
    assert len(calls) == 4 and all(c.error for c in calls)
    assert "not valid JSON" in (calls[0].error or "")
    assert "name" in (calls[1].error or "")
    assert "object" in (calls[2].error or "")
    assert "not closed" in (calls[3].error or "") and calls[3].raw == '{"name": "b"'
    assert len({c.call_id for c in calls}) == 4
    assert not [p for p in out if isinstance(p, TextPiece)]


async def test_execute_error_outcomes() -> None:
    @tool
    def boom(x: int) -> int:
        raise RuntimeError(f"broke on {x}")

    @tool
    async def slow() -> str:
        await asyncio.sleep(30)
        return "never"

    @tool
    def raises_timeout() -> None:
        raise TimeoutError("upstream took too long")

    reg = ToolRegistry()
    reg.extend([set_light, boom, slow, raises_timeout])
    calls = [ParsedToolCall.parse(json.dumps(c)) for c in [
        {"name": "set_light", "arguments": {"room": "hall", "on": False, "colour": {"r": 1, "g": 2, "b": 3}}},
        {"name": "nope", "arguments": {}},
        {"name": "set_light", "arguments": {"room": 3}},
        {"name": "boom", "arguments": {"x": 7}},
        {"name": "slow", "arguments": {}},
        {"name": "raises_timeout", "arguments": {}},
    ]] + [ParsedToolCall.parse("{not json")]
    outcomes = await reg.execute(calls, timeout=0.2)
    assert [o.call_id for o in outcomes] == [c.call_id for c in calls]  # call order kept
    ok, unknown, bad, boom_o, slow_o, tmo, bad_json = outcomes
    assert ok.ok and ok.result == "hall:off:1"
    assert not unknown.ok and "unknown tool 'nope'" in (unknown.error or "") and "set_light" in (unknown.error or "")
    assert not bad.ok and "bad arguments for set_light" in (bad.error or "")
    assert "room" in (bad.error or "") and "on" in (bad.error or "")  # both problems named
    assert not boom_o.ok and boom_o.error == "boom failed: RuntimeError: broke on 7"
    assert not slow_o.ok and "timed out after 0.2 s" in (slow_o.error or "")
    assert not tmo.ok and "failed: TimeoutError" in (tmo.error or "")  # not mistaken for our timeout
    assert not bad_json.ok and "not valid JSON" in (bad_json.error or "")

    text = format_tool_responses(outcomes)
    blocks = text.split("\n")
    assert text.count("<tool_response>") == 7 and text.count("</tool_response>") == 7
    first = json.loads(blocks[1])
    assert first == {"name": "set_light", "result": "hall:off:1"}
    assert json.loads(blocks[4])["error"].startswith("unknown tool")


async def test_execute_runs_calls_concurrently() -> None:
    """Each tool waits until all three have started: only concurrent execution gets through."""
    n = 3
    started = 0
    all_in = asyncio.Event()
    thread_in = threading.Event()

    @tool(timeout=10)
    async def meet(i: int) -> int:
        nonlocal started
        started += 1
        if started == n:
            all_in.set()
        await all_in.wait()
        thread_in.set()
        return i

    @tool(timeout=10)
    def blocking_meet(i: int) -> int:
        # A sync tool runs in a thread: the loop stays free, so the async tools can release it.
        return i * 10 if thread_in.wait(10) else -1

    reg = ToolRegistry()
    reg.extend([meet, blocking_meet])
    calls = [ParsedToolCall.parse(json.dumps({"name": "meet", "arguments": {"i": i}})) for i in range(n)]
    calls.append(ParsedToolCall.parse('{"name": "blocking_meet", "arguments": {"i": 4}}'))
    outcomes = await reg.execute(calls, timeout=10)
    assert [o.result for o in outcomes] == [0, 1, 2, 40] and all(o.ok for o in outcomes)


async def test_sync_tool_runs_off_the_loop_thread() -> None:
    seen: list[int] = []

    @tool
    def where() -> bool:
        seen.append(threading.get_ident())
        return True

    (o,) = await ToolRegistry().execute([], 1) or [None]  # empty list: nothing to do
    assert o is None
    reg = ToolRegistry()
    reg.add(where)
    (o,) = await reg.execute([ParsedToolCall.parse('{"name": "where"}')], 1)
    assert o.ok and seen and seen[0] != threading.get_ident()


async def test_scripted_backend_replays_and_records() -> None:
    backend = ScriptedBackend(["hello world", InferenceError("busy", "full")], chunk=4)
    req = GenerationRequest("s", "t1", [{"role": "user", "content": "hi"}], [])
    chunks = [c async for c in backend.generate(req)]
    assert chunks == ["hell", "o wo", "rld"]
    with pytest.raises(InferenceError):
        _ = [c async for c in backend.generate(GenerationRequest("s", "t2", [], []))]
    assert [c async for c in backend.generate(req)] == ["ok"]
    assert [r.turn_id for r in backend.requests] == ["t1", "t2", "t1"]
    with pytest.raises(ValueError):
        ScriptedBackend([], chunk=0)


def test_a_tool_call_with_hostile_json_is_a_clear_error_not_a_crash() -> None:
    deep = '{"name": "x", "arguments": ' + "[" * 60000 + "]" * 60000 + "}"
    huge = '{"name": "x", "arguments": {"n": ' + "9" * 5000 + "}}"
    for raw in (deep, huge):
        call = ParsedToolCall.parse(raw)
        assert call.error is not None and call.error.startswith("tool call is not valid JSON")


def test_tts_settings_refuse_booleans_for_numbers() -> None:
    import pytest
    from pydantic import ValidationError

    from agent.speech.base import TTSSettings

    with pytest.raises(ValidationError):
        TTSSettings(rate=True)
