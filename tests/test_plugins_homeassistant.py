"""Home Assistant plugin against a local aiohttp server that speaks the HA API it uses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.bus import EventBus
from agent.events import ResponseDone, SpeechStarted, SpeechStopped
from agent.plugin import PluginContext, PluginHost
from agent.tools import ParsedToolCall, ToolRegistry
from plugins.homeassistant import HomeAssistantPlugin
from tests.fake_homeassistant import TOKEN, running_fake_ha
from tests.mosquitto import Broker, FakeCommands, Observer, free_port, send, until


@pytest.fixture
async def ha():
    async with running_fake_ha() as served:
        yield served


def make_host(config: dict[str, Any]) -> tuple[EventBus, PluginHost]:
    bus = EventBus()
    host = PluginHost.from_config({"homeassistant": config}, PluginContext(bus, FakeCommands(bus), agent_id="den"))
    return bus, host


def calls(*items: tuple[str, dict[str, Any]]) -> list[ParsedToolCall]:
    return [ParsedToolCall.parse(json.dumps({"name": n, "arguments": a})) for n, a in items]


async def test_tools_allowlist_summary_and_websocket(ha) -> None:
    fake, url = ha
    _, host = make_host({"url": url, "token": TOKEN, "allow_domains": ["light", "climate"],
                         "allow_entities": ["switch.fan"]})
    await host.start()
    (plugin,) = host.running
    assert isinstance(plugin, HomeAssistantPlugin)
    assert set(plugin.states) == {"light.kitchen", "climate.hall", "switch.fan"}  # the lock is not allowed
    prompt = host.system_prompt() or ""
    assert "light.kitchen, Kitchen: off" in prompt and "target 19°" in prompt and "lock" not in prompt

    registry = ToolRegistry()
    registry.extend(host.tools())
    outcomes = await registry.execute(calls(
        ("HassTurnOn", {"entity_id": "light.kitchen"}),
        ("HassLightSet", {"entity_id": "light.kitchen", "brightness_pct": 40}),
        ("HassClimateSetTemperature", {"entity_id": "climate.hall", "temperature": 21.5}),
        ("HassTurnOff", {"entity_id": "switch.fan"}),
        ("HassGetState", {"entity_id": "climate.hall"}),
        ("HassTurnOn", {"entity_id": "lock.front_door"}),  # not allowed
        ("HassLightSet", {"entity_id": "switch.fan", "brightness_pct": 10}),  # allowed, wrong domain
        ("HassLightSet", {"entity_id": "light.kitchen", "brightness_pct": 140}),  # out of range
    ), timeout=5)
    assert [o.ok for o in outcomes] == [True] * 5 + [False] * 3, [o.error for o in outcomes]
    assert outcomes[4].result["state"] == "heat"
    assert "not in the allowlist" in (outcomes[5].error or "")
    assert "is a switch" in (outcomes[6].error or "")
    assert "bad arguments" in (outcomes[7].error or "")
    assert sorted(fake.calls, key=lambda c: (c[0], c[1])) == [
        ("climate", "set_temperature", {"entity_id": "climate.hall", "temperature": 21.5}),
        ("light", "turn_on", {"entity_id": "light.kitchen"}),
        ("light", "turn_on", {"entity_id": "light.kitchen", "brightness_pct": 40}),
        ("switch", "turn_off", {"entity_id": "switch.fan"}),
    ]
    assert all(c[2]["entity_id"] != "lock.front_door" for c in fake.calls)

    # State changes arrive over the authenticated WebSocket and update the summary.
    await until(lambda: plugin.ws_ready.is_set() and fake.sockets, what="websocket subscription")
    await fake.push_state("switch.fan", "on")
    await fake.push_state("lock.front_door", "unlocked")
    await until(lambda: plugin.states["switch.fan"]["state"] == "on", what="state_changed")
    assert "lock.front_door" not in plugin.states
    await host.stop()


async def test_bad_token_and_unreachable_give_error_results(ha, caplog: pytest.LogCaptureFixture) -> None:
    _, url = ha
    for config, expected in [({"url": url, "token": "wrong"}, "rejected the access token (401)"),
                             ({"url": f"http://127.0.0.1:{free_port()}", "token": TOKEN}, "unreachable")]:
        _, host = make_host({**config, "allow_domains": ["light"], "websocket": False})
        await host.start()  # logs, does not raise
        assert expected in caplog.text
        assert host.system_prompt() is None
        registry = ToolRegistry()
        registry.extend(host.tools())
        (o,) = await registry.execute(calls(("HassTurnOn", {"entity_id": "light.kitchen"})), timeout=5)
        assert not o.ok and expected in (o.error or "")
        await host.stop()


async def test_mqtt_discovery(ha, tmp_path: Path) -> None:
    _, url = ha
    broker = Broker(tmp_path).start()
    try:
        bus, host = make_host({"url": url, "token": TOKEN, "allow_domains": ["light"], "websocket": False,
                               "mqtt": {"port": broker.port}})
        async with Observer(broker.port, "#").running() as obs:
            await host.start()
            (plugin,) = host.running
            disc = plugin.discovery
            assert disc is not None
            await until(lambda: len(obs.on("homeassistant/+/den/+/config")) == 3, what="discovery configs")
            sensor = obs.json_on("homeassistant/sensor/den/last_response/config")[0]
            assert sensor["availability_topic"] == "voice_agent/den/ha/availability" and sensor["unique_id"]
            switch = obs.json_on("homeassistant/switch/den/muted/config")[0]
            assert switch["command_topic"] == "voice_agent/den/ha/muted/set"
            assert obs.on("voice_agent/den/ha/availability") == ["online"]

            bus.publish(SpeechStarted(session_id="s", seq=1, t=0.1))
            bus.publish(SpeechStopped(session_id="s", seq=2, t=1.0))
            bus.publish(ResponseDone(session_id="s", seq=3, turn_id="t", text="It is sunny."))
            await until(lambda: obs.on("voice_agent/den/ha/last_response")[-1:] == ["It is sunny."], what="sensor")
            assert obs.on("voice_agent/den/ha/listening")[-2:] == ["ON", "OFF"]

            await send(broker.port, "voice_agent/den/ha/muted/set", "ON")
            await until(lambda: disc.muted, what="muted flag")
            await until(lambda: obs.on("voice_agent/den/ha/muted")[-1:] == ["ON"], what="muted state")

            await send(broker.port, "homeassistant/status", "online")  # HA restarted: announce again
            await until(lambda: len(obs.on("homeassistant/+/den/+/config")) == 6, what="republished configs")
            await host.stop()
            await until(lambda: obs.on("voice_agent/den/ha/availability")[-1:] == ["offline"], what="offline")
    finally:
        broker.stop()


def test_config_errors() -> None:
    with pytest.raises(ValueError, match=r"homeassistant.*token"):
        make_host({"url": "http://127.0.0.1:1"})
    with pytest.raises(ValueError, match=r"mqtt.prot"):
        make_host({"url": "http://127.0.0.1:1", "token": "t", "mqtt": {"prot": 1}})


async def test_states_are_read_again_after_the_websocket_comes_back(ha) -> None:
    fake, url = ha
    _, host = make_host({"url": url, "token": TOKEN, "allow_domains": ["switch"]})
    await host.start()
    (plugin,) = host.running
    await until(lambda: plugin.ws_ready.is_set() and fake.sockets, what="websocket subscription")
    plugin.ws_ready.clear()
    fake.states["switch.fan"]["state"] = "on"  # changes while the connection is down: no event
    for ws in list(fake.sockets):
        await ws.close()
    fake.sockets.clear()
    await until(lambda: plugin.ws_ready.is_set() and fake.sockets, what="resubscription")
    assert plugin.states["switch.fan"]["state"] == "on"
    await host.stop()


async def test_tool_schemas_name_the_allowlist_not_every_entity(ha) -> None:
    fake, url = ha
    for i in range(50):
        fake.states[f"light.l{i}"] = {"entity_id": f"light.l{i}", "state": "off", "attributes": {}}
    _, host = make_host({"url": url, "token": TOKEN, "allow_domains": ["light"], "allow_entities": ["switch.fan"],
                         "websocket": False})
    await host.start()
    registry = ToolRegistry()
    registry.extend(host.tools())
    block = registry.system_block()
    assert "light.l49" not in block and block.count("allowed: light.*, switch.fan") == 5
    assert "(and 12 more)" in (host.system_prompt() or "")  # 52 allowed, 40 shown: the summary is capped too
    await host.stop()


async def test_an_unknown_entity_is_an_error_not_done(ha) -> None:
    fake, url = ha
    _, host = make_host({"url": url, "token": TOKEN, "allow_domains": ["light"], "websocket": False})
    await host.start()
    registry = ToolRegistry()
    registry.extend(host.tools())
    (o,) = await registry.execute(calls(("HassTurnOn", {"entity_id": "light.cellar"})), timeout=5)
    assert not o.ok and "no entity light.cellar" in (o.error or "")
    assert fake.calls == []  # HA would have answered 200 and done nothing
    await host.stop()
