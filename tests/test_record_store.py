"""The recording with N writers: a row and its WAV exist together or not at all, a live
session's deletion stops its recording and leaves nothing, writes never run on the event loop,
and a frontend opening the recording never deletes a sibling's in-flight file."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import agent.record.store as store_module
from agent.config import load_settings
from agent.inference.scripted import ScriptedBackend
from agent.record import RecordingStore, TurnRecord
from agent.runtime import AgentRuntime

GUARD = 60.0


def turn(session_id: str, n: int, seconds: float = 0.3) -> TurnRecord:
    audio = np.random.default_rng(n).uniform(-0.2, 0.2, int(seconds * 16000)).astype(np.float32)
    return TurnRecord(session_id=session_id, turn_id=f"{session_id}-t{n}", n=n, audio=audio, mode="chat",
                      instruction=None, history=[], messages=[{"role": "user", "content": "", "audio": True},
                                                              {"role": "assistant", "content": "ok"}],
                      answer="ok", tool_calls=[], tool_results=[], status="done", timings={})


def files(root: Path) -> list[str]:
    """Everything in the recording but the database."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and not p.name.startswith("recordings.db"))


def test_a_turn_whose_row_fails_to_commit_leaves_no_audio(tmp_path: Path) -> None:
    store = RecordingStore.open(tmp_path)
    try:
        store.add_session("s1", "m", None)
        store.add_turn(turn("s1", 1))
        store.db.execute("CREATE TRIGGER refuse BEFORE INSERT ON turns BEGIN SELECT RAISE(ABORT, 'refused'); END")
        with pytest.raises(sqlite3.Error, match="refused"):
            store.add_turn(turn("s1", 2))
        assert [t["turn_id"] for t in store.turns()] == ["s1-t1"]
    finally:
        store.close()
    assert files(tmp_path) == ["s1/s1-t1.wav"]  # no WAV of the turn that has no row, no temporary file


def test_a_turn_of_a_deleted_session_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    writer = RecordingStore.open(tmp_path)
    cli = RecordingStore.open(tmp_path, create=False)  # `voice-agent data delete`, another process
    try:
        writer.add_session("s1", "m", None)
        writer.add_turn(turn("s1", 1))
        assert cli.delete_session("s1")
        with pytest.raises(store_module.SessionGone):
            writer.add_turn(turn("s1", 2))
        with pytest.raises(store_module.SessionGone):
            writer.add_feedback("s1", "s1-t1", "up", None)
        assert cli.sessions() == [] and cli.feedback() == []
    finally:
        writer.close()
        cli.close()
    assert files(tmp_path) == [] and not (tmp_path / "s1").exists()


def test_opening_sweeps_orphans_but_not_a_siblings_file_in_flight(tmp_path: Path) -> None:
    store = RecordingStore.open(tmp_path)
    store.add_session("s1", "m", None)
    store.add_turn(turn("s1", 1))
    store.close()
    sibling = subprocess.Popen(["sleep", "60"])  # a live frontend writing this recording
    gone = subprocess.Popen(["true"])
    gone.wait()  # a frontend that died mid-write
    try:
        folder = tmp_path / "s1"
        (folder / "s1-t9.wav").write_bytes(b"RIFF")  # renamed into place, then the process died before its commit
        (folder / f".s1-t2.wav.{sibling.pid}-abcd.tmp").write_bytes(b"RIFF")
        (folder / f".s1-t3.wav.{gone.pid}-abcd.tmp").write_bytes(b"RIFF")
        (tmp_path / "deleted-session").mkdir()  # `data delete` committed, then died before removing the audio
        (tmp_path / "deleted-session" / "x.wav").write_bytes(b"RIFF")
        RecordingStore.open(tmp_path).close()  # another frontend starts
        assert files(tmp_path) == [f"s1/.s1-t2.wav.{sibling.pid}-abcd.tmp", "s1/s1-t1.wav"]
    finally:
        sibling.kill()
        sibling.wait()
    RecordingStore.open(tmp_path).close()  # the sibling is gone now: its temporary file is stale
    assert files(tmp_path) == ["s1/s1-t1.wav"]


