"""One resilient MQTT connection: reconnects with backoff and delivers a bounded outbox in order.

Messages are queued, then published one at a time; a message leaves the outbox only after
the broker acknowledged it (QoS 1), so a broker restart loses nothing that fits in the
outbox — at worst a message is delivered twice (MQTT's at-least-once), never out of order.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import uuid
from dataclasses import dataclass
from typing import Awaitable, Callable

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
                 timeout: float = 10.0, name: str = "mqtt") -> None:
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
        self.outbox: collections.deque[Outgoing] = collections.deque(maxlen=outbox_size)
        self.dropped = 0  # outbox overflow while disconnected for long
        self.published = 0
        self.connects = 0
        self.last_error: str | None = None
        self.connected = asyncio.Event()
        self._wake = asyncio.Event()
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

    async def wait_connected(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.connected.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def stop(self, flush_timeout: float = 2.0, last: list[Outgoing] | None = None) -> None:
        """Deliver what is queued (bounded wait), then `last` (e.g. status offline), then disconnect."""
        if self._task is None:
            return
        if self.connected.is_set():
            for msg in last or []:
                self.outbox.append(msg)
            self._wake.set()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + flush_timeout
            while self.outbox and self.connected.is_set() and loop.time() < deadline:
                await asyncio.sleep(0.01)
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
                                  timeout=self.timeout) as client:
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
                # the writer, whose pending publish would otherwise wait for its timeout.
                done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_EXCEPTION)
            finally:
                for task in (reader, writer):
                    task.cancel()
                await asyncio.gather(reader, writer, return_exceptions=True)
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
        while True:
            while not self.outbox:
                self._wake.clear()
                await self._wake.wait()
            msg = self.outbox[0]
            await client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
            # Pop only after the ack; overflow may have pushed it out meanwhile.
            if self.outbox and self.outbox[0] is msg:
                self.outbox.popleft()
            self.published += 1
