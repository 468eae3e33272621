"""`--record DIR`: every session's turns and feedback, written as they finish.

The recorder sits on the session's event sink (`Recorder.sink(publish)`): it passes each event
on first, then follows the turn it belongs to — the user's audio (taken from the session's
history when `turn.committed` goes out), the answer's text and tool rounds — and writes the
turn when its response ends (`response.done`, `response.cancelled` or an `error`).

Writes never run on the event loop: one writer thread per process owns the database
connection and takes the writes in order (WAV encoding, fsync-free file writes, SQLite's
10 s busy timeout while a sibling frontend or `voice-agent data delete` holds the lock). The
loop only hands them over, so a slow disk or a locked database stalls no session. A failed
write (a full disk: ENOSPC) is an `error` event (`recording_failed`) of that session, and the
conversation goes on. A session deleted while live (`voice-agent data delete`) stops being
recorded at its next write, which leaves nothing behind (`SessionGone`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent import events as ev
from agent.model.qwen2_audio import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from agent.record.store import RecordingStore, SessionGone, TurnRecord
from agent.tools import ToolOutcome, format_tool_responses

log = logging.getLogger(__name__)


@dataclass
class _Turn:
    turn_id: str
    audio: np.ndarray
    mode: str
    instruction: str | None
    messages: list[dict[str, Any]] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)

    def text(self, piece: str) -> None:
        """Text the model said: joins the assistant message of the round under way."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            self.messages.append({"role": "assistant", "content": ""})
        self.messages[-1]["content"] += piece


@dataclass
class _SessionState:
    n: int = 0
    recorded: list[str] = field(default_factory=list)  # turn ids on disk, in order
    turns: dict[str, _Turn] = field(default_factory=dict)  # in progress
    call_turn: dict[str, str] = field(default_factory=dict)  # call_id → turn_id
    gone: bool = False  # deleted while live: no longer recorded