def test_n_writers_and_restarts_lose_no_turn_and_leave_no_orphan(tmp_path: Path) -> None:
    RecordingStore.open(tmp_path).close()
    errors: list[BaseException] = []
    stop = threading.Event()

    def frontend(name: str) -> None:
        store = RecordingStore.open(tmp_path)
        try:
            store.add_session(name, "m", None)
            for n in range(1, 16):
                store.add_turn(turn(name, n, 1.0))
        except BaseException as exc:
            errors.append(exc)
        finally:
            store.close()

    def restarts() -> None:  # a sibling frontend restarting again and again: it sweeps on open
        while not stop.is_set():
            RecordingStore.open(tmp_path).close()

    writers = [threading.Thread(target=frontend, args=(f"f{i}",)) for i in range(2)]
    sweeper = threading.Thread(target=restarts)
    sweeper.start()
    for w in writers:
        w.start()
    for w in writers:
        w.join(GUARD)
    stop.set()
    sweeper.join(GUARD)
    assert errors == []
    store = RecordingStore.open(tmp_path)
    try:
        turns = store.turns()
    finally:
        store.close()
    assert len(turns) == 30 and all(Path(t["audio"]).is_file() for t in turns)
    assert files(tmp_path) == sorted(str(Path(t["audio"]).relative_to(tmp_path)) for t in turns)


# ---- through the runtime ----------------------------------------------------------------------
def runtime_for(record: Path) -> AgentRuntime:
    backend = ScriptedBackend(turns=[["Hello, how can I help?"], ["It is sunny today."]])
    return AgentRuntime(load_settings(None, record=str(record)), backend=backend)


async def push(session: Any, samples: np.ndarray) -> None:
    for i in range(0, samples.size, 16000):
        await session.push_audio(samples[i : i + 16000])


async def wait_for(events: Any, kind: str, n: int, seen: list[Any]) -> None:
    async with asyncio.timeout(GUARD):
        while sum(e.type == kind for e in seen) < n:
            seen.append(await events.queue.get())


async def test_deleting_a_live_session_stops_its_recording_cleanly(tmp_path: Path, speech_two: Any) -> None:
    rec = tmp_path / "rec"
    runtime = runtime_for(rec)
    await runtime.start()
    seen: list[Any] = []
    try:
        session, events = runtime.open_session()
        (first, second) = speech_two.segments
        cut = int((first[1] + second[0]) / 2 * 16000)
        await push(session, speech_two.samples[:cut])
        await wait_for(events, "response.done", 1, seen)
        assert runtime.recorder is not None
        await runtime.recorder.drain()
        cli = RecordingStore.open(rec, create=False)
        try:
            assert cli.delete_session(session.id)  # while the conversation goes on
        finally:
            cli.close()
        await push(session, speech_two.samples[cut:])
        await session.finish()
        await wait_for(events, "response.done", 2, seen)
        await session.context.feedback(f"{session.id}-t2", "up")
        await runtime.recorder.drain()
        while not events.queue.empty():
            seen.append(events.queue.get_nowait())
    finally:
        await runtime.close()
    assert [e.code for e in seen if e.type == "error"] == []  # stopped, not failed
    store = RecordingStore.open(rec, create=False)
    try:
        assert store.sessions() == [] and store.turns() == [] and store.feedback() == []
    finally:
        store.close()
    assert files(rec) == []  # no voice left that `data list` would not show


async def test_a_locked_database_stalls_no_session(tmp_path: Path, speech_two: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process holds the write lock (a `data delete`, a sibling's long write): the
    session's turns are answered meanwhile, and recorded once the lock is released."""
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_S", GUARD, raising=False)
    rec = tmp_path / "rec"
    runtime = runtime_for(rec)
    await runtime.start()
    other = sqlite3.connect(rec / "recordings.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # held by "another process"
    seen: list[Any] = []
    try:
        session, events = runtime.open_session()
        await push(session, speech_two.samples)
        await session.finish()
        await wait_for(events, "response.done", 2, seen)
        stored = other.execute("SELECT count(*) FROM turns").fetchone()[0]
        other.execute("COMMIT")  # released
        assert runtime.recorder is not None
        await asyncio.wait_for(runtime.recorder.drain(), GUARD)
        while not events.queue.empty():
            seen.append(events.queue.get_nowait())
    finally:
        other.close()
        await runtime.close()
    assert stored == 0 and [e.code for e in seen if e.type == "error"] == []
    store = RecordingStore.open(rec, create=False)
    try:
        assert [t["answer"] for t in store.turns()] == ["Hello, how can I help?", "It is sunny today."]
    finally:
        store.close()


def test_a_stale_temporary_file_by_age_and_by_pid(tmp_path: Path) -> None:
    mine = tmp_path / f".a.wav.{os.getpid()}-00.tmp"
    mine.write_bytes(b"x")
    legacy = tmp_path / ".b.wav.tmp"
    legacy.write_bytes(b"x")
    now = mine.stat().st_mtime
    assert not store_module._stale_tmp(mine, now) and not store_module._stale_tmp(legacy, now)
    assert store_module._stale_tmp(mine, now + store_module.STALE_TMP_S + 1)  # a reused pid cannot keep it
    assert store_module._stale_tmp(legacy, now + store_module.LEGACY_TMP_S + 1)
