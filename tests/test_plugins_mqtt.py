"""MQTT plugin against a real mosquitto: events out, commands in, auth, broker restart."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from agent.bench.mqtt import DelayProxy
from agent.bus import EventBus
from agent.events import InstructionSet, ResponseDelta, SessionClose, SpeechStarted
from agent.plugin import PluginContext, PluginHost
from agent.tools import ParsedToolCall, ToolRegistry
from plugins.mqtt import MqttPlugin
from tests.mosquitto import Broker, FakeCommands, Observer, send, until


@pytest.fixture
def broker(tmp_path: Path):
    b = Broker(tmp_path / "anon").start()
    yield b
    b.stop()


def make_host(port: int, **extra: object) -> tuple[EventBus, FakeCommands, PluginHost]:
    bus = EventBus()
    commands = FakeCommands(bus)
    config = {"host": "127.0.0.1", "port": port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.5, **extra}
    host = PluginHost.from_config({"mqtt": config}, PluginContext(bus, commands, agent_id="kitchen"))
    return bus, commands, host


def only(host: PluginHost) -> MqttPlugin:
    (plugin,) = host.running
    assert isinstance(plugin, MqttPlugin)
    return plugin


def delta(session: str, seq: int) -> ResponseDelta:
    return ResponseDelta(session_id=session, seq=seq, turn_id=f"{session}-t1", text=f"word{seq}")


async def test_events_out_commands_in_bad_commands(broker: Broker) -> None:
    bus, commands, host = make_host(broker.port, allowed_publish_topics=["home/+/light", "notify/#"])
    async with Observer(broker.port, "#").running() as obs:
        await host.start()
        plugin = only(host)
        assert isinstance(plugin, MqttPlugin) and plugin.conn.connected.is_set()
        events = [delta("s1", i) for i in range(1, 31)] + [SpeechStarted(session_id="s2", seq=1, t=0.5)]
        for e in events:
            bus.publish(e)
        base = "voice_agent/kitchen"
        await until(lambda: len(obs.on(f"{base}/sessions/+/events")) == len(events), what="all events")
        assert obs.json_on(f"{base}/sessions/s1/events") == [json.loads(e.model_dump_json()) for e in events[:30]]
        assert obs.json_on(f"{base}/sessions/s2/events")[0]["type"] == "speech.started"
        assert obs.on(f"{base}/status") == ["online"]

        # Commands: one session, and every session.
        await send(broker.port, f"{base}/sessions/s1/commands", '{"type": "instruction.set", "text": "emotion?"}')
        await send(broker.port, f"{base}/commands", '{"type": "session.close"}')
        await until(lambda: len(commands.commands) == 2, what="commands")
        assert commands.commands == [("s1", InstructionSet(text="emotion?")), (None, SessionClose())]

        # Bad payloads: each reported, the error event reaches the broker, nothing crashes.
        await send(broker.port, f"{base}/sessions/s1/commands", b"not json {")
        await send(broker.port, f"{base}/sessions/s1/commands", '{"type": "launch.rockets"}')
        await send(broker.port, f"{base}/sessions/s1/commands", '{"type": "instruction.set"}')
        await send(broker.port, f"{base}/sessions/ghost/commands", '{"type": "response.cancel"}')
        await send(broker.port, f"{base}/sessions/s1/commands", b"\xff\xfe")
        await until(lambda: len(commands.errors) == 5, what="errors")
        assert all(code == "bad_command" for _, code, _ in commands.errors)
        assert [sid for sid, _, _ in commands.errors] == ["s1", "s1", "s1", "ghost", "s1"]
        assert "text" in commands.errors[2][2] and "ghost" in commands.errors[3][2]
        await until(lambda: len([m for m in obs.json_on(f"{base}/sessions/s1/events") if m["type"] == "error"]) == 4,
                    what="error events on the broker")

        # Still works afterwards, both directions.
        await send(broker.port, f"{base}/sessions/s2/commands", '{"type": "response.cancel"}')
        await until(lambda: len(commands.commands) == 3, what="command after bad ones")
        bus.publish(delta("s2", 2))
        await until(lambda: len(obs.on(f"{base}/sessions/s2/events")) == 2, what="event after bad ones")

        # The publish tool: allowed patterns only.
        registry = ToolRegistry()
        registry.extend(host.tools())
        calls = [ParsedToolCall.parse(json.dumps(c)) for c in [
            {"name": "mqtt_publish", "arguments": {"topic": "home/hall/light", "payload": {"on": True}}},
            {"name": "mqtt_publish", "arguments": {"topic": "home/hall/lock", "payload": "open"}},
            {"name": "mqtt_publish", "arguments": {"topic": "notify/#", "payload": "x"}},
        ]]
        ok, denied, wildcard = await registry.execute(calls, timeout=5)
        assert ok.ok, ok.error
        assert not denied.ok and "not allowed" in (denied.error or "")
        assert not wildcard.ok and "not allowed" in (wildcard.error or "")
        await until(lambda: obs.on("home/hall/light") == ['{"on": true}'], what="tool publish")
        assert obs.on("home/hall/lock") == []

        await host.stop()
        await until(lambda: obs.on(f"{base}/status")[-1:] == ["offline"], what="offline status")


async def test_auth(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    broker = Broker(tmp_path, users={"agent": "s3cret", "watcher": "w"}).start()
    try:
        bus, _, host = make_host(broker.port, username="agent", password="s3cret")
        async with Observer(broker.port, "voice_agent/#", username="watcher", password="w").running() as obs:
            await host.start()
            for i in range(1, 21):
                bus.publish(delta("s1", i))
            await until(lambda: len(obs.on("voice_agent/kitchen/sessions/s1/events")) == 20, what="events")
            await host.stop()

        caplog.set_level(logging.WARNING)
        bus, _, bad = make_host(broker.port, username="agent", password="wrong", connect_timeout_s=0.3)
        await bad.start()  # a refused login is logged, never raised: the agent keeps running
        plugin = only(bad)
        await until(lambda: plugin.conn.last_error is not None, what="refusal")
        assert not plugin.conn.connected.is_set()
        assert "refused the credentials" in caplog.text or "not reachable" in caplog.text
        bus.publish(delta("s1", 1))  # queued, not lost, not crashing
        await bad.stop()
    finally:
        broker.stop()


async def test_broker_restart_loses_nothing(tmp_path: Path) -> None:
    broker = Broker(tmp_path, persistence=True).start()
    try:
        bus, _, host = make_host(broker.port)
        topic = "voice_agent/kitchen/sessions/s1/events"
        # Persistent observer session: what the broker accepts while it is away is kept for it.
        async with Observer(broker.port, topic, persistent=True).running() as obs:
            await host.start()
            plugin = only(host)
            for i in range(1, 101):
                bus.publish(delta("s1", i))
            await until(lambda: len(obs.messages) >= 30, what="first part of the stream")
            broker.stop()  # mid-stream: some events are in flight, the rest queued
            for i in range(101, 201):
                bus.publish(delta("s1", i))
            await until(lambda: not plugin.conn.connected.is_set(), what="disconnect noticed")
            broker.start()
            await until(lambda: len({json.loads(p)["seq"] for p in obs.on(topic)}) == 200, timeout=40,
                        what="all 200 events after the restart")
            assert plugin.conn.connects >= 2 and plugin.conn.dropped == 0
            seqs = [json.loads(p)["seq"] for p in obs.on(topic)]
            first_seen = list(dict.fromkeys(seqs))  # QoS 1 may repeat one; order must hold
            assert first_seen == list(range(1, 201))
            await host.stop()
    finally:
        broker.stop()


async def test_window_in_flight_survives_a_broker_restart(tmp_path: Path) -> None:
    """Through a proxy adding 3 ms each way, many messages are in flight (sent, no PUBACK yet)
    when the broker dies: they are sent again on reconnect, none lost, first copies in order."""
    broker = Broker(tmp_path, persistence=True).start()
    proxy = await DelayProxy(broker.port, 0.003).start()
    try:
        bus, _, host = make_host(proxy.port, inflight_window=16)
        topic = "voice_agent/kitchen/sessions/s1/events"
        async with Observer(broker.port, topic, persistent=True).running() as obs:
            await host.start()
            plugin = only(host)
            for i in range(1, 301):
                bus.publish(delta("s1", i))
            await until(lambda: len(obs.messages) >= 30, what="first part of the stream")
            broker.stop()
            await until(lambda: not plugin.conn.connected.is_set(), what="disconnect noticed")
            assert plugin.conn.published < 300
            broker.start()
            await until(lambda: len({json.loads(p)["seq"] for p in obs.on(topic)}) == 300, timeout=60,
                        what="all 300 events after the restart")
            conn = plugin.conn
            assert conn.connects >= 2 and conn.dropped == 0 and conn.failed == 0
            assert 1 < conn.peak_inflight <= 16  # a window really was in flight, never more
            assert conn.resent > 0  # and some of it had no PUBACK when the broker went
            first_seen = list(dict.fromkeys(json.loads(p)["seq"] for p in obs.on(topic)))
            assert first_seen == list(range(1, 301))
            await host.stop()
    finally:
        await proxy.close()
        broker.stop()


async def test_malformed_json_commands_are_reported(broker: Broker) -> None:
    """Deep nesting and huge numbers in a command: an error event each, never a crash."""
    bus, commands, host = make_host(broker.port)
    await host.start()
    base = "voice_agent/kitchen/sessions/s1/commands"
    bad = ["[" * 60000 + "]" * 60000,
           '{"type": "session.update", "max_new_tokens": ' + "9" * 5000 + "}",
           '{"type": "session.update", "system_prompt": ' + "[" * 60000 + "]" * 60000 + "}",
           '{"type": "session.update", "min_silence_s": 1e999999}',
           "1" * 5000]
    for payload in bad:
        await send(broker.port, base, payload)
    await until(lambda: len(commands.errors) == len(bad), what="one error per bad command")
    assert all(code == "bad_command" for _, code, _ in commands.errors)
    await send(broker.port, base, '{"type": "response.cancel"}')
    await until(lambda: len(commands.commands) == 1, what="a good command still works")
    await host.stop()


def test_bench_mqtt_json_last_line() -> None:
    out = subprocess.run([sys.executable, "-m", "agent.cli", "bench", "mqtt", "--messages", "200",
                          "--latency-ms", "2", "--window", "16", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["benchmark"] == "mqtt" and result["window"] == 16
    runs = {(r["latency_ms_each_way"], r["window"]): r for r in result["runs"]}
    assert set(runs) == {(0.0, 1), (0.0, 16), (2.0, 1), (2.0, 16)}
    assert all(r["msgs_per_s"] > 0 and r["reconnects"] == 0 for r in runs.values())
    assert runs[(2.0, 1)]["peak_inflight"] == 1 and runs[(2.0, 16)]["peak_inflight"] > 1
    assert set(result["speedup"]) == {"0ms", "2ms"}
    assert any("window 16 vs 1" in line for line in lines)


async def test_outbox_is_bounded_while_broker_is_down(tmp_path: Path) -> None:
    broker = Broker(tmp_path)  # never started: nothing listens on this port
    bus, _, host = make_host(broker.port, outbox_size=10, connect_timeout_s=0.1)
    await host.start()
    plugin = only(host)
    for i in range(1, 26):
        bus.publish(delta("s1", i))
    await until(lambda: plugin.conn.dropped == 15, what="overflow counted")
    assert [json.loads(m.payload)["seq"] for m in plugin.conn.outbox] == list(range(16, 26))
    await host.stop()


def test_config_errors_are_clear() -> None:
    bus = EventBus()
    ctx = PluginContext(bus, FakeCommands(bus))
    with pytest.raises(ValueError, match=r"plugin 'mqtt': invalid config: port"):
        PluginHost.from_config({"mqtt": {"port": 0}}, ctx)
    with pytest.raises(ValueError, match=r"allowed_publish_topics"):
        PluginHost.from_config({"mqtt": {"allowed_publish_topics": ["a/#/b"]}}, ctx)
    with pytest.raises(ValueError, match=r"prefix"):
        PluginHost.from_config({"mqtt": {"prefix": "a/+"}}, ctx)
    with pytest.raises(ValueError, match=r"hostname"):
        PluginHost.from_config({"mqtt": {"hostname": "x"}}, ctx)  # typo'd key
    assert asyncio.iscoroutinefunction(MqttPlugin.on_event)


@pytest.mark.slow
async def test_voice_agent_run_publishes_every_event(broker: Broker, tmp_path: Path, speech_two) -> None:
    """`voice-agent run --config` with the plugin: the whole event stream of a file reaches the
    broker, in order, before the command exits."""
    config = tmp_path / "agent.yaml"
    config.write_text(f"agent_id: den\nplugins:\n  mqtt: {{host: 127.0.0.1, port: {broker.port}}}\n")
    async with Observer(broker.port, "voice_agent/den/#").running() as obs:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.cli", "run", "--config", str(config), "--model", "tiny-random",
            "--max-new-tokens", "4", "--jsonl", str(speech_two.path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 240)
        assert proc.returncode == 0, err.decode()
        printed = [json.loads(line) for line in out.decode().splitlines()]
        session_id = printed[0]["session_id"]
        topic = f"voice_agent/den/sessions/{session_id}/events"
        await until(lambda: len(obs.on(topic)) == len(printed), what="every event on the broker")
    assert obs.json_on(topic) == printed
    assert [e["type"] for e in printed].count("response.done") == 2
