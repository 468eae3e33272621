"""`--record DIR`: feedback over WebRTC and MQTT lands in the recording, export dpo/sft rows,
a SIGKILL mid-turn loses no finished turn, a full disk is an error event, data delete."""

from __future__ import annotations

import asyncio
import errno
import json
import signal
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from agent.config import load_settings
from agent.export import AUDIO_TAG, check_rows, export
from agent.inference.scripted import ScriptedBackend
from agent.record import RecordingStore
from agent.runtime import AgentRuntime
from tests.mosquitto import Broker, free_port, send
from tests.rtc_util import BufferTrack, connect, loopback_only
from tests.test_server import start_server, until

ROOT = Path(__file__).resolve().parent.parent


def runtime_for(record: Path, **settings: Any) -> AgentRuntime:
    backend = ScriptedBackend(turns=[["Hello, how can I help?"], ["It is sunny today."]])
    return AgentRuntime(load_settings(None, record=str(record), **settings), backend=backend)


async def feed(runtime: AgentRuntime, samples: np.ndarray) -> Any:
    session, events = runtime.open_session()
    for i in range(0, samples.size, 16000):
        await session.push_audio(samples[i : i + 16000])
    await session.finish()
    events.close()
    return session


def stored(directory: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    store = RecordingStore.open(directory, create=False)
    try:
        return store.turns(), store.feedback()
    finally:
        store.close()


async def test_feedback_over_webrtc_lands_in_the_recording(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           speech_two) -> None:
    loopback_only(monkeypatch)
    rec = tmp_path / "rec"
    runtime = runtime_for(rec)
    await runtime.start()
    server = await start_server(runtime)
    client = await connect(server.url, BufferTrack(speech_two.samples))
    try:
        (done,) = await client.wait_for("response.done", 1)
        client.send({"type": "feedback", "turn_id": done["turn_id"], "rating": "down",
                     "correction": "Hi! What can I do for you?"})
        client.send({"type": "feedback", "turn_id": "nope-t1", "rating": "up"})  # not a turn of this session
        (got,) = await client.wait_for("feedback.received", 1)
        assert got["turn_id"] == done["turn_id"] and got["rating"] == "down"
        errors = await client.wait_for("error", 1)
        assert errors[0]["code"] == "bad_command" and "nope-t1" in errors[0]["message"]
        await until(lambda: stored(rec)[1], timeout=15)
        await asyncio.to_thread(check_webrtc_recording, rec, done["turn_id"])
        async with aiohttp.ClientSession() as http, http.get(f"{server.url}/metrics") as r:
            assert 'voice_agent_feedback_total{rating="down"} 1.0' in await r.text()
    finally:
        await client.close()
        await server.runner.cleanup()
        await runtime.close()


def check_webrtc_recording(rec: Path, turn_id: str) -> None:
    turns, feedback = stored(rec)
    assert [(f["turn_id"], f["rating"], f["correction"]) for f in feedback] == [
        (turn_id, "down", "Hi! What can I do for you?")]
    first = turns[0]
    assert first["turn_id"] == turn_id and first["answer"] == "Hello, how can I help?"
    assert first["status"] == "done" and first["history"] == [] and Path(first["audio"]).is_file()
    # Private to the server's user: 0700 folders, 0600 files, whatever the umask.
    assert stat.S_IMODE(rec.stat().st_mode) == 0o700
    assert stat.S_IMODE(Path(first["audio"]).parent.stat().st_mode) == 0o700
    for path in [Path(first["audio"]), *rec.glob("recordings.db*")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


async def test_feedback_over_mqtt_then_export_dpo_and_sft(tmp_path: Path, speech_two) -> None:
    broker = Broker(tmp_path / "broker").start()
    rec = tmp_path / "rec"
    runtime = runtime_for(rec, agent_id="den", plugins={"mqtt": {"host": "127.0.0.1", "port": broker.port}})
    try:
        await runtime.start()
        session = await feed(runtime, speech_two.samples)
        t1, t2 = f"{session.id}-t1", f"{session.id}-t2"
        topic = f"voice_agent/den/sessions/{session.id}/commands"
        await send(broker.port, topic, json.dumps({"type": "feedback", "turn_id": t1, "rating": "up"}))
        await send(broker.port, topic, json.dumps({"type": "feedback", "turn_id": t2, "rating": "down",
                                                   "correction": "I cannot see the weather."}))
        await until(lambda: len(stored(rec)[1]) == 2, timeout=15)
        await session.close()
    finally:
        await runtime.close()
        broker.stop()
    await asyncio.to_thread(check_export_and_delete, rec, tmp_path, session.id)


def check_export_and_delete(rec: Path, tmp_path: Path, session_id: str) -> None:
    t1, t2 = f"{session_id}-t1", f"{session_id}-t2"
    turns, feedback = stored(rec)
    assert [t["turn_id"] for t in turns] == [t1, t2] and turns[1]["history"] == [t1]
    assert {f["turn_id"]: f["rating"] for f in feedback} == {t1: "up", t2: "down"}

    lf, n = export(rec, tmp_path / "lf", "dpo", "llamafactory")
    (row,) = json.loads(lf.read_text())
    assert n == 1
    # The rated turn is the second: the history carries the first turn's audio and answer.
    assert row["conversations"] == [{"from": "human", "value": AUDIO_TAG}, {"from": "gpt", "value": "Hello, how can I help?"},
                                    {"from": "human", "value": AUDIO_TAG}]
    assert row["chosen"] == {"from": "gpt", "value": "I cannot see the weather."}
    assert row["rejected"] == {"from": "gpt", "value": "It is sunny today."}
    assert row["audios"] == [turns[0]["audio"], turns[1]["audio"]] and all(Path(a).is_file() for a in row["audios"])
    info = json.loads((tmp_path / "lf" / "dataset_info.json").read_text())["voice_agent_dpo"]
    assert info == {"file_name": lf.name, "formatting": "sharegpt", "ranking": True,
                    "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected",
                                "system": "system", "audios": "audios"}}
    assert row["system"] == ""  # no instructions, no tools: the template's default system message

    swift, n = export(rec, tmp_path / "swift", "dpo", "ms-swift")
    (srow,) = [json.loads(line) for line in swift.read_text().splitlines()]
    assert srow == {"messages": [{"role": "user", "content": AUDIO_TAG},
                                 {"role": "assistant", "content": "Hello, how can I help?"},
                                 {"role": "user", "content": AUDIO_TAG},
                                 {"role": "assistant", "content": "I cannot see the weather."}],
                    "audios": row["audios"], "rejected_response": "It is sunny today."}

    sft, n = export(rec, tmp_path / "lf", "sft", "llamafactory")
    (up,) = json.loads(sft.read_text())
    assert up["conversations"][-1] == {"from": "gpt", "value": "Hello, how can I help?"} and len(up["audios"]) == 1
    # The checks the export applies catch what a trainer would reject.
    with pytest.raises(Exception, match="1 <audio> tags but 2 audios"):
        check_rows([{**srow, "messages": srow["messages"][2:]}], "ms-swift", "dpo")
    with pytest.raises(Exception, match="does not exist"):
        check_rows([{**row, "audios": [row["audios"][0], str(tmp_path / "gone.wav")]}], "llamafactory", "dpo")

    # voice-agent data list / delete: the session's rows and audio go, others stay untouched.
    listed = subprocess.run([sys.executable, "-m", "agent.cli", "data", "list", "--dir", str(rec)],
                            capture_output=True, text=True, cwd=ROOT)
    assert listed.returncode == 0 and session_id in listed.stdout and "2 turns" in listed.stdout
    gone = subprocess.run([sys.executable, "-m", "agent.cli", "data", "delete", "--dir", str(rec), session_id, "ghost"],
                          capture_output=True, text=True, cwd=ROOT)
    assert gone.returncode == 1 and f"deleted {session_id}" in gone.stdout and "ghost" in gone.stderr
    assert stored(rec) == ([], []) and not Path(turns[0]["audio"]).parent.exists()


async def test_a_full_disk_is_an_error_event_and_the_conversation_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, speech_two) -> None:
    import agent.record.store as store_module

    real = store_module._write_temp
    calls = {"n": 0}

    def first_write_fails(path: Path, data: bytes) -> Path:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(store_module, "_write_temp", first_write_fails)
    rec = tmp_path / "rec"
    runtime = runtime_for(rec)
    await runtime.start()
    events = runtime.bus.subscribe(maxsize=10_000)
    try:
        await feed(runtime, speech_two.samples)
    finally:
        await runtime.close()
    seen = []
    while not events.queue.empty():
        seen.append(events.queue.get_nowait())
    types = [e.type for e in seen]
    errors = [e for e in seen if e.type == "error"]
    assert [e.code for e in errors] == ["recording_failed"] and "No space left" in errors[0].message
    assert types.count("response.done") == 2  # the second turn was answered (and recorded)
    turns, _ = stored(rec)
    assert [t["answer"] for t in turns] == ["It is sunny today."]


