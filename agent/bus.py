"""The event bus: every session publishes here; transports and plugins subscribe.

Subscribers get their own bounded queue, so a slow plugin can never stall a session:
when its queue is full the oldest event is dropped and counted.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Protocol

from agent.events import Command, Event

log = logging.getLogger(__name__)


class Subscription:
    def __init__(self, bus: "EventBus", session_id: str | None, maxsize: int) -> None:
        self._bus = bus
        self.session_id = session_id  # None: every session
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        self.dropped = 0

    def _offer(self, event: Event) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(event)

    async def get(self) -> Event:
        return await self.queue.get()

    def close(self) -> None:
        self._bus._subs.discard(self)

    def __aiter__(self) -> "Subscription":
        return self

    async def __anext__(self) -> Event:
        return await self.queue.get()


class EventBus:
    def __init__(self) -> None:
        self._subs: set[Subscription] = set()
        self._listeners: list[Callable[[Event], Any]] = []

    def subscribe(self, session_id: str | None = None, maxsize: int = 1024) -> Subscription:
        sub = Subscription(self, session_id, maxsize)
        self._subs.add(sub)
        return sub

    def add_listener(self, fn: Callable[[Event], Any]) -> None:
        """Synchronous callback on every event (must not block; used by metrics)."""
        self._listeners.append(fn)

    def publish(self, event: Event) -> None:
        for fn in self._listeners:
            try:
                fn(event)
            except Exception:  # a faulty listener must not break the session
                log.exception("event listener failed")
        for sub in list(self._subs):
            if sub.session_id is None or sub.session_id == event.session_id:
                sub._offer(event)


class CommandTarget(Protocol):
    """What plugins and transports send client commands to (the session manager)."""

    async def send_command(self, session_id: str | None, command: Command) -> None:
        """Deliver `command` to one session, or to every session when session_id is None.

        Raises KeyError for an unknown session id.
        """
        ...

    def report_error(self, session_id: str | None, code: str, message: str) -> None:
        """Emit an `error` event on that session (all sessions when None) — e.g. a bad
        command that arrived over MQTT; the event reaches every subscriber as usual."""
        ...
