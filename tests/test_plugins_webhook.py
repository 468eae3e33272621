"""Webhook plugin against a local aiohttp receiver: signature, filtering, retries."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
from aiohttp import web

from agent.bus import EventBus
from agent.events import ResponseDelta, ResponseDone, SpeechStarted
from agent.plugin import PluginContext, PluginHost
from plugins.webhook import SIGNATURE_HEADER, WebhookPlugin
from tests.mosquitto import FakeCommands, free_port, until

SECRET = "hush"


class Receiver:
    def __init__(self, fail_first: int = 0, status: int = 500) -> None:
        self.fail_first, self.status = fail_first, status
        self.attempts = 0
        self.valid: list[dict] = []
        self.bad_signatures = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.attempts += 1
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(request.headers.get(SIGNATURE_HEADER, ""), expected):
            self.bad_signatures += 1
            return web.Response(status=401)
        if self.attempts <= self.fail_first:
            return web.Response(status=self.status)
        self.valid.append(json.loads(body))
        return web.Response(status=204)


@pytest.fixture
async def receiver_url():
    receivers: list[web.AppRunner] = []

    async def make(rx: Receiver) -> str:
        app = web.Application()
        app.router.add_post("/hook", rx.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        receivers.append(runner)
        return f"http://127.0.0.1:{port}/hook"

    yield make
    for r in receivers:
        await r.cleanup()


def make_host(config: dict) -> tuple[EventBus, PluginHost]:
    bus = EventBus()
    return bus, PluginHost.from_config({"webhook": config}, PluginContext(bus, FakeCommands(bus)))


async def test_signed_and_filtered(receiver_url) -> None:
    rx = Receiver()
    url = await receiver_url(rx)
    bus, host = make_host({"url": url, "secret": SECRET, "types": ["response.done", "speech.started"]})
    await host.start()
    bus.publish(SpeechStarted(session_id="s", seq=1, t=0.1))
    bus.publish(ResponseDelta(session_id="s", seq=2, turn_id="t", text="hi"))  # filtered out
    bus.publish(ResponseDone(session_id="s", seq=3, turn_id="t", text="hi there"))
    await until(lambda: len(rx.valid) == 2, what="two deliveries")
    await host.stop()
    assert [e["seq"] for e in rx.valid] == [1, 3] and rx.valid[1]["text"] == "hi there"
    assert rx.bad_signatures == 0 and rx.attempts == 2


async def test_retries_after_500_then_delivers_in_order(receiver_url) -> None:
    rx = Receiver(fail_first=2, status=500)
    url = await receiver_url(rx)
    bus, host = make_host({"url": url, "secret": SECRET, "backoff_initial_s": 0.01, "max_retries": 3})
    await host.start()
    for i in range(1, 4):
        bus.publish(ResponseDelta(session_id="s", seq=i, turn_id="t", text=str(i)))
    await until(lambda: len(rx.valid) == 3, what="deliveries after retries")
    (plugin,) = host.running
    assert isinstance(plugin, WebhookPlugin)
    assert rx.attempts == 5 and [e["seq"] for e in rx.valid] == [1, 2, 3] and plugin.failed == 0
    await host.stop()


async def test_gives_up_bounded_and_wrong_secret_is_refused(receiver_url) -> None:
    rx = Receiver(fail_first=100, status=503)
    url = await receiver_url(rx)
    bus, host = make_host({"url": url, "secret": SECRET, "backoff_initial_s": 0.01, "max_retries": 2})
    await host.start()
    (plugin,) = host.running
    bus.publish(SpeechStarted(session_id="s", seq=1, t=0))
    await until(lambda: plugin.failed == 1, what="giving up")
    assert rx.attempts == 3  # one try + two retries, then it stops
    await host.stop()

    rx2 = Receiver()
    url2 = await receiver_url(rx2)
    bus, host = make_host({"url": url2, "secret": "not-the-secret", "backoff_initial_s": 0.01})
    await host.start()
    (plugin,) = host.running
    bus.publish(SpeechStarted(session_id="s", seq=1, t=0))
    await until(lambda: plugin.failed == 1, what="refusal")
    assert rx2.bad_signatures == 1 and rx2.attempts == 1  # 401 is permanent: no retry
    await host.stop()


async def test_unreachable_never_blocks_and_queue_is_bounded() -> None:
    bus, host = make_host({"url": f"http://127.0.0.1:{free_port()}/hook", "secret": SECRET, "queue_size": 5,
                           "backoff_initial_s": 10, "flush_timeout_s": 0.1})
    await host.start()
    (plugin,) = host.running
    bus.publish(SpeechStarted(session_id="s", seq=0, t=0))
    await until(lambda: not plugin.queue and not plugin._idle.is_set(), what="first event in flight (waiting to retry)")
    for i in range(1, 21):  # publish never waits on the receiver
        bus.publish(SpeechStarted(session_id="s", seq=i, t=0))
    await until(lambda: plugin.dropped == 15, what="overflow")
    assert [json.loads(b)["seq"] for b in plugin.queue] == [16, 17, 18, 19, 20]
    await host.stop()


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="unknown event types"):
        make_host({"url": "http://x/", "secret": "s", "types": ["response.dnoe"]})
    with pytest.raises(ValueError, match="url"):
        make_host({"url": "not a url", "secret": "s"})
    with pytest.raises(ValueError, match="secret"):
        make_host({"url": "http://x/"})


async def test_malformed_reply_bodies_do_not_matter(receiver_url) -> None:
    """Only the reply's status counts: a receiver answering with JSON nested 60000 deep, a
    5000-digit number, invalid UTF-8 or 4 MB of junk is neither parsed nor a crash."""
    bodies = [b"[" * 60000 + b"]" * 60000, b'{"ok": ' + b"9" * 5000 + b"}", b"\xff\xfe{", b"x" * (4 << 20)]
    seen: list[int] = []

    async def handle(request: web.Request) -> web.Response:
        event = json.loads(await request.read())
        seen.append(event["seq"])
        body = bodies[(event["seq"] - 1) % len(bodies)]
        status = 200 if event["seq"] <= len(bodies) else 400  # then refusals with the same bodies
        return web.Response(status=status, body=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        bus, host = make_host({"url": f"http://127.0.0.1:{port}/hook", "secret": SECRET, "max_retries": 0})
        await host.start()
        (plugin,) = host.running
        assert isinstance(plugin, WebhookPlugin)
        for seq in range(1, 2 * len(bodies) + 1):
            bus.publish(ResponseDelta(session_id="s", seq=seq, turn_id="t", text="x"))
        await until(lambda: plugin.sent + plugin.failed == 2 * len(bodies), what="every event answered")
        assert (plugin.sent, plugin.failed) == (len(bodies), len(bodies))  # 2xx delivered, 4xx refused
        assert seen == list(range(1, 2 * len(bodies) + 1)) and host.status() == {"webhook": "running"}
        await host.stop()
    finally:
        await runner.cleanup()
