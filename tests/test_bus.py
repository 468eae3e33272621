"""The event bus under a slow subscriber: control events never dropped, deltas merged,
a hopeless subscriber disconnected — each counted."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from agent import events as ev
from agent.bus import EventBus, SubscriptionClosed
from agent.plugin import Plugin, PluginConfig, PluginContext, PluginHost
from agent.server.metrics import Metrics
from tests.mosquitto import FakeCommands, until


class Stamps:
    """Per-session seq stamping, as a Session does."""

    def __init__(self) -> None:
        self.stampers: dict[str, ev.EventStamper] = {}

    def __call__(self, session: str, event: Any) -> Any:
        return self.stampers.setdefault(session, ev.EventStamper(session)).stamp(event)


def turn(stamp: Stamps, session: str, n: int, words: int) -> list[Any]:
    """One turn's events in the order a session emits them."""
    t = f"{session}-t{n}"
    out = [ev.SpeechStarted(t=0.0), ev.SpeechStopped(t=1.0),
           ev.TurnCommitted(turn_id=t, start=0.0, end=1.0, mode="chat"), ev.ResponseStarted(turn_id=t)]
    out += [ev.ResponseDelta(turn_id=t, text=f"w{i} ") for i in range(words)]
    out += [ev.ToolCall(turn_id=t, call_id=f"{t}-c", name="set_light", arguments={"on": True}),
            ev.ToolResult(call_id=f"{t}-c", ok=True, result="done"),
            ev.ResponseDone(turn_id=t, text="".join(f"w{i} " for i in range(words)), tokens=words)]
    return [stamp(session, e) for e in out]


def drain(sub: Any) -> list[Any]:
    return [sub.queue.get_nowait() for _ in range(sub.queue.qsize())]


def check_stream(received: list[Any], published: list[Any]) -> None:
    """Nothing but speech events missing; every turn's deltas add up to its text; seq increasing."""
    keep = [e for e in published if e.type not in ("speech.started", "speech.stopped", "response.delta")]
    assert [e for e in received if e.type not in ("speech.started", "speech.stopped", "response.delta")] == keep
    by_session: dict[str, list[int]] = {}
    for e in received:
        by_session.setdefault(e.session_id, []).append(e.seq)
    for seqs in by_session.values():
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    for done in (e for e in published if isinstance(e, ev.ResponseDone)):
        text = "".join(e.text for e in received if isinstance(e, ev.ResponseDelta)
                       and e.turn_id == done.turn_id and e.session_id == done.session_id)
        assert text == done.text


async def test_slow_subscriber_merges_deltas_and_keeps_control_events() -> None:
    bus, stamp = EventBus(), Stamps()
    sub = bus.subscribe("s1", maxsize=8, hard_cap=64)
    fast = bus.subscribe("s1")  # another subscriber sees every single event, unmerged
    published = [stamp("s1", ev.SessionStarted())]
    for n in range(5):
        published += turn(stamp, "s1", n, words=40)
    published.append(stamp("s1", ev.Error(code="internal", message="boom")))
    published.append(stamp("s1", ev.SessionEnded(reason="closed")))
    for e in published:
        bus.publish(e)

    received = drain(sub)
    check_stream(received, published)
    assert drain(fast) == published
    deltas = [e for e in received if isinstance(e, ev.ResponseDelta)]
    assert len(deltas) < 5 * 40 and sub.merged == 5 * 40 - len(deltas)
    assert sub.dropped == sum(e.type.startswith("speech.") for e in published[8:])  # over maxsize only
    merged = deltas[-1]
    assert merged.seq == max(e.seq for e in published if isinstance(e, ev.ResponseDelta))  # the last one's
    assert bus.stats == {"events_dropped": sub.dropped, "deltas_merged": sub.merged, "subscribers_disconnected": 0}
    assert sub.disconnect_reason is None and sub in bus._subs


async def test_interleaved_sessions_merge_per_session() -> None:
    bus, stamp = EventBus(), Stamps()
    sub = bus.subscribe(maxsize=4, hard_cap=32)  # every session, like a plugin
    turns = {s: turn(stamp, s, 1, words=30) for s in ("a", "b", "c")}
    published = [e for group in zip(*turns.values(), strict=True) for e in group]  # round robin
    for e in published:
        bus.publish(e)
    received = drain(sub)
    check_stream(received, published)
    assert sub.merged > 0 and sub.disconnect_reason is None


