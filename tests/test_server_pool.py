"""End to end with the real tiny-random InferencePool; `serve` as a real process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from agent.config import load_settings
from agent.runtime import AgentRuntime
from agent.server.app import MANAGER, serve
from tests.rtc_util import BufferTrack, connect, loopback_only
from tests.test_server import Server, own_tasks, start_server, until

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(autouse=True)
def _loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    loopback_only(monkeypatch)


@pytest.fixture(scope="module")
async def pool_runtime() -> AsyncIterator[AgentRuntime]:
    rt = AgentRuntime(load_settings(None, model="tiny-random", max_new_tokens=8))
    await rt.start()
    yield rt
    await rt.close()


@pytest.fixture
async def server(pool_runtime: AgentRuntime) -> AsyncIterator[Server]:
    srv = await start_server(pool_runtime)
    yield srv
    await srv.runner.cleanup()


async def test_speech_in_model_answer_out(server: Server, speech_two: Any) -> None:
    client = await connect(server.url, BufferTrack(speech_two.samples))
    started = await client.wait_for("session.started")
    assert started[0]["model"] == "tiny-random" and "gibberish" in (started[0]["warning"] or "")
    done = await client.wait_for("response.done", 2, timeout=90)
    turns = client.of_type("turn.committed")
    assert [d["turn_id"] for d in done] == [t["turn_id"] for t in turns[:2]]
    # first_token counts from the commit: 0 when a preemptive answer had its tokens by then;
    # from the end of speech it is always later
    assert all(d["tokens"] > 0 and d["timings"]["first_token"] >= 0 for d in done)
    assert all(d["timings"]["speech_end_to_first_token"] > 0 for d in done), [d["timings"] for d in done]
    deltas = "".join(e["text"] for e in client.events
                     if e["type"] == "response.delta" and e["turn_id"] == done[0]["turn_id"])
    assert deltas == done[0]["text"]
    await client.close()
    await until(lambda: not server.runtime.sessions)


async def test_client_vanishing_mid_turn_leaves_nothing_behind(server: Server, speech_two: Any) -> None:
    pool = server.runtime.backend
    client = await connect(server.url, BufferTrack(speech_two.samples))
    await client.wait_for("response.started")  # a generation is running in a worker now
    session = server.runtime.sessions[client.session_id]
    peer = server.app[MANAGER].peers[client.session_id]
    track = peer._tracks[0]
    await client.pc.close()  # gone without a word
    await until(lambda: not server.runtime.sessions and not server.app[MANAGER].peers, timeout=30)
    await until(lambda: not own_tasks() and pool.queue_depth == 0, timeout=30)
    assert session.closed and track.readyState == "ended"
    assert server.runtime.vad.stats["streams"] == 0


async def test_serve_reports_a_start_failure(capsys: pytest.CaptureFixture[str]) -> None:
    settings = load_settings(None, model="no-such-org/no-such-model")
    assert await serve(settings) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("voice-agent: cannot start the runtime:") and "no-such-org/no-such-model" in err[0]


async def test_serve_runs_until_sigterm(tmp_path: Any) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VOICE_AGENT_SERVER__TOKEN": "tok"}
    proc = await asyncio.to_thread(subprocess.Popen, [sys.executable, "-m", "agent.cli", "serve", "-v", "--model",
                                                      "tiny-random", "--port", str(port)],
                                   env=env, stderr=subprocess.PIPE, text=True)
    try:
        async with aiohttp.ClientSession() as http:
            async def healthy() -> None:
                while True:
                    try:
                        async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                            if r.status == 200:
                                return
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.2)

            await asyncio.wait_for(healthy(), 90)
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                assert r.status == 401
            async with http.get(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": "Bearer tok"}) as r:
                metrics = await r.text()
            assert "voice_agent_sessions_active 0.0" in metrics
            # the KV budget each worker computed from its memory and the model, exported and logged
            budget = next(line for line in metrics.splitlines()
                          if line.startswith('voice_agent_kv_cache{stat="budget_tokens"}'))
            assert float(budget.split()[-1]) > 0
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(proc.communicate, timeout=60)
        assert proc.returncode == 0, err
        assert f"serving on http://127.0.0.1:{port}/" in err
        assert f"kv budget: {int(float(budget.split()[-1]))} tokens (" in err and "GiB) on cpu" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
