"""The recording on disk: an SQLite database beside one WAV file per user turn.

    DIR/recordings.db            sessions, turns (prompt history, answer, tool calls/results), feedback
    DIR/<session>/<turn_id>.wav  each user turn's audio, 16 kHz mono 16-bit

Row and file together: a turn's audio is written to a temporary file named after this
process (`.<turn>.wav.<pid>-<random>.tmp`), then, inside the transaction that inserts its row
(holding the database's write lock), renamed into place; a failed insert or commit removes
it. So every committed row's audio exists, and a WAV without a row can only be what a crash
between the rename and the commit left: `sweep()` (run on open, under the write lock, when no
writer can be between its rename and its commit) deletes such files, session folders with no
session row (a delete cut short) and temporary files whose process is gone — never the
in-flight file of a sibling process writing the same recording (`serve --processes N`).
A turn of a session deleted meanwhile (`voice-agent data delete` of a live session) raises
`SessionGone` and leaves nothing behind. WAL with `synchronous=NORMAL`: a committed turn
survives the process dying; a power cut may lose the last commits.

Privacy: recordings are people's voices. Directories are created 0700 and files 0600 (the
server's user only), whatever the umask.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.model.qwen2_audio import SAMPLE_RATE, to_wav_bytes

DB_NAME = "recordings.db"
BUSY_TIMEOUT_S = 10.0  # how long a write waits for another writer's lock (in the writer thread)
SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    dir TEXT NOT NULL,                 -- the session's audio folder, relative to the recording
    model TEXT,
    system_prompt TEXT,
    started_at REAL NOT NULL,
    ended_at REAL,
    end_reason TEXT
);
CREATE TABLE IF NOT EXISTS turns (
    turn_id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions(id),
    n INTEGER NOT NULL,                -- order within the session
    audio TEXT NOT NULL,               -- WAV path relative to the recording
    audio_sha256 TEXT NOT NULL,        -- of the 16-bit samples: the same audio answered twice
    duration_s REAL NOT NULL,
    mode TEXT NOT NULL,                -- chat | analysis
    instruction TEXT,
    history TEXT NOT NULL,             -- JSON: the session's earlier turn_ids, in order (the prompt's history;
                                       -- a long session's prompt may have dropped the oldest)
    messages TEXT NOT NULL,            -- JSON: this turn's messages (user, tool rounds, answer)
    answer TEXT NOT NULL,              -- what the user was shown
    tool_calls TEXT NOT NULL,          -- JSON list of {call_id, name, arguments}
    tool_results TEXT NOT NULL,        -- JSON list of {call_id, ok, result, error}
    status TEXT NOT NULL,              -- done | cancelled | error
    timings TEXT NOT NULL,             -- JSON, response.done's
    recorded_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY,
    session_id TEXT NOT NULL,
    turn_id TEXT NOT NULL,
    rating TEXT NOT NULL CHECK (rating IN ('up', 'down')),
    correction TEXT,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS turns_session ON turns(session_id, n);
CREATE INDEX IF NOT EXISTS feedback_turn ON feedback(turn_id);
"""
_SAFE = re.compile(r"[A-Za-z0-9._-]{1,100}")


def _safe_name(name: str) -> str:
    """A file name for a session or turn id (ids may come from clients)."""
    if _SAFE.fullmatch(name) and not name.startswith("."):
        return name
    return "id-" + hashlib.sha256(name.encode()).hexdigest()[:24]


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask


TMP_RE = re.compile(r"^\..+\.(\d+)-[0-9a-f]+\.tmp$")  # .<name>.<pid>-<random>.tmp
STALE_TMP_S = 3600.0  # a temporary file this old is stale even if its pid is alive again (reused)
LEGACY_TMP_S = 60.0  # `.<name>.tmp` of earlier versions: no owner to ask


class SessionGone(Exception):
    """The session's rows were deleted (`voice-agent data delete`) while it was live."""


