"""The scripted backend as a user drives it: a script file per turn, tool calls included (issue 15 item 5)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from agent import Agent, tool
from agent import events as ev
from agent.config import load_settings
from agent.conversation import Conversation
from agent.inference.scripted import LOG_LIMIT, ScriptedBackend, load_script
from agent.runtime import create_backend

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "scripts"


def request(session: str, turn: str):
    conv = Conversation()
    conv.add_user(np.zeros(1600, np.float32))
    return conv.request(session, turn)


async def answer(backend: ScriptedBackend, session: str, turn: str) -> str:
    return "".join([piece async for piece in backend.generate(request(session, turn))])


async def test_each_turn_replays_its_rounds_and_every_session_starts_at_the_top(tmp_path: Path) -> None:
    script = tmp_path / "s.yaml"
    script.write_text("turns:\n"
                      "  - - tool_call: {name: set_light, arguments: {room: kitchen, 'on': true}}\n"
                      "    - The kitchen light is on.\n"
                      "  - Goodbye.\n"
                      "default: nothing more\n"
                      "delay_s: 0\n")
    backend = create_backend(load_settings(None, backend="scripted", script=str(script)))
    assert isinstance(backend, ScriptedBackend) and "scripted" in (backend.warning or "")
    first = await answer(backend, "a", "a-t1")
    assert first.startswith("<tool_call>") and '"name": "set_light"' in first
    assert await answer(backend, "a", "a-t1") == "The kitchen light is on."  # the round after the tool result
    assert await answer(backend, "b", "b-t1") == first  # another session starts at the top
    assert await answer(backend, "a", "a-t2") == "Goodbye."
    assert await answer(backend, "a", "a-t3") == "nothing more"
    await backend.forget("a")
    assert await answer(backend, "a", "a-t1") == first


async def test_request_log_is_bounded() -> None:
    backend = ScriptedBackend([])
    for i in range(LOG_LIMIT + 50):
        await answer(backend, f"s{i}", "t1")
        await backend.prefill(request(f"s{i}", "t2"))
        await backend.drop(f"s{i}", "t2")
        await backend.forget(f"s{i}")
    assert len(backend.requests) == len(backend.prefills) == len(backend.dropped) == LOG_LIMIT
    assert len(backend.forgotten) == LOG_LIMIT
    assert backend.requests[-1].session_id == f"s{LOG_LIMIT + 49}"  # the newest are kept


def test_the_shipped_example_scripts_load() -> None:
    for path in EXAMPLES.glob("*.yaml"):
        assert load_script(path).rounds()


@pytest.mark.parametrize("text, problem", [
    ("turns: []\n", "turns: List should have at least 1 item"),
    ("- [hi, 3]\n", "turns.0.1: expected text or {tool_call"),
    ("- {tool_call: {name: x, arguments: 5}}\n", "turns.0.tool_call.arguments: Input should be a valid dictionary"),
    ("turns: [a]\nchunk: 0\n", "chunk: must be 1 or more, not 0"),
    ("turns: [a]\ndelay: 1\n", "delay: unknown key (did you mean delay_s?)"),
    ("- 'unclosed\n", "line 2, column 1: found unexpected end of stream"),
])
def test_bad_scripts_say_what_and_where(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        load_script(path)
    assert str(info.value).startswith(f"script {path}") and problem in str(info.value)


@tool
def set_light(room: str, on: bool) -> str:
    """Switch the light in a room on or off."""
    return f"the {room} light is {'on' if on else 'off'}"


async def test_a_file_run_shows_the_tool_call_with_no_model(speech_two) -> None:
    """What the README's no-GPU snippet does, in-process: the example script drives a real tool."""
    agent = Agent(tools=[set_light], backend="scripted", script=str(EXAMPLES / "custom_tools.yaml"))
    out = io.StringIO()
    assert await agent.run_files([str(speech_two.path)], jsonl=True, out=out) == 0
    events = [ev.parse_event(line) for line in out.getvalue().splitlines()]
    assert isinstance(events[0], ev.SessionStarted) and "scripted" in (events[0].warning or "")
    (call, *_), (result, *_) = ([e for e in events if isinstance(e, k)] for k in (ev.ToolCall, ev.ToolResult))
    assert call.name == "set_light" and call.arguments == {"room": "kitchen", "on": True}
    assert result.ok and result.result == "the kitchen light is on"
    done = [e.text for e in events if isinstance(e, ev.ResponseDone)]
    assert done[0] == "The kitchen light is on."  # speech_two has two turns: the second is the script's second


async def test_the_readme_home_assistant_flow_with_no_gpu(make_speech_fixture) -> None:
    """`python examples/home_assistant.py run --backend scripted --script …` against a (fake) Home
    Assistant: the spoken command's scripted tool call really switches the light."""
    import asyncio
    import os
    import sys

    from tests.fake_homeassistant import TOKEN, running_fake_ha

    speech = make_speech_fixture([0.8, "turn on the kitchen light", 1.0], "ha-one")
    root = EXAMPLES.parent.parent
    async with running_fake_ha() as (fake, url):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(root / "examples" / "home_assistant.py"), "run", "--backend", "scripted",
            "--script", str(EXAMPLES / "home_assistant.yaml"), str(speech.path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(root), "HA_URL": url, "HA_TOKEN": TOKEN})
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    assert fake.calls == [("light", "turn_on", {"entity_id": "light.kitchen"})]
    text = out.decode()
    assert "warning: scripted backend" in text and "tool call: HassTurnOn({'entity_id': 'light.kitchen'})" in text
    assert "tool result: light.turn_on done for light.kitchen" in text and "The kitchen light is on." in text
