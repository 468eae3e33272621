"""Webhook plugin: POST selected events to a URL, signed with HMAC-SHA256.

Header `X-Voice-Agent-Signature: sha256=<hex HMAC-SHA256 of the exact body, keyed with
secret>`. Events wait in a bounded queue (the oldest go when it is full) and are sent one
at a time, in order, by a background task, so a slow or dead receiver never blocks the bus.
Failures (connection errors, 408/429/5xx) are retried with exponential backoff a bounded
number of times; other 4xx answers are permanent and not retried.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import logging
import typing

import aiohttp
from pydantic import AnyHttpUrl, Field, field_validator

from agent.events import Event
from agent.plugin import Plugin, PluginConfig, PluginContext

log = logging.getLogger(__name__)

EVENT_TYPES: frozenset[str] = frozenset(
    cls.model_fields["type"].default for cls in typing.get_args(typing.get_args(Event)[0]))
SIGNATURE_HEADER = "X-Voice-Agent-Signature"


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookConfig(PluginConfig):
    url: AnyHttpUrl
    secret: str = Field(min_length=1)
    types: list[str] | None = None  # None: every event type
    queue_size: int = Field(1000, ge=1)
    max_retries: int = Field(5, ge=0, le=20)
    backoff_initial_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    timeout_s: float = Field(10.0, gt=0)
    headers: dict[str, str] = Field(default_factory=dict)
    flush_timeout_s: float = Field(2.0, ge=0)  # how long stop() lets queued events go out

    @field_validator("types")
    @classmethod
    def _known_types(cls, v: list[str] | None) -> list[str] | None:
        unknown = sorted(set(v or ()) - EVENT_TYPES)
        if unknown:
            raise ValueError(f"unknown event types {unknown}; known: {', '.join(sorted(EVENT_TYPES))}")
        return v


class _Permanent(Exception):
    """The receiver refused the event for good (a 4xx other than 408/429)."""


class WebhookPlugin(Plugin):
    name = "webhook"
    Config = WebhookConfig

    def __init__(self, config: WebhookConfig, context: PluginContext) -> None:
        super().__init__(config, context)
        self.config: WebhookConfig = config
        self.types = set(config.types) if config.types is not None else None
        self.queue: collections.deque[bytes] = collections.deque(maxlen=config.queue_size)
        self.sent = 0
        self.failed = 0  # gave up after retries or refused
        self.dropped = 0  # queue overflow
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.timeout_s))
        self._task = asyncio.create_task(self._sender(), name="webhook-sender")

    async def stop(self) -> None:
        if self._task is not None:
            try:  # give queued events a short chance to go out
                await asyncio.wait_for(self._idle.wait(), self.config.flush_timeout_s)
            except TimeoutError:
                log.warning("webhook: %d events not delivered at stop", len(self.queue))
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def on_event(self, event: Event) -> None:
        if self.types is not None and event.type not in self.types:
            return
        if len(self.queue) == self.queue.maxlen:
            self.dropped += 1
            log.warning("webhook: queue full, dropped the oldest event (%d so far)", self.dropped)
        self.queue.append(event.model_dump_json().encode())
        self._idle.clear()
        self._wake.set()

    async def _sender(self) -> None:
        while True:
            while not self.queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
            body = self.queue.popleft()
            try:
                await self._deliver(body)
                self.sent += 1
            except _Permanent as exc:
                self.failed += 1
                log.error("webhook: %s refused an event: %s", self.config.url, exc)
            except Exception as exc:
                self.failed += 1
                log.error("webhook: giving up on an event after %d retries: %s", self.config.max_retries, exc)

    async def _deliver(self, body: bytes) -> None:
        assert self._session is not None
        headers = {**self.config.headers, "Content-Type": "application/json",
                   SIGNATURE_HEADER: sign(self.config.secret, body)}
        delay = self.config.backoff_initial_s
        for attempt in range(self.config.max_retries + 1):
            try:
                # Only the status counts: the reply's body is never read or parsed, so a
                # receiver answering with malformed or huge JSON cannot hurt us.
                async with self._session.post(str(self.config.url), data=body, headers=headers) as resp:
                    if resp.status < 300:
                        return
                    reason = f"HTTP {resp.status}"
                    if 400 <= resp.status < 500 and resp.status not in (408, 429):
                        raise _Permanent(reason)
            except (TimeoutError, aiohttp.ClientError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            if attempt == self.config.max_retries:
                raise RuntimeError(reason)
            log.warning("webhook: delivery failed (%s); retry %d in %.2f s", reason, attempt + 1, delay)
            await asyncio.sleep(delay)
            delay = min(self.config.backoff_max_s, delay * 2)
