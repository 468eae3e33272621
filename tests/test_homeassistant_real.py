"""examples/home_assistant.py against a REAL Home Assistant (2024.3.3 from PyPI, in its own venv;
see tests/homeassistant_server.py): spoken turns whose scripted model output calls the tools,
checked against HA's own states."""

from __future__ import annotations

import json
import logging

import pytest

from agent import events as ev
from agent.inference.scripted import ScriptedBackend
from tests.homeassistant_server import HA_VERSION, HomeAssistant, InstallError, install, pypi_reachable
from tests.mosquitto import until
from tests.test_example_home_assistant import events_of, load_example

# The first test also installs Home Assistant (~30 s to 2 min, once per machine).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
log = logging.getLogger(__name__)


def tool_call(name: str, **arguments: object) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


@pytest.fixture(scope="module")
def ha(tmp_path_factory):
    try:
        venv, seconds = install()
    except InstallError:
        if not pypi_reachable():
            pytest.skip(f"cannot install Home Assistant {HA_VERSION}: PyPI is unreachable")
        raise
    if seconds is not None:
        log.warning("installed Home Assistant %s in %.0f s", HA_VERSION, seconds)
    with HomeAssistant(tmp_path_factory.mktemp("ha"), venv).start() as server:
        yield server


@pytest.fixture
def house(ha):
    """The house as each test starts: kitchen light off at 0, heater on, hall thermostat at 19°."""
    ha.call("light", "turn_off", entity_id="light.kitchen")
    ha.call("input_number", "set_value", entity_id="input_number.kitchen_level", value=0)
    ha.call("switch", "turn_on", entity_id="switch.heater")
    ha.call("climate", "set_temperature", entity_id="climate.hall", temperature=19)
    return ha


@pytest.fixture(scope="module")
def one_utterance(make_speech_fixture):
    return make_speech_fixture([0.8, "turn on the kitchen light", 1.0], "ha-one")


async def test_spoken_command_turns_on_the_real_light(house, one_utterance):
    agent = load_example().home_assistant_agent(house.url, house.token)
    backend = ScriptedBackend([tool_call("HassTurnOn", entity_id="light.kitchen"), "The kitchen light is on."])
    events = await events_of(agent, one_utterance, backend)

    assert house.state("light.kitchen")["state"] == "on"
    (call,) = [e for e in events if isinstance(e, ev.ToolCall)]
    (result,) = [e for e in events if isinstance(e, ev.ToolResult)]
    assert call.name == "HassTurnOn" and result.ok and result.call_id == call.call_id, result.error
    (done,) = [e for e in events if isinstance(e, ev.ResponseDone)]
    assert done.text == "The kitchen light is on."
    # The real entities of the allowed domains (light, switch, fan, climate), as HA reported them.
    system = backend.requests[0].messages[0]["content"]
    assert "voice of this house" in system
    assert "- light.kitchen, Kitchen: off" in system
    assert "- switch.heater, Heater: on" in system
    assert "- climate.hall, Hall: heat, target 19.0°" in system
    assert "input_boolean" not in system and "sensor.hall_temperature" not in system
    assert "light.turn_on done for light.kitchen" in str(backend.requests[1].messages[-1]["content"])


async def test_brightness_and_thermostat_change_real_states(house, one_utterance):
    agent = load_example().home_assistant_agent(house.url, house.token)
    backend = ScriptedBackend([
        tool_call("HassLightSet", entity_id="light.kitchen", brightness_pct=40)
        + tool_call("HassClimateSetTemperature", entity_id="climate.hall", temperature=21.5)
        + tool_call("HassGetState", entity_id="switch.heater")  # the calls run concurrently
        + tool_call("HassTurnOn", entity_id="light.cellar"),  # allowed domain, no such entity
        "Kitchen at 40 percent, hall at 21.5 degrees.",
    ])
    events = await events_of(agent, one_utterance, backend)

    light = house.state("light.kitchen")
    assert light["state"] == "on" and light["attributes"]["brightness"] == 102  # 40 % of 255
    assert house.state("climate.hall")["attributes"]["temperature"] == 21.5
    results = [e for e in events if isinstance(e, ev.ToolResult)]
    assert [r.ok for r in results] == [True, True, True, False], [r.error for r in results]
    assert results[2].result["state"] == "on" and results[2].result["attributes"]["friendly_name"] == "Heater"
    assert "no entity light.cellar" in (results[3].error or "")  # not "done": HA answers 200 [] to it
    (done,) = [e for e in events if isinstance(e, ev.ResponseDone)]
    assert done.text == "Kitchen at 40 percent, hall at 21.5 degrees."


async def test_the_states_mirror_follows_changes_made_in_home_assistant(house):
    runtime = load_example().home_assistant_agent(house.url, house.token).runtime(backend=ScriptedBackend([]))
    await runtime.start()
    try:
        (plugin,) = runtime.plugins.running
        await until(plugin.ws_ready.is_set, what="websocket subscription")
        assert plugin.states["switch.heater"]["state"] == "on"

        house.call("switch", "turn_off", entity_id="switch.heater")  # straight through HA's REST API
        await until(lambda: plugin.states["switch.heater"]["state"] == "off", what="state_changed")
        assert "- switch.heater, Heater: off" in runtime.create_session().conversation.system_prompt

        # An entity that appears, then goes away; and one the agent may not see.
        status, _ = house.request("POST", "/api/states/light.porch",
                                  {"state": "on", "attributes": {"friendly_name": "Porch"}})
        assert status == 201
        await until(lambda: "light.porch" in plugin.states, what="new entity")
        assert "- light.porch, Porch: on" in runtime.create_session().conversation.system_prompt
        assert house.request("DELETE", "/api/states/light.porch")[0] == 200
        await until(lambda: "light.porch" not in plugin.states, what="removed entity")
        house.call("input_boolean", "toggle", entity_id="input_boolean.kitchen_power")
        await until(lambda: plugin.states["light.kitchen"]["state"] == "on", what="templated light")
        assert not any(e.startswith("input_boolean.") for e in plugin.states)
    finally:
        await runtime.close()


async def test_bad_token_gives_a_401_tool_error_and_the_turn_still_answers(house, one_utterance):
    agent = load_example().home_assistant_agent(house.url, "not-a-token")
    backend = ScriptedBackend([tool_call("HassTurnOn", entity_id="light.kitchen"),
                               "Sorry, the house does not accept me right now."])
    events = await events_of(agent, one_utterance, backend)

    assert house.state("light.kitchen")["state"] == "off"
    (result,) = [e for e in events if isinstance(e, ev.ToolResult)]
    assert not result.ok and "401" in (result.error or "")
    (done,) = [e for e in events if isinstance(e, ev.ResponseDone)]
    assert done.text == "Sorry, the house does not accept me right now."
    assert "401" in str(backend.requests[1].messages[-1]["content"])  # the model saw why
    assert events[-1].type == "session.ended"