KILL_SCRIPT = """\
delay_s: 0.3
chunk: 4
turns:
  - Done.
  - This second answer streams slowly, so the process is killed while it is still being written out.
"""


async def test_sigkill_of_the_server_mid_turn_loses_no_finished_turn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    speech_two) -> None:
    """A real `voice-agent serve --record` with a WebRTC caller, killed with SIGKILL while its
    second answer streams: the first turn is whole (row and audio), no row is half-written,
    the database is intact, and a restart opens it and cleans up what the crash left."""
    import aiohttp

    loopback_only(monkeypatch)
    script = tmp_path / "script.yaml"
    script.write_text(KILL_SCRIPT)
    rec = tmp_path / "rec"
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", "serve", "--backend", "scripted", "--script", str(script),
        "--record", str(rec), "--port", str(port), cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    client = None
    try:
        async with aiohttp.ClientSession() as http:
            async def healthy() -> None:
                while True:
                    try:
                        async with http.get(f"{url}/healthz") as r:
                            if r.status == 200:
                                return
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.2)

            await asyncio.wait_for(healthy(), 120)
        client = await connect(url, BufferTrack(speech_two.samples))
        (done,) = await client.wait_for("response.done", 1)
        await until(lambda: any(e["type"] == "response.delta" and e["turn_id"].endswith("-t2")
                                for e in client.events), timeout=60)
        proc.send_signal(signal.SIGKILL)  # the second answer is under way
        assert await asyncio.wait_for(proc.wait(), 30) == -signal.SIGKILL
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if client is not None:
            await client.close()
    await asyncio.to_thread(check_after_kill, rec, done["turn_id"])


