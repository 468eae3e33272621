"""Tool calls in each family's syntax: Voxtral's `[TOOL_CALLS]` + JSON list, read while it
streams, gives the same calls as the Hermes path; its results go back as mistral-common writes
them (the prompt token-identical to mistral-common's own encoding of the chat)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent import events as ev
from agent.config import load_settings
from agent.conversation import Conversation
from agent.inference.scripted import ScriptedBackend
from agent.model import family as families
from agent.model import voxtral
from agent.runtime import AgentRuntime
from agent.tools import (
    ParsedToolCall,
    TextPiece,
    ToolCallParser,
    ToolOutcome,
    ToolRegistry,
    format_tool_responses,
    tool,
)
from tests.test_tools import EXPECTED_CALLS, TEXT, _summarise

VOXTRAL = families.for_model_type("voxtral")
MISTRAL = VOXTRAL.tool_syntax
# the same answer as tests/test_tools.py's TEXT, as Voxtral writes it: the calls are one list at the end
VOX_TEXT = ('Sure, <b>one</b> moment. [TOOL_CALLS][{"name": "set_light", "arguments": {"room": "kitchen", '
            '"on": true}, "id": "a1b2c3d4e"}, {"name": "clock", "arguments": {"timezone": "Europe/Paris"}}]')
VOX_EXPECTED_TEXT = "Sure, <b>one</b> moment. "


def run_parser(chunks: list[str]) -> list[TextPiece | ParsedToolCall]:
    parser = ToolCallParser(syntax=MISTRAL)
    out: list[TextPiece | ParsedToolCall] = []
    for c in chunks:
        out += parser.feed(c)
    return out + parser.flush()


def hermes_calls() -> list[tuple[str | None, dict | None]]:
    parser = ToolCallParser()
    return _summarise(parser.feed(TEXT) + parser.flush())[1]


def test_voxtral_calls_every_two_and_three_way_split() -> None:
    assert hermes_calls() == EXPECTED_CALLS
    for i in range(len(VOX_TEXT) + 1):  # inside the marker, inside the JSON, between calls
        assert _summarise(run_parser([VOX_TEXT[:i], VOX_TEXT[i:]])) == (VOX_EXPECTED_TEXT, EXPECTED_CALLS), i
    for i in range(0, len(VOX_TEXT) + 1, 5):
        for j in range(i, len(VOX_TEXT) + 1, 2):
            pieces = run_parser([VOX_TEXT[:i], VOX_TEXT[i:j], VOX_TEXT[j:]])
            assert _summarise(pieces) == (VOX_EXPECTED_TEXT, EXPECTED_CALLS), (i, j)
    pieces = run_parser(list(VOX_TEXT))
    assert _summarise(pieces) == (VOX_EXPECTED_TEXT, EXPECTED_CALLS)
    ids = [p.call_id for p in pieces if isinstance(p, ParsedToolCall)]
    assert ids[0] == "a1b2c3d4e"  # the model's own id, which its results must carry back
    assert len(ids[1]) == 9 and ids[1].isalnum()  # none written: one mistral-common accepts


def test_voxtral_parser_streams_and_holds_back_only_the_marker() -> None:
    parser = ToolCallParser(syntax=MISTRAL)
    assert parser.feed("Hello [wor") == [TextPiece("Hello [wor")]  # not a prefix of [TOOL_CALLS]
    assert parser.feed("ld] [TOOL_") == [TextPiece("ld] ")]
    assert parser.feed('CALLS][{"name": "x", "argu') == []
    assert parser.feed('ments": {"s": "a]}"}}') == []  # brackets inside strings do not close it
    call, after = parser.feed("] after")
    assert isinstance(call, ParsedToolCall) and call.name == "x" and call.arguments == {"s": "a]}"}
    assert after == TextPiece(" after") and parser.flush() == []
    # one call object without the list, as some Mistral models write it
    assert _summarise(run_parser(['[TOOL_CALLS]{"name": "x", "arguments": {}}']))[1] == [("x", {})]
    # a Hermes tag means nothing to Voxtral's parser, and the other way round
    assert _summarise(run_parser(["<tool_call>{}</tool_call>"])) == ("<tool_call>{}</tool_call>", [])
    assert _summarise(ToolCallParser().feed("[TOOL_CALLS][]")) == ("[TOOL_CALLS][]", [])


def test_voxtral_bad_calls_are_errors() -> None:
    cases = {'[TOOL_CALLS][{"name": "a", "arguments": {"x": ': "not valid JSON",
             "[TOOL_CALLS] sorry": "not a JSON list",
             "[TOOL_CALLS][]": "empty",
             '[TOOL_CALLS][{"arguments": {}}]': "name",
             '[TOOL_CALLS][{"name": "a", "arguments": [1]}]': "object"}
    for text, error in cases.items():
        for chunks in ([text], list(text)):
            out = run_parser(chunks)
            calls = [p for p in out if isinstance(p, ParsedToolCall)]
            assert len(calls) == 1 and error in (calls[0].error or ""), (text, calls)
            assert not "".join(p.text for p in out if isinstance(p, TextPiece))


def test_results_in_each_familys_format() -> None:
    outcomes = [ToolOutcome("a1b2c3d4e", "set_light", True, result="kitchen light on"),
                ToolOutcome("Zz9Zz9Zz9", "clock", True, result={"time": "12:00"}),
                ToolOutcome("q1q1q1q1q", "nope", False, error="unknown tool 'nope'")]
    assert format_tool_responses(outcomes, MISTRAL) == (
        "[TOOL_RESULTS]a1b2c3d4e[TOOL_CONTENT]kitchen light on[/TOOL_RESULTS]"
        '[TOOL_RESULTS]Zz9Zz9Zz9[TOOL_CONTENT]{"time": "12:00"}[/TOOL_RESULTS]'
        """[TOOL_RESULTS]q1q1q1q1q[TOOL_CONTENT]{"error": "unknown tool 'nope'"}[/TOOL_RESULTS]""")
    hermes = format_tool_responses(outcomes)  # the default: unchanged
    assert hermes.count("<tool_response>") == 3 and '{"name": "set_light", "result": "kitchen light on"}' in hermes


@tool
def get_weather(city: str, unit: str = "celsius") -> dict:
    """The weather in a city.

    Args:
        city: its name
        unit: celsius or fahrenheit
    """
    return {"city": city, "temp": 21}


@pytest.fixture(scope="module")
def tekken(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("mistral_common")
    from agent.inference import voxtral_tiny

    directory: Path = tmp_path_factory.mktemp("tekken")
    (directory / "tekken.json").write_text(json.dumps(voxtral_tiny.tekken_json()))
    return voxtral_tiny.load_tokenizer(directory)


def test_voxtral_tool_round_prompt_is_mistral_commons(tekken: Any) -> None:
    """A chat with tools, two tool calls, their results, an answer and a next turn: the engine's
    prompt equals mistral-common's encoding of the same chat (tokenizer v7), token for token."""
    from agent.inference.prompts import SegmentTokenizer, build_prompt

    registry = ToolRegistry()
    registry.add(get_weather)
    calls = [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abc123xyz"},
             {"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}, "id": "Def456uvw"}]
    outcomes = [ToolOutcome("abc123xyz", "get_weather", True, result={"city": "Paris", "temp": 21}),
                ToolOutcome("Def456uvw", "get_weather", False, error="bad arguments for get_weather: city")]
    conv = Conversation("Be brief.", 10**6, family=VOXTRAL)
    block = registry.system_block(MISTRAL)
    theirs: list[dict[str, Any]] = [{"role": "system", "content": "Be brief."}]
    segments = SegmentTokenizer(tekken, special_re=VOXTRAL.special_re)
    audio_id = tekken.convert_tokens_to_ids("[AUDIO]")

    def check(expected: list[dict[str, Any]]) -> None:
        ours = build_prompt(segments, audio_id, conv.request("s", "t", 16, block), VOXTRAL).ids
        encoded = tekken.apply_chat_template(expected, tools=[get_weather.schema()], tokenize=True)
        assert ours == list(encoded["input_ids"])

    conv.add_user_text("Weather in Paris and Rome?")
    theirs.append({"role": "user", "content": "Weather in Paris and Rome?"})
    check(theirs)
    conv.add_assistant(f"[TOOL_CALLS]{json.dumps(calls)}")  # what the engine decodes of such an answer
    conv.add_tool_results(format_tool_responses(outcomes, MISTRAL))
    theirs.append({"role": "assistant", "tool_calls": [
        {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}}
        for c in calls]})
    theirs += [{"role": "tool", "tool_call_id": "abc123xyz", "content": json.dumps(outcomes[0].result)},
               {"role": "tool", "tool_call_id": "Def456uvw", "content": json.dumps({"error": outcomes[1].error})}]
    check(theirs)
    conv.add_assistant("Paris: 21 degrees.")
    conv.add_user_text("Thanks!")
    theirs += [{"role": "assistant", "content": "Paris: 21 degrees."}, {"role": "user", "content": "Thanks!"}]
    check(theirs)  # the tools move to the last user turn, as mistral-common writes them


def test_the_engine_decodes_voxtrals_marker(tekken: Any) -> None:
    """Decoding skips special tokens; `[TOOL_CALLS]` is kept, so the parser sees it."""
    from agent.inference.prompts import Detokenizer, kept_specials

    kept = kept_specials(tekken, VOXTRAL)
    marker = tekken.convert_tokens_to_ids("[TOOL_CALLS]")
    assert kept == {marker: "[TOOL_CALLS]"}
    ids = [*tekken("Ok. ", add_special_tokens=False)["input_ids"], marker,
           *tekken('[{"name": "x", "arguments": {}}]', add_special_tokens=False)["input_ids"],
           tekken.convert_tokens_to_ids("</s>")]
    for keep, expected in ((kept, 'Ok. [TOOL_CALLS][{"name": "x", "arguments": {}}]'),
                           ({}, 'Ok. [{"name": "x", "arguments": {}}]')):
        detok = Detokenizer(tekken, keep)
        assert "".join(detok.push(i) for i in ids) + detok.flush() == expected
    assert kept_specials(tekken, families.default()) == {}  # Hermes' tag is text


async def test_a_voxtral_session_runs_its_tool_calls(speech_two: Any) -> None:
    """A session whose backend serves Voxtral: the same tool.call and tool.result events as the
    Hermes path, no markup in the deltas, the results sent back as `[TOOL_RESULTS]`."""
    @tool
    def set_light(room: str, on: bool) -> str:
        """Switch a light."""
        return f"{room} light {'on' if on else 'off'}"

    backend = ScriptedBackend(['Sure. [TOOL_CALLS][{"name": "set_light", "arguments": {"room": "kitchen", '
                               '"on": true}, "id": "k1t2c3h4n"}]', "Done: the light is on."], chunk=4)
    backend.family = VOXTRAL  # type: ignore[attr-defined]
    runtime = AgentRuntime(load_settings(None, model="tiny-random"), backend=backend, tools=[set_light])
    await runtime.start()
    sub = runtime.bus.subscribe()
    session = runtime.create_session(wait_for_responses=True)
    samples = speech_two.samples[: int(3.2 * 16000)]
    for i in range(0, samples.size, 8000):
        await session.push_audio(samples[i : i + 8000])
    await session.finish()
    events = []
    while not sub.queue.empty():
        events.append(sub.queue.get_nowait())
    await runtime.close()
    calls = [e for e in events if isinstance(e, ev.ToolCall)]
    results = [e for e in events if isinstance(e, ev.ToolResult)]
    assert [(c.name, c.arguments, c.call_id) for c in calls] == [("set_light", {"room": "kitchen", "on": True}, "k1t2c3h4n")]
    assert results[0].ok and results[0].result == "kitchen light on" and results[0].call_id == "k1t2c3h4n"
    deltas = "".join(e.text for e in events if isinstance(e, ev.ResponseDelta))
    assert deltas == "Sure. Done: the light is on." and "TOOL" not in deltas
    first, second = backend.requests
    prompt = voxtral.render_prompt(first.messages)
    assert prompt.count("[AVAILABLE_TOOLS]") == 1 and "<tools>" not in prompt
    assert second.messages[-1] == {"role": "tool",
                                   "content": "[TOOL_RESULTS]k1t2c3h4n[TOOL_CONTENT]kitchen light on[/TOOL_RESULTS]"}


def test_voxtral_results_go_on_the_openai_wire_as_a_user_turn() -> None:
    from agent.model.qwen2_audio import to_openai_messages

    conv = Conversation(None, 10**6, family=VOXTRAL)
    conv.add_user_text("lights?")
    conv.add_assistant('[TOOL_CALLS][{"name": "x", "arguments": {}, "id": "abcdefghi"}]')
    conv.add_tool_results(format_tool_responses([ToolOutcome("abcdefghi", "x", True, result=1)], MISTRAL))
    wire = to_openai_messages(conv.request("s", "t").messages, [])
    assert wire[-1] == {"role": "user", "content": "[TOOL_RESULTS]abcdefghi[TOOL_CONTENT]1[/TOOL_RESULTS]"}


def test_voxtral_tools_block_leaves_the_system_text_around_it() -> None:
    block = voxtral.tools_block([get_weather.schema()])
    for system, left in ((block, None), (f"Be brief.\n\n{block}", "Be brief."), (f"{block}\n\nSay hi.", "Say hi."),
                         (f"Be brief.\n\n{block}\n\nSay hi.", "Be brief.\n\nSay hi.")):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": "hi"}]
        expected = "<s>" + ("" if left is None else f"[SYSTEM_PROMPT]{left}[/SYSTEM_PROMPT]") + f"{block}[INST]hi[/INST]"
        assert voxtral.render_prompt(messages) == expected