def _write_temp(path: Path, data: bytes) -> Path:
    """`data` in a private temporary file beside `path`, named after this process; returned."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _stale_tmp(path: Path, now: float) -> bool:
    try:
        age = now - path.stat().st_mtime
    except FileNotFoundError:
        return False
    m = TMP_RE.match(path.name)
    if m is None:
        return age > LEGACY_TMP_S
    return age > STALE_TMP_S or not _alive(int(m.group(1)))


@dataclass
class TurnRecord:
    """One finished user turn and the agent's answer to it."""

    session_id: str
    turn_id: str
    n: int
    audio: np.ndarray  # 16 kHz mono float32
    mode: str
    instruction: str | None
    history: list[str]
    messages: list[dict[str, Any]]
    answer: str
    tool_calls: list[dict[str, Any]]
    tool_results: list[dict[str, Any]]
    status: str
    timings: dict[str, float]


class RecordingStore:
    """One recording directory. Open with `RecordingStore.open(dir)`. One connection, used by
    one thread at a time (the server's writer thread: `agent.record.recorder`); other
    processes (sibling frontends, `voice-agent data|export`) open their own."""

    def __init__(self, root: Path, db: sqlite3.Connection) -> None:
        self.root = root
        self.db = db

    @classmethod
    def open(cls, directory: str | Path, *, create: bool = True) -> RecordingStore:
        root = Path(directory).expanduser().resolve()
        path = root / DB_NAME
        if not create and not path.exists():
            raise FileNotFoundError(f"{root}: no recording here (no {DB_NAME})")
        if create:
            _private_dir(root)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))  # -wal/-shm copy its mode
        db = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_S, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA secure_delete=ON")  # deleted rows are overwritten, not left in free pages
        if create:
            db.executescript(SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        store = cls(root, db)
        if create:
            store.sweep()
        return store

    def sweep(self) -> int:
        """Delete what no row names (see the module's doc); returns how many files and folders.
        Holds the write lock, so no writer is between its rename and its commit meanwhile."""
        now = time.time()
        removed = 0
        with self._transaction() as db:
            audio = {r[0] for r in db.execute("SELECT audio FROM turns")}
            folders = {r[0] for r in db.execute("SELECT dir FROM sessions")}
            for folder in [p for p in self.root.iterdir() if p.is_dir() and not p.is_symlink()]:
                keep_folder = folder.name in folders
                for path in list(folder.iterdir()):
                    if path.name.endswith(".tmp"):
                        if _stale_tmp(path, now):
                            path.unlink(missing_ok=True)
                            removed += 1
                        else:
                            keep_folder = True  # a live writer's: its turn will fail or commit
                    elif path.suffix == ".wav" and f"{folder.name}/{path.name}" not in audio:
                        path.unlink(missing_ok=True)
                        removed += 1
                if not keep_folder:
                    shutil.rmtree(folder, ignore_errors=True)
                    removed += 1
        return removed

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ---- writing (the server) ------------------------------------------------------------
    def add_session(self, session_id: str, model: str, system_prompt: str | None) -> None:
        folder = _safe_name(session_id)
        with self._transaction() as db:  # the row first: a sweep removes folders without one
            db.execute("INSERT OR IGNORE INTO sessions (id, dir, model, system_prompt, started_at) "
                       "VALUES (?, ?, ?, ?, ?)", (session_id, folder, model, system_prompt, time.time()))
        _private_dir(self.root / folder)

    def end_session(self, session_id: str, reason: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE sessions SET ended_at = ?, end_reason = ? WHERE id = ?",
                       (time.time(), reason, session_id))

    def _folder(self, session_id: str) -> str | None:
        row = self.db.execute("SELECT dir FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return row["dir"] if row is not None else None

    def _gone(self, session_id: str) -> bool:
        try:
            return self._folder(session_id) is None
        except sqlite3.Error:
            return False

    def add_turn(self, turn: TurnRecord) -> None:
        """The audio into a temporary file, then in one transaction: the row, the rename into
        place, the commit. Raises SessionGone (and leaves nothing) when the session was deleted."""
        folder = self._folder(turn.session_id)
        if folder is None:
            raise SessionGone(turn.session_id)
        wav = to_wav_bytes(turn.audio)
        rel = f"{folder}/{_safe_name(turn.turn_id)}.wav"
        final = self.root / rel
        tmp: Path | None = None
        renamed = False
        try:
            _private_dir(final.parent)
            tmp = _write_temp(final, wav)
            self.db.execute("BEGIN IMMEDIATE")
            try:
                if self._folder(turn.session_id) is None:  # deleted while the audio was written
                    raise SessionGone(turn.session_id)
                self._insert_turn(turn, rel, hashlib.sha256(wav[44:]).hexdigest())  # the samples' digest
                os.replace(tmp, final)
                renamed = True
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
        except BaseException as exc:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            if renamed:
                final.unlink(missing_ok=True)  # its row did not commit
            if isinstance(exc, SessionGone) or self._gone(turn.session_id):  # deleted under us
                with contextlib.suppress(OSError):
                    final.parent.rmdir()  # recreated for nothing: the delete had removed it
                if not isinstance(exc, SessionGone):
                    raise SessionGone(turn.session_id) from exc
            raise

    def _insert_turn(self, turn: TurnRecord, rel: str, digest: str) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO turns (turn_id, session_id, n, audio, audio_sha256, duration_s, mode, "
            "instruction, history, messages, answer, tool_calls, tool_results, status, timings, recorded_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (turn.turn_id, turn.session_id, turn.n, rel, digest, turn.audio.size / SAMPLE_RATE, turn.mode,
             turn.instruction, json.dumps(turn.history), json.dumps(turn.messages, ensure_ascii=False),
             turn.answer, json.dumps(turn.tool_calls, ensure_ascii=False, default=str),
             json.dumps(turn.tool_results, ensure_ascii=False, default=str), turn.status,
             json.dumps(turn.timings), time.time()))

    def add_feedback(self, session_id: str, turn_id: str, rating: str, correction: str | None) -> None:
        """Raises SessionGone when the session was deleted (its feedback is not kept either)."""
        with self._transaction() as db:
            n = db.execute("INSERT INTO feedback (session_id, turn_id, rating, correction, at) SELECT ?, ?, ?, ?, ? "
                           "WHERE EXISTS (SELECT 1 FROM sessions WHERE id = ?)",
                           (session_id, turn_id, rating, correction, time.time(), session_id)).rowcount
        if not n:
            raise SessionGone(session_id)

    # ---- reading and deleting (voice-agent data, export) -----------------------------------
    def sessions(self) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT s.*, (SELECT count(*) FROM turns t WHERE t.session_id = s.id) AS turns, "
            "(SELECT count(*) FROM feedback f WHERE f.session_id = s.id) AS feedback "
            "FROM sessions s ORDER BY started_at").fetchall()
        return [dict(r) for r in rows]

    def turns(self, session_id: str | None = None) -> list[dict[str, Any]]:
        """Turns in order (of one session, or all), JSON columns decoded, `audio` an absolute path."""
        query = "SELECT * FROM turns" + (" WHERE session_id = ?" if session_id else "") + " ORDER BY session_id, n"
        out = []
        for r in self.db.execute(query, (session_id,) if session_id else ()).fetchall():
            turn = dict(r)
            for key in ("history", "messages", "tool_calls", "tool_results", "timings"):
                turn[key] = json.loads(turn[key])
            turn["audio"] = str(self.root / turn["audio"])
            out.append(turn)
        return out

    def feedback(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.execute("SELECT * FROM feedback ORDER BY id").fetchall()]

    def delete_session(self, session_id: str) -> bool:
        """Rows first, then the audio folder (a crash in between leaves files that a second
        delete removes). Returns whether anything was there."""
        row = self.db.execute("SELECT dir FROM sessions WHERE id = ?", (session_id,)).fetchone()
        folder = self.root / (row["dir"] if row is not None else _safe_name(session_id))
        with self._transaction() as db:
            n = db.execute("DELETE FROM turns WHERE session_id = ?", (session_id,)).rowcount
            n += db.execute("DELETE FROM feedback WHERE session_id = ?", (session_id,)).rowcount
            n += db.execute("DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # nor left in the write-ahead log
        existed = folder.is_dir()
        if existed:
            shutil.rmtree(folder)
        return bool(n) or existed