def check_after_kill(rec: Path, turn_id: str) -> None:
    db = sqlite3.connect(rec / "recordings.db")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    rows = db.execute("SELECT turn_id, answer, status, audio FROM turns").fetchall()
    db.close()
    assert [(r[0], r[1], r[2]) for r in rows] == [(turn_id, "Done.", "done")]
    assert (rec / rows[0][3]).stat().st_size > 16000  # a whole WAV of the turn, not a header
    store = RecordingStore.open(rec)  # a restart: opens fine, stale temporary files are gone
    store.close()
    assert not list(rec.glob("*/.*.tmp"))


async def test_agent_api_feedback_reaches_the_hook_and_the_recording(tmp_path: Path, speech_two) -> None:
    """From code: `ctx.feedback(…)` on a RunContext; `Agent.on_feedback` sees every rating."""
    from agent import Agent

    class Rated(Agent):
        def __init__(self, **settings: Any) -> None:
            super().__init__(**settings)
            self.ratings: list[tuple[str, str, str | None]] = []

        async def on_feedback(self, ctx: Any, feedback: Any) -> None:
            self.ratings.append((feedback.turn_id, feedback.rating, feedback.correction))

    rec = tmp_path / "rec"
    agent = Rated(record=str(rec))
    runtime = agent.runtime(backend=ScriptedBackend(default="Sure."))
    await runtime.start()
    try:
        session = await feed(runtime, speech_two.samples)
        await session.context.feedback(f"{session.id}-t2", "down", "No.")
        with pytest.raises(ValueError):  # validated like a client's command
            await session.context.feedback(f"{session.id}-t1", "meh")
    finally:
        await runtime.close()
    assert agent.ratings == [(f"{session.id}-t2", "down", "No.")]
    turns, feedback = stored(rec)
    assert len(turns) == 2 and [(f["turn_id"], f["correction"]) for f in feedback] == [(f"{session.id}-t2", "No.")]
