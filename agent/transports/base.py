"""What every transport shares: bounded audio ingress, event egress, one command handler.

A transport (WebRTC, WHIP, files, a LiveKit room, Wyoming) opens its session with
`runtime.open_session()`, which gives the session and its events with `session.started`
first, then wires three things:

- `AudioIngress`: its reader `put()`s 16 kHz mono float32 pieces without ever blocking; a
  feeder hands everything queued to `session.push_audio` at once. When the pipeline falls
  more than `max_seconds` behind, the oldest pieces are dropped and counted (`on_dropped`,
  shown in `/metrics`): the one drop policy. A pipeline failure becomes an `error` event
  and closes the session with reason `error`.
- `EventEgress`: the session's events to the client, in order, until `session.ended`; then
  `on_ended`, so that a session closed from any side (a command over MQTT, an idle timeout,
  the agent itself) takes its transport down with it and frees its slot.
- `handle_command`: a client command (JSON text) parsed and applied; a bad one becomes an
  `error` event (`bad_command`), never an exception.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import AsyncIterable, Awaitable, Callable
from typing import Any, Protocol

import numpy as np

from agent import events as ev
from agent.model.qwen2_audio import SAMPLE_RATE

log = logging.getLogger(__name__)


class SessionLike(Protocol):
    id: str
    closed: bool

    async def push_audio(self, samples: np.ndarray) -> None: ...

    async def handle(self, command: ev.Command) -> None: ...

    async def close(self, reason: str = "closed") -> None: ...

    def report_error(self, code: str, message: str) -> None: ...


class AudioIngress:
    def __init__(self, session: SessionLike, max_seconds: float = 2.0,
                 on_dropped: Callable[[int], None] | None = None, name: str = "audio") -> None:
        self.session = session
        self.max_samples = max(1, int(max_seconds * SAMPLE_RATE))
        self.on_dropped = on_dropped
        self.frames = 0  # pieces received, dropped ones included
        self.samples = 0
        self.dropped_frames = 0
        self._buf: deque[np.ndarray] = deque()
        self._queued = 0  # samples in _buf
        self._ready = asyncio.Event()
        self._ended = False  # no more input: the feeder drains and stops
        self._closing: asyncio.Task[None] | None = None
        self._feeder = asyncio.create_task(self._feed(), name=f"{name}-feed-{session.id}")

    @property
    def running(self) -> bool:
        return not self._feeder.done()

    def put(self, samples: np.ndarray) -> None:
        """Queue a piece (never blocks); beyond `max_seconds` the oldest pieces go."""
        if not samples.size or self._ended:
            return
        self.frames += 1
        self.samples += samples.size
        self._buf.append(samples)
        self._queued += samples.size
        dropped = 0
        while self._queued > self.max_samples and len(self._buf) > 1:
            self._queued -= self._buf.popleft().size
            dropped += 1
        if dropped:
            self.dropped_frames += dropped
            if self.on_dropped is not None:
                self.on_dropped(dropped)
        self._ready.set()

    def end(self) -> None:
        """No more audio: what is queued still goes in, then the feeder stops."""
        self._ended = True
        self._ready.set()

    async def _feed(self) -> None:
        session = self.session
        try:
            while not session.closed:
                if not self._buf:
                    if self._ended:  # checked only when drained: the last pieces still go in
                        return
                    await self._ready.wait()
                    self._ready.clear()
                    continue
                pieces = list(self._buf)
                self._buf.clear()
                self._queued = 0
                await session.push_audio(pieces[0] if len(pieces) == 1 else np.concatenate(pieces))
        except Exception as exc:  # e.g. the VAD service died: end this session, not the server
            log.exception("session %s: audio pipeline failed", session.id)
            session.report_error("internal", f"audio pipeline failed: {exc}")
            self._closing = asyncio.create_task(session.close("error"), name=f"ingress-close-{session.id}")

    async def aclose(self, timeout: float = 2.0) -> None:
        """Stop: what was already queued still reaches the session (bounded wait)."""
        self.end()
        try:
            await asyncio.wait_for(asyncio.shield(self._feeder), timeout)
        except (TimeoutError, Exception):
            self._feeder.cancel()
            await asyncio.gather(self._feeder, return_exceptions=True)
        if self._closing is not None:
            await asyncio.gather(self._closing, return_exceptions=True)
        if self.dropped_frames:
            log.info("session %s: %d of %d audio pieces dropped (pipeline too slow)",
                     self.session.id, self.dropped_frames, self.frames)


class EventEgress:
    """Pumps one session's events to `send` until `session.ended`, then calls `on_ended`.
    `send` may be sync or async; a failing send loses that event (logged), not the session."""

    def __init__(self, session_id: str, events: AsyncIterable[ev.Event],
                 send: Callable[[ev.Event], Awaitable[None] | None],
                 on_ended: Callable[[str], Any] | None = None, name: str = "events") -> None:
        self.session_id = session_id
        self._events = events
        self._send = send
        self._on_ended = on_ended
        self.failed = 0
        self.task = asyncio.create_task(self._pump(), name=f"{name}-egress-{session_id}")

    async def _pump(self) -> None:
        async for event in self._events:  # ends early if the bus cut us off (could not keep up)
            try:
                result = self._send(event)
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                self.failed += 1
                log.warning("session %s: %s event not delivered: %s", self.session_id, event.type, exc)
            if isinstance(event, ev.SessionEnded):
                if self._on_ended is not None:
                    result = self._on_ended(event.reason)
                    if inspect.isawaitable(result):
                        await result
                return
        # The bus disconnected this client (it fell too far behind): the transport goes too,
        # rather than staying open with no events.
        log.warning("session %s: event stream cut off (client too slow): closing", self.session_id)
        if self._on_ended is not None:
            result = self._on_ended("events_overflow")
            if inspect.isawaitable(result):
                await result

    async def wait(self, timeout: float) -> None:
        """Wait for `session.ended` to go out (bounded), then stop."""
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout)
        except TimeoutError:
            pass
        await self.aclose()

    async def aclose(self) -> None:
        if self.task is not asyncio.current_task():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


async def handle_command(session: SessionLike, message: str | bytes) -> None:
    """A client command from any transport; a bad one becomes an `error` event."""
    command = ev.read_command(message)
    if isinstance(command, str):
        session.report_error("bad_command", command)
        return
    if session.closed:
        return
    try:
        await session.handle(command)
    except Exception as exc:  # one bad command must not take the transport down
        log.exception("session %s: command %s failed", session.id, command.type)
        session.report_error("command_failed", f"{command.type}: {exc}")