async def test_hopeless_subscriber_is_disconnected(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    bus, stamp = EventBus(), Stamps()
    stuck = bus.subscribe("s1", maxsize=4, hard_cap=8, name="stuck client")
    healthy = bus.subscribe("s1", maxsize=4)
    waiter = asyncio.create_task(stuck.get())
    await asyncio.sleep(0)  # parked in get(); the flood below never lets it run
    calls = [stamp("s1", ev.ToolCall(turn_id="t", call_id=str(i), name="x")) for i in range(12)]
    for i, e in enumerate(calls):
        bus.publish(e)
        if i < 11:
            assert healthy.queue.get_nowait() is e  # a subscriber that keeps up loses nothing
    assert stuck.disconnect_reason is not None and stuck not in bus._subs
    assert "stuck client" in caplog.text and "cannot keep up" in caplog.text
    assert bus.stats["subscribers_disconnected"] == 1 and bus.stats["events_dropped"] == 8
    assert stuck.queue.qsize() == 0  # its backlog is released
    with pytest.raises(SubscriptionClosed, match="stuck client"):
        await asyncio.wait_for(waiter, 5)  # it was waiting when the flood began: it is told
    with pytest.raises(SubscriptionClosed, match="cannot|must not lose"):
        await stuck.get()
    assert [e async for e in stuck] == []  # iteration just ends
    bus.publish(calls[-1])
    assert healthy.queue.qsize() == 2  # still subscribed


async def test_compaction_at_the_hard_cap() -> None:
    """Events queued before the pressure began are merged/dropped when the hard cap is hit."""
    bus, stamp = EventBus(), Stamps()
    sub = bus.subscribe("s1", maxsize=4, hard_cap=9)
    early = [stamp("s1", e) for e in (ev.SpeechStarted(t=0.0), *(ev.ResponseDelta(turn_id="t", text=w)
                                                                for w in ("a", "b", "c")))]
    calls = [stamp("s1", ev.ToolCall(turn_id="t", call_id=str(i), name="x")) for i in range(5)]
    for e in early + calls:
        bus.publish(e)
    received = drain(sub)
    assert [e.type for e in received] == ["response.delta"] + ["tool.call"] * 5
    assert received[0].text == "abc" and received[0].seq == early[-1].seq and received[1:] == calls
    assert (sub.dropped, sub.merged, sub.disconnect_reason) == (1, 2, None)


async def test_join_counts_merged_and_dropped_events() -> None:
    """queue.join() (the plugin host's drain at stop) must not wait for merged-away events."""
    bus, stamp = EventBus(), Stamps()
    sub = bus.subscribe("s1", maxsize=4)
    for e in turn(stamp, "s1", 1, words=50):
        bus.publish(e)
    assert sub.merged and sub.dropped
    while not sub.queue.empty():
        await sub.get()
        sub.queue.task_done()
    await asyncio.wait_for(sub.queue.join(), 1)


class Slow(Plugin):
    name = "slow"
    queue_size = 4

    class Config(PluginConfig):
        pass

    def __init__(self, config: PluginConfig, context: PluginContext) -> None:
        super().__init__(config, context)
        self.seen: list[Any] = []
        self.gate = asyncio.Event()

    async def on_event(self, event: Any) -> None:
        await self.gate.wait()
        self.seen.append(event)


async def test_plugin_that_falls_behind_is_marked_failed(caplog: pytest.LogCaptureFixture) -> None:
    """A stuck plugin is cut off, shows as failed, and the host still stops cleanly."""
    caplog.set_level(logging.WARNING)
    bus, stamp = EventBus(), Stamps()
    plugin = Slow(Slow.Config(), PluginContext(bus, FakeCommands(bus)))
    host = PluginHost([plugin], PluginContext(bus, FakeCommands(bus)))
    await host.start()
    for i in range(20):
        bus.publish(stamp("s1", ev.ToolCall(turn_id="t", call_id=str(i), name="x")))
        if i == 0:
            await asyncio.sleep(0.01)  # the plugin takes the first event and gets stuck on it
    assert bus.stats["subscribers_disconnected"] == 1 and "(plugin slow) disconnected" in caplog.text
    plugin.gate.set()  # it finishes its event and asks for the next: it learns it was cut off
    await until(lambda: host.status() == {"slow": "failed"}, what="plugin marked failed")
    assert "plugin slow gets no more events" in caplog.text
    await asyncio.wait_for(host.stop(), 10)
    assert len(plugin.seen) == 1  # the event it was handling when it got stuck


async def test_metrics_export_bus_counters() -> None:
    bus, stamp = EventBus(), Stamps()
    bus.subscribe("s1", maxsize=4, hard_cap=16)
    for e in turn(stamp, "s1", 1, words=10):
        bus.publish(e)

    class Runtime:
        pass

    runtime = Runtime()
    runtime.bus = bus  # type: ignore[attr-defined]
    body, _ = Metrics(runtime, lambda: 0).render()
    text = body.decode()
    assert f"voice_agent_bus_deltas_merged_total {float(bus.stats['deltas_merged'])}" in text
    assert f"voice_agent_bus_events_dropped_total {float(bus.stats['events_dropped'])}" in text
    assert "voice_agent_bus_subscribers_disconnected_total 0.0" in text
    assert bus.stats["deltas_merged"] > 0
    bus.subscribe("s1", maxsize=1, hard_cap=2)
    for e in turn(stamp, "s1", 2, words=1):
        bus.publish(e)
    assert "voice_agent_bus_subscribers_disconnected_total 1.0" in Metrics(runtime, lambda: 0).render()[0].decode()
