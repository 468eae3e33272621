"""One resilient MQTT connection: reconnects with backoff and delivers a bounded outbox in order.

Messages are queued, then published with up to `window` of them in flight (sent, PUBACK not
yet received): a remote broker then allows `window` messages per round trip instead of one.
A message counts as delivered only once the broker acknowledged it (QoS 1). When the
connection drops, the unacknowledged ones go back to the front of the outbox, in their order,
and are sent again first on reconnect: a broker restart loses nothing that fits in the outbox
— at worst a message is delivered twice (MQTT's at-least-once), never out of order (TCP and
the broker keep the order of what one connection sends).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiomqtt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outgoing:
    topic: str
    payload: str | bytes
    qos: int = 1
    retain: bool = False


class MqttConnection:
    def __init__(self, host: str, port: int = 1883, *, username: str | None = None, password: str | None = None,
                 client_id: str | None = None, will: Outgoing | None = None, subscriptions: tuple[str, ...] = (),
                 on_message: Callable[[aiomqtt.Message], Awaitable[None]] | None = None,
                 on_connect: Callable[[], list[Outgoing]] | None = None, outbox_size: int = 10_000,
                 backoff_min: float = 0.1, backoff_max: float = 10.0, keepalive: int = 30,
                 timeout: float = 10.0, window: int = 64, name: str = "mqtt") -> None:
        if window < 1:
            raise ValueError(f"window must be ≥ 1, got {window}")
        self.host, self.port = host, port
        self.username, self.password = username, password
        self.client_id = client_id or f"voice-agent-{uuid.uuid4().hex[:12]}"
        self.will = will
        self.subscriptions = subscriptions
        self.on_message = on_message
        self.on_connect = on_connect  # messages to send first on every (re)connect: status, discovery
        self.backoff_min, self.backoff_max = backoff_min, backoff_max
        self.keepalive, self.timeout = keepalive, timeout
        self.name = name
        self.window = window  # messages in flight (published, not yet acknowledged)
        self.outbox: collections.deque[Outgoing] = collections.deque(maxlen=outbox_size)  # not sent yet
        self.inflight: collections.deque[tuple[Outgoing, asyncio.Task[None]]] = collections.deque()
        self.dropped = 0  # outbox overflow while disconnected for long
        self.published = 0
        self.failed = 0  # refused by the client library (never retried)
        self.peak_inflight = 0
        self.resent = 0  # in flight when a connection dropped: sent again on the next one
        self.connects = 0
        self.last_error: str | None = None
        self.connected = asyncio.Event()
        self._wake = asyncio.Event()  # the writer has work: a new message or an ack
        self._progress = asyncio.Event()  # an ack, or a disconnect (for stop())
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None

    def publish(self, topic: str, payload: str | bytes, qos: int = 1, retain: bool = False) -> None:
        """Queue a message; never blocks. When the outbox is full the oldest message goes."""
        if len(self.outbox) == self.outbox.maxlen:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("%s: outbox full (%d), dropped %d oldest messages", self.name,
                            self.outbox.maxlen, self.dropped)
        self.outbox.append(Outgoing(topic, payload, qos, retain))
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"{self.name}-connection")

    async def wait_connected(self, seconds: float) -> bool:
        try:
            async with asyncio.timeout(seconds):
                await self.connected.wait()
            return True
        except TimeoutError:
            return False

    async def stop(self, flush_timeout: float = 2.0, last: list[Outgoing] | None = None) -> None:
        """Deliver what is queued (bounded wait), then `last` (e.g. status offline), then disconnect."""
        if self._task is None:
            return
        if self.connected.is_set():
            for msg in last or []:
                self.outbox.append(msg)
            self._wake.set()
            try:
                async with asyncio.timeout(flush_timeout):
                    while (self.outbox or self.inflight) and self.connected.is_set():
                        self._progress.clear()
                        await self._progress.wait()  # an ack, or the connection went
            except TimeoutError:
                log.warning("%s: %d messages not delivered at stop", self.name, len(self.outbox) + len(self.inflight))
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        self.connected.clear()

    async def _run(self) -> None:
        backoff = self.backoff_min
        while True:
            connects = self.connects
            try:
                await self._session()
            except aiomqtt.MqttError as exc:
                self.last_error = str(exc)
                if self.connects == 0 and "authori" in str(exc).lower():
                    log.error("%s: broker %s:%d refused the credentials: %s", self.name, self.host, self.port, exc)
                else:
                    log.warning("%s: connection to %s:%d lost or failed (%s); retrying in %.1f s", self.name,
                                self.host, self.port, exc, backoff)
            except Exception:  # a bug must not end reconnection for good
                log.exception("%s: connection loop failed; retrying", self.name)
            self.connected.clear()
            self._progress.set()
            self._client = None
            if self.connects > connects:  # it was up: start again from the shortest wait
                backoff = self.backoff_min
            # Jitter: many agents restarting together must not hammer the broker in step.
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(self.backoff_max, backoff * 2)

    async def _session(self) -> None:
        will = None
        if self.will is not None:
            will = aiomqtt.Will(self.will.topic, self.will.payload, self.will.qos, self.will.retain)
        async with aiomqtt.Client(self.host, self.port, username=self.username, password=self.password,
                                  identifier=self.client_id, will=will, keepalive=self.keepalive,
                                  timeout=self.timeout, max_inflight_messages=self.window,
                                  # small messages in a window: no Nagle wait for the previous ack
                                  socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)) as client:
            client.pending_calls_threshold = self.window + 16  # a full window is normal, not a warning
            self._client = client
            self.connects += 1
            for topic in self.subscriptions:
                await client.subscribe(topic, qos=1)
            for msg in self.on_connect() if self.on_connect else []:
                await client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
            self.connected.set()
            log.info("%s: connected to %s:%d", self.name, self.host, self.port)
            reader = asyncio.create_task(self._reader(client))
            writer = asyncio.create_task(self._writer(client))
            try:
                # The reader ends with MqttError when the connection drops: that also stops
                # the writer, whose pending publishes would otherwise wait for their timeout.
                done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_EXCEPTION)
            finally:
                for task in (reader, writer):
                    task.cancel()
                await asyncio.gather(reader, writer, return_exceptions=True)
                await self._requeue_inflight()
            for task in done:
                task.result()

    async def _reader(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            if self.on_message is None:
                continue
            try:
                await self.on_message(message)
            except Exception:  # a bad message must not drop the connection
                log.exception("%s: handling a message on %s failed", self.name, message.topic)

    async def _writer(self, client: aiomqtt.Client) -> None:
        """Keep up to `window` publishes in flight; retire them in order as their acks come.

        Tasks start in creation order, so paho writes the messages to the socket in outbox
        order; each publish task wakes this loop when it completes."""
        inflight = self.inflight
        while True:
            self._wake.clear()
            while inflight and inflight[0][1].done():
                msg, task = inflight[0]
                exc = task.exception()
                if isinstance(exc, aiomqtt.MqttError):
                    raise exc  # the connection is gone: _session requeues what is in flight
                inflight.popleft()
                if exc is None:
                    self.published += 1
                else:  # paho refused this message itself (e.g. too large): retrying cannot help
                    self.failed += 1
                    log.error("%s: cannot publish to %s: %s: %s", self.name, msg.topic, type(exc).__name__, exc)
            while self.outbox and len(inflight) < self.window:
                msg = self.outbox.popleft()
                task = asyncio.create_task(client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain))
                task.add_done_callback(self._on_sent)
                inflight.append((msg, task))
            self.peak_inflight = max(self.peak_inflight, len(inflight))
            await self._wake.wait()

    def _on_sent(self, _: asyncio.Task[None]) -> None:
        self._wake.set()
        self._progress.set()

    async def _requeue_inflight(self) -> None:
        """After a disconnect: what was not acknowledged goes back to the front, in order."""
        pending = list(self.inflight)
        self.inflight.clear()
        for _, task in pending:
            task.cancel()
        await asyncio.gather(*(task for _, task in pending), return_exceptions=True)
        unacked = [msg for msg, task in pending if task.cancelled() or task.exception() is not None]
        self.published += len(pending) - len(unacked)
        if not unacked:
            return
        self.resent += len(unacked)
        keep = list(self.outbox)
        overflow = len(unacked) + len(keep) - (self.outbox.maxlen or 0)
        if overflow > 0:  # the oldest go, as in publish()
            self.dropped += overflow
            log.warning("%s: outbox full (%d), dropped %d oldest messages", self.name, self.outbox.maxlen, overflow)
        self.outbox.clear()
        self.outbox.extend((unacked + keep)[max(overflow, 0):])
