"""The event bus: every session publishes here; transports and plugins subscribe.

Each subscriber has its own queue, so a slow one never stalls a session. What happens when
a subscriber falls behind (its queue holds `maxsize` events or more):

- `response.delta`: merged into the previous delta of the same session and turn, if that is
  the session's latest queued event (text concatenated). The merged delta carries the `seq`
  of the LAST delta folded into it, so `seq` stays strictly increasing per session; the seqs
  of the folded deltas are skipped: a gap in `seq` means events were merged or dropped.
- `speech.started` / `speech.stopped`: dropped (momentary state; the turn events that follow
  say what was heard).
- everything else — `session.*`, `turn.committed`, `response.started|done|cancelled`,
  `tool.*`, `error`, and any type not named above — is never dropped: it is queued beyond
  `maxsize`. When the queue reaches the hard cap it is compacted (all mergeable deltas merged,
  droppable events removed); if that does not bring it back below halfway between `maxsize`
  and the hard cap, the subscriber cannot keep up and is disconnected: its queue is emptied
  (counted as dropped), a warning is logged, `get()` raises `SubscriptionClosed` and
  `async for` ends.

Every drop, merge and disconnect is counted on the subscription and in `EventBus.stats`
(exported by agent/server/metrics.py).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from collections.abc import Callable
from typing import Any, Protocol

from agent.events import Command, Event, ResponseDelta

log = logging.getLogger(__name__)

DROPPABLE = frozenset({"speech.started", "speech.stopped"})
MERGEABLE = "response.delta"
MERGE_LOOKBACK = 64  # how far back (events of other sessions) a delta looks for its turn's delta
STAT_KEYS = ("events_dropped", "deltas_merged", "subscribers_disconnected")


class SubscriptionClosed(Exception):
    """The bus disconnected this subscriber because it could not keep up."""


class _EventQueue(asyncio.Queue):  # type: ignore[type-arg]
    """An unbounded asyncio.Queue (limits are the Subscription's) whose items can be merged
    or removed in place; every removal is `task_done()` so `join()` stays correct."""

    _queue: collections.deque[Event]

    def merge_tail(self, delta: ResponseDelta) -> bool:
        """Fold `delta` into the latest queued event of its session when that is a delta of
        the same turn, looking back at most MERGE_LOOKBACK events."""
        dq = self._queue
        for back, queued in enumerate(itertools.islice(reversed(dq), MERGE_LOOKBACK)):
            if queued.session_id != delta.session_id:
                continue
            if isinstance(queued, ResponseDelta) and queued.turn_id == delta.turn_id:
                dq[len(dq) - 1 - back] = _merged(queued, delta)
                return True
            return False
        return False

    def compact(self) -> tuple[int, int]:
        """Merge every mergeable run and remove droppable events; returns (dropped, merged)."""
        out: list[Event] = []
        last: dict[str, int] = {}  # session → index in `out` of its latest event
        dropped = merged = 0
        for event in self._queue:
            if event.type in DROPPABLE:
                dropped += 1
                continue
            i = last.get(event.session_id)
            if isinstance(event, ResponseDelta) and i is not None:
                prev = out[i]
                if isinstance(prev, ResponseDelta) and prev.turn_id == event.turn_id:
                    out[i] = _merged(prev, event)
                    merged += 1
                    continue
            last[event.session_id] = len(out)
            out.append(event)
        self._queue.clear()
        self._queue.extend(out)
        self._done(dropped + merged)
        return dropped, merged

    def discard_all(self) -> int:
        n = len(self._queue)
        self._queue.clear()
        self._done(n)
        return n

    def _done(self, n: int) -> None:
        for _ in range(n):
            self.task_done()


def _merged(first: ResponseDelta, then: ResponseDelta) -> ResponseDelta:
    # A copy: the queued event object is shared with other subscribers.
    return first.model_copy(update={"text": first.text + then.text, "seq": then.seq})


class Subscription:
    def __init__(self, bus: EventBus, session_id: str | None, maxsize: int,
                 hard_cap: int | None = None, name: str | None = None) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be ≥ 1, got {maxsize}")
        self._bus = bus
        self.session_id = session_id  # None: every session
        self.maxsize = maxsize  # beyond it: merge deltas, drop speech events
        self.hard_cap = max(hard_cap or 2 * maxsize, maxsize + 1)  # beyond it: compact or disconnect
        self.name = name or (f"session {session_id}" if session_id is not None else "all sessions")
        self.queue: _EventQueue = _EventQueue()
        self.dropped = 0
        self.merged = 0
        self.disconnect_reason: str | None = None
        self._ready = asyncio.Event()

    def _offer(self, event: Event) -> None:
        q = self.queue
        if q.qsize() >= self.maxsize:
            if event.type in DROPPABLE:
                self._count(dropped=1)
                return
            if isinstance(event, ResponseDelta) and q.merge_tail(event):
                self._count(merged=1)
                return
        q.put_nowait(event)
        self._ready.set()
        if q.qsize() >= self.hard_cap:
            dropped, merged = q.compact()
            self._count(dropped=dropped, merged=merged)
            # Compaction must free half the room above maxsize, else the subscriber is hopeless
            # (this also keeps compaction amortised O(1) per event).
            if q.qsize() >= self.maxsize + (self.hard_cap - self.maxsize + 1) // 2:
                self._disconnect(f"{q.qsize()} events it must not lose are waiting "
                                 f"(limit {self.maxsize}, hard cap {self.hard_cap})")

    def _count(self, dropped: int = 0, merged: int = 0) -> None:
        self.dropped += dropped
        self.merged += merged
        stats = self._bus.stats
        stats["events_dropped"] += dropped
        stats["deltas_merged"] += merged

    def _disconnect(self, reason: str) -> None:
        self.disconnect_reason = reason
        self._bus._subs.discard(self)
        self._count(dropped=self.queue.discard_all())
        self._bus.stats["subscribers_disconnected"] += 1
        log.warning("event subscriber (%s) disconnected, it cannot keep up: %s", self.name, reason)
        self._ready.set()

    async def get(self) -> Event:
        """The next event; raises SubscriptionClosed once the bus has disconnected us."""
        while self.queue.empty():
            if self.disconnect_reason is not None:
                raise SubscriptionClosed(f"{self.name}: {self.disconnect_reason}")
            self._ready.clear()
            await self._ready.wait()
        return self.queue.get_nowait()

    def close(self) -> None:
        self._bus._subs.discard(self)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.get()
        except SubscriptionClosed:
            raise StopAsyncIteration from None


class EventBus:
    def __init__(self) -> None:
        self._subs: set[Subscription] = set()
        self._listeners: list[Callable[[Event], Any]] = []
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)

    def subscribe(self, session_id: str | None = None, maxsize: int = 1024, *,
                  hard_cap: int | None = None, name: str | None = None) -> Subscription:
        """Events of one session (or all when None). `maxsize`: backlog before deltas are
        merged and speech events dropped; `hard_cap` (default 2 × maxsize): backlog that
        gets the subscriber disconnected if compaction cannot bring it under `maxsize`."""
        sub = Subscription(self, session_id, maxsize, hard_cap, name)
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
