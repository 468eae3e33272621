"""examples/home_assistant.py as a user runs it, against a local fake Home Assistant."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import os
import sys
from pathlib import Path

import pytest

from agent import events as ev
from agent.inference.scripted import ScriptedBackend
from tests.fake_homeassistant import TOKEN, running_fake_ha
from tests.mosquitto import free_port, until

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "home_assistant.py"
TURN_ON = '<tool_call>{"name": "HassTurnOn", "arguments": {"entity_id": "light.kitchen"}}</tool_call>'


def load_example():
    spec = importlib.util.spec_from_file_location("home_assistant_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def one_utterance(make_speech_fixture):
    return make_speech_fixture([0.8, "turn on the kitchen light", 1.0], "ha-one")


async def events_of(agent, speech, backend: ScriptedBackend) -> list[ev.Event]:
    out = io.StringIO()
    code = await agent.run_files([str(speech.path)], jsonl=True, out=out, backend=backend)
    assert code == 0
    return [ev.parse_event(line) for line in out.getvalue().splitlines()]


async def test_spoken_command_turns_on_the_light(one_utterance):
    example = load_example()
    async with running_fake_ha() as (fake, url):
        agent = example.home_assistant_agent(url, TOKEN)
        backend = ScriptedBackend([TURN_ON, "The kitchen light is on."])
        events = await events_of(agent, one_utterance, backend)
    assert fake.calls == [("light", "turn_on", {"entity_id": "light.kitchen"})]
    assert fake.states["light.kitchen"]["state"] == "on"
    (call,) = [e for e in events if isinstance(e, ev.ToolCall)]
    (result,) = [e for e in events if isinstance(e, ev.ToolResult)]
    assert call.name == "HassTurnOn" and result.ok and result.call_id == call.call_id
    (done,) = [e for e in events if isinstance(e, ev.ResponseDone)]
    assert done.text == "The kitchen light is on."
    system = backend.requests[0].messages[0]["content"]
    # The example's instructions, the states of the allowed entities, the tools; not the lock.
    assert "voice of this house" in system and "light.kitchen, Kitchen: off" in system
    assert '"HassTurnOn"' in system and "lock.front_door" not in system
    assert "light.turn_on done for light.kitchen" in str(backend.requests[1].messages[-1]["content"])  # the result went back


async def test_a_new_session_sees_the_house_as_it_is_now(one_utterance):
    """States that changed after start (HA's state_changed events) reach the next session's
    prompt, so the model is not told that a light it just switched on is off."""
    example = load_example()
    async with running_fake_ha() as (fake, url):
        runtime = example.home_assistant_agent(url, TOKEN).runtime(backend=ScriptedBackend([TURN_ON, "Done."]))
        await runtime.start()
        try:
            (plugin,) = runtime.plugins.running
            await until(lambda: plugin.ws_ready.is_set() and fake.sockets, what="websocket subscription")
            first = runtime.create_session(wait_for_responses=True)
            assert "light.kitchen, Kitchen: off" in first.conversation.system_prompt
            await first.push_audio(one_utterance.samples)
            await first.finish()
            await until(lambda: plugin.states["light.kitchen"]["state"] == "on", what="state_changed")
            second = runtime.create_session()
            assert "light.kitchen, Kitchen: on" in second.conversation.system_prompt
            assert "voice of this house" in second.conversation.system_prompt
            assert "light.kitchen, Kitchen: off" in first.conversation.system_prompt  # its cache stays valid
        finally:
            await runtime.close()


@pytest.mark.parametrize("failure", ["bad_token", "unreachable"])
async def test_home_assistant_down_gives_a_tool_error_and_the_turn_still_answers(one_utterance, failure):
    example = load_example()
    async with running_fake_ha() as (fake, url):
        if failure == "bad_token":
            agent = example.home_assistant_agent(url, "not-the-token")
            expected = "401"
        else:
            agent = example.home_assistant_agent(f"http://127.0.0.1:{free_port()}", TOKEN)
            expected = "unreachable"
        backend = ScriptedBackend([TURN_ON, "Sorry, I cannot reach the house right now."])
        events = await events_of(agent, one_utterance, backend)
    assert fake.calls == []
    (result,) = [e for e in events if isinstance(e, ev.ToolResult)]
    assert not result.ok and expected in (result.error or "")
    (done,) = [e for e in events if isinstance(e, ev.ResponseDone)]
    assert done.text == "Sorry, I cannot reach the house right now."
    assert expected in str(backend.requests[1].messages[-1]["content"])  # the model saw why
    assert events[-1].type == "session.ended"


async def example_process(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, str(EXAMPLE), *args,
                                                env={**os.environ, **env}, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 240)
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.slow
async def test_example_runs_as_a_program_with_the_real_pipeline(one_utterance):
    env = {"HA_TOKEN": ""}
    code, out, err = await example_process("run", str(one_utterance.path), env={**env, "HA_URL": "http://127.0.0.1:1"})
    assert code == 2 and "HA_TOKEN" in err and out == ""

    async with running_fake_ha() as (fake, url):
        code, out, err = await example_process("run", "--model", "tiny-random", "--max-new-tokens", "4",
                                               "--jsonl", str(one_utterance.path),
                                               env={"HA_URL": url, "HA_TOKEN": TOKEN})
    assert code == 0, err
    events = [ev.parse_event(line) for line in out.splitlines()]
    assert fake.state_reads >= 1  # the plugin read the house with the token
    assert [e.type for e in events if e.type in ("turn.committed", "response.done")] == \
        ["turn.committed", "response.done"]