class Recorder:
    def __init__(self, directory: str | Path, lookup: Callable[[str], Any]) -> None:
        """`lookup(session_id)`: the live session (its history holds the turn's audio, and its
        `report_error` says when a write failed)."""
        self.directory = Path(directory)
        self._lookup = lookup
        self._store: RecordingStore | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: set[Future[None]] = set()
        self._sessions: dict[str, _SessionState] = {}
        self.failures = 0  # writes that failed (full disk, …)

    def open(self) -> None:
        """Create the directory and database (in the writer thread, at start-up: its sweep may
        read the whole directory); raises ValueError saying why not (nothing starts)."""
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recorder")
        try:
            self._store = self._writer.submit(RecordingStore.open, self.directory).result()
        except (OSError, sqlite3.Error) as exc:
            self._writer.shutdown()
            self._writer = None
            raise ValueError(f"record: {self.directory}: {exc}") from None
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None

    async def drain(self) -> None:
        """Wait until every write handed over so far is done."""
        while self._pending:
            await asyncio.gather(*(asyncio.wrap_future(f) for f in list(self._pending)), return_exceptions=True)

    async def aclose(self) -> None:
        await self.drain()
        self.close()

    def close(self) -> None:
        """Finish the writes handed over (blocking), then close the database."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        if self._store is not None:
            self._store.close()
            self._store = None

    def _write(self, session_id: str, write: Callable[[RecordingStore], None]) -> None:
        """Hand `write` to the writer thread; its failure is reported back on the loop."""
        assert self._writer is not None and self._store is not None
        store = self._store
        future = self._writer.submit(write, store)
        self._pending.add(future)

        def done(f: Future[None]) -> None:
            try:
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self._written, session_id, f)
            except (AssertionError, RuntimeError):  # no loop (any more): nobody to tell but the log
                self._pending.discard(f)
                if f.exception() is not None and not isinstance(f.exception(), SessionGone):
                    log.warning("session %s: recording failed: %s", session_id, f.exception())

        future.add_done_callback(done)

    def _written(self, session_id: str, future: Future[None]) -> None:
        self._pending.discard(future)
        exc = future.exception()
        if exc is None:
            return
        if isinstance(exc, SessionGone):
            state = self._sessions.get(session_id)
            if state is not None and not state.gone:
                state.gone = True
                log.info("session %s: its recording was deleted: no longer recorded", session_id)
            return
        self.failures += 1
        log.warning("session %s: recording failed: %s", session_id, exc)
        session = self._lookup(session_id)
        if session is not None:
            session.report_error("recording_failed", f"recording failed ({type(exc).__name__}: {exc}); "
                                 "the conversation goes on")

    def sink(self, publish: Callable[[ev.Event], None]) -> Callable[[ev.Event], None]:
        def recording_sink(event: ev.Event) -> None:
            publish(event)
            self.observe(event)

        return recording_sink

    def observe(self, event: ev.Event) -> None:
        if self._store is None or (isinstance(event, ev.Error) and event.code == "recording_failed"):
            return
        try:
            self._observe(event)
        except Exception as exc:  # a bug here must never break the session's events
            self.failures += 1
            log.warning("session %s: recording failed: %s", event.session_id, exc)

    def _observe(self, event: ev.Event) -> None:
        assert self._store is not None
        sid = event.session_id
        if isinstance(event, ev.SessionStarted):
            session = self._lookup(sid)
            prompt = None  # the system message the model sees, tool schemas included (None: the template's)
            if session is not None:
                prompt = session.conversation.system_message(session.replies.tools_block())
            self._sessions[sid] = _SessionState()
            model = event.model
            self._write(sid, lambda store: store.add_session(sid, model, prompt))
            return
        state = self._sessions.get(sid)
        if state is None or (state.gone and not isinstance(event, ev.SessionEnded)):
            return
        if isinstance(event, ev.TurnCommitted):
            session = self._lookup(sid)
            audio = session.conversation.last_user_audio() if session is not None else None
            if audio is not None:
                state.turns[event.turn_id] = _Turn(event.turn_id, audio, event.mode, event.instruction,
                                                   [{"role": "user", "content": event.instruction or "", "audio": True}])
        elif isinstance(event, ev.ResponseDelta):
            if (turn := state.turns.get(event.turn_id)) is not None:
                turn.text(event.text)
        elif isinstance(event, ev.ToolCall):
            if (turn := state.turns.get(event.turn_id)) is not None:
                call = {"call_id": event.call_id, "name": event.name, "arguments": event.arguments}
                turn.calls.append(call)
                turn.text(tool_call_text(event.name, event.arguments))
                state.call_turn[event.call_id] = event.turn_id
        elif isinstance(event, ev.ToolResult):
            turn_id = state.call_turn.pop(event.call_id, None)
            if turn_id is not None and (turn := state.turns.get(turn_id)) is not None:
                self._tool_result(turn, event)
        elif isinstance(event, ev.ResponseDone):
            self._finish(sid, state, event.turn_id, "done", event.text, event.timings)
        elif isinstance(event, ev.ResponseCancelled):
            self._finish(sid, state, event.turn_id, "cancelled", event.spoken_text, {})
        elif isinstance(event, ev.Error) and event.turn_id and not event.code.startswith("tts_"):
            # The answer failed (inference); a speech-out error leaves the text answer running.
            self._finish(sid, state, event.turn_id, "error", None, {})
        elif isinstance(event, ev.FeedbackReceived):
            turn_id, rating, correction = event.turn_id, event.rating, event.correction
            self._write(sid, lambda store: store.add_feedback(sid, turn_id, rating, correction))
        elif isinstance(event, ev.SessionEnded):
            del self._sessions[sid]
            if not state.gone:
                reason = event.reason
                self._write(sid, lambda store: store.end_session(sid, reason))

    @staticmethod
    def _tool_result(turn: _Turn, event: ev.ToolResult) -> None:
        name = next((c["name"] for c in turn.calls if c["call_id"] == event.call_id), None)
        turn.results.append({"call_id": event.call_id, "ok": event.ok, "result": event.result, "error": event.error})
        text = format_tool_responses([ToolOutcome(event.call_id, name, event.ok, event.result, event.error)])
        if turn.messages[-1]["role"] == "tool":  # the results of one round are one user/tool turn
            turn.messages[-1]["content"] += "\n" + text
        else:
            turn.messages.append({"role": "tool", "content": text})

    def _finish(self, sid: str, state: _SessionState, turn_id: str, status: str, shown: str | None,
                timings: dict[str, float]) -> None:
        turn = state.turns.pop(turn_id, None)
        if turn is None:
            return  # not a user turn (an agent's greeting), or already written
        answer = "".join(m["content"] for m in turn.messages if m["role"] == "assistant") if shown is None else shown
        if status == "cancelled" and turn.messages[-1]["role"] == "assistant":
            turn.messages[-1]["content"] = shown or ""  # the history keeps what the user heard
        state.n += 1
        record = TurnRecord(session_id=sid, turn_id=turn_id, n=state.n, audio=turn.audio, mode=turn.mode,
                            instruction=turn.instruction, history=list(state.recorded), messages=turn.messages,
                            answer=answer, tool_calls=turn.calls, tool_results=turn.results, status=status,
                            timings=timings)
        self._write(sid, lambda store: store.add_turn(record))
        state.recorded.append(turn_id)


def tool_call_text(name: str, arguments: dict[str, Any]) -> str:
    """A tool call as the model wrote it (Qwen2.5's markup), for the recorded history."""
    return f"{TOOL_CALL_OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{TOOL_CALL_CLOSE}"
