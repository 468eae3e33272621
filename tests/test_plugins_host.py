"""Plugin host: discovery, up-front validation, isolation of failing plugins."""

from __future__ import annotations

import asyncio
import logging

import pytest
from pydantic import Field

from agent.bus import EventBus
from agent.events import SpeechStarted
from agent.plugin import Plugin, PluginConfig, PluginContext, PluginHost
from agent.tools import Tool, tool
from tests.mosquitto import FakeCommands, until


class EchoConfig(PluginConfig):
    greeting: str = "hi"
    limit: int = Field(3, ge=1)


class Echo(Plugin):
    name = "echo"
    Config = EchoConfig

    def __init__(self, config: EchoConfig, context: PluginContext) -> None:
        super().__init__(config, context)
        self.seen: list[int] = []
        self.started = self.stopped = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def on_event(self, event) -> None:  # type: ignore[no-untyped-def]
        if event.seq == 2:
            raise RuntimeError("cannot handle seq 2")  # isolated: the next events still arrive
        self.seen.append(event.seq)

    def tools(self) -> list[Tool]:
        @tool(name="echo")
        def echo(text: str) -> str:
            """Say it back."""
            return f"{self.config.greeting} {text}"

        return [echo]

    def system_prompt(self) -> str | None:
        return "You can echo."


class BrokenStart(Plugin):
    name = "broken"

    def __init__(self, config: PluginConfig, context: PluginContext) -> None:
        super().__init__(config, context)
        self.stopped = False

    async def start(self) -> None:
        raise ConnectionError("no device")

    async def stop(self) -> None:
        self.stopped = True

    def tools(self) -> list[Tool]:
        raise AssertionError("a disabled plugin contributes nothing")


CLASSES = {"echo": Echo, "broken": BrokenStart}


def context() -> PluginContext:
    bus = EventBus()
    return PluginContext(bus, FakeCommands(bus), agent_id="a1")


def test_unknown_plugin_and_bad_config_fail_before_anything_starts() -> None:
    with pytest.raises(ValueError, match=r"unknown plugin 'nope'; available: .*echo.*mqtt"):
        PluginHost.from_config({"nope": {}}, context(), classes=CLASSES)
    with pytest.raises(ValueError) as info:
        PluginHost.from_config({"echo": {"limit": 0, "colour": "red"}, "broken": []}, context(), classes=CLASSES)
    msg = str(info.value)
    assert "plugin 'echo': invalid config" in msg and "limit" in msg and "colour" in msg
    assert "plugin 'broken': config must be a mapping" in msg  # every problem at once
    host = PluginHost.from_config({"echo": None}, context(), classes=CLASSES)  # empty YAML section
    assert isinstance(host.configured[0], Echo) and host.configured[0].config.limit == 3


def test_builtin_plugins_found_without_explicit_classes() -> None:
    host = PluginHost.from_config({"webhook": {"url": "http://127.0.0.1:9/", "secret": "s"}}, context())
    assert type(host.configured[0]).__name__ == "WebhookPlugin"


async def test_failing_start_and_on_event_are_isolated(caplog: pytest.LogCaptureFixture) -> None:
    ctx = context()
    host = PluginHost.from_config({"broken": {}, "echo": {"greeting": "hello"}}, ctx, classes=CLASSES)
    caplog.set_level(logging.INFO)
    await host.start()
    broken, echo = host.configured
    assert host.running == [echo] and "no device" in host.failed["broken"]
    assert "plugin broken failed to start and is disabled" in caplog.text
    assert isinstance(broken, BrokenStart) and broken.stopped  # cleaned up after the failed start
    for i in range(1, 6):
        ctx.bus.publish(SpeechStarted(session_id="s", seq=i, t=0))
    assert isinstance(echo, Echo)
    await until(lambda: echo.seen == [1, 3, 4, 5], what="events after the failing one")
    assert "echo failed on a speech.started event" in caplog.text
    (t,) = host.tools()
    assert await t.call({"text": "there"}) == "hello there"
    assert host.system_prompt() == "You can echo."
    ctx.bus.publish(SpeechStarted(session_id="s", seq=6, t=0))
    await host.stop()  # handles what was already published, then stops
    assert echo.seen[-1] == 6 and echo.stopped and host.running == []


async def test_hanging_start_times_out() -> None:
    class Hangs(Plugin):
        name = "hangs"

        async def start(self) -> None:
            await asyncio.Event().wait()

    host = PluginHost.from_config({"hangs": {}}, context(), classes={"hangs": Hangs}, start_timeout=0.05)
    await host.start()
    assert host.running == [] and host.failed == {"hangs": "start timed out"}


async def test_a_plugin_may_ask_for_a_longer_start() -> None:
    class SlowConnect(Plugin):
        name = "slow"

        def start_timeout_s(self) -> float:
            return 0.5  # e.g. its config's connect timeout

        async def start(self) -> None:
            await asyncio.sleep(0.1)  # longer than the host's default below, within its own

    host = PluginHost.from_config({"slow": {}}, context(), classes={"slow": SlowConnect}, start_timeout=0.01)
    await host.start()
    assert [p.name for p in host.running] == ["slow"] and host.failed == {}
    await host.stop()
