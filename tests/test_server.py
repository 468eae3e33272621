"""The HTTP/WebRTC server with real aiortc peers over loopback (scripted model answers)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from agent.config import load_settings
from agent.inference.scripted import ScriptedBackend
from agent.runtime import AgentRuntime
from agent.server.app import MANAGER, create_app
from agent.transports.webrtc import TASK_PREFIX
from tests.rtc_util import BufferTrack, MuteTrack, connect, loopback_only, offer
from tests.speech import make_speech

pytestmark = pytest.mark.asyncio(loop_scope="session")


class Server:
    def __init__(self, runtime: AgentRuntime, runner: web.AppRunner, app: web.Application) -> None:
        self.runtime = runtime
        self.runner = runner
        self.app = app
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"


async def start_server(runtime: AgentRuntime, **server: Any) -> Server:
    settings = runtime.settings.model_copy(deep=True)
    for key, value in server.items():
        setattr(settings.server, key, value)
    app = create_app(runtime, settings)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return Server(runtime, runner, app)


async def until(predicate: Any, timeout: float = 15.0) -> None:
    """Poll a condition (a guard against hangs, not a timing assertion)."""
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), timeout)


def own_tasks() -> list[str]:
    return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith(TASK_PREFIX)]


@pytest.fixture(autouse=True)
def _loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    loopback_only(monkeypatch)


@pytest.fixture(scope="module")
async def runtime() -> AsyncIterator[AgentRuntime]:
    backend = ScriptedBackend([], delay=0.01, default="scripted answer")
    rt = AgentRuntime(load_settings(None, model="tiny-random", max_new_tokens=8), backend=backend)
    await rt.start()
    yield rt
    await rt.close()


@pytest.fixture
async def server(runtime: AgentRuntime) -> AsyncIterator[Server]:
    srv = await start_server(runtime)
    yield srv
    await srv.runner.cleanup()
    assert not runtime.sessions and not own_tasks()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_two_concurrent_peers_each_get_their_own_turns(server: Server, speech_two: Any) -> None:
    short = make_speech([0.8, "hello there", 1.2], "short")
    a = await connect(server.url, BufferTrack(speech_two.samples))
    b = await connect(server.url, BufferTrack(short.samples))
    assert a.session_id != b.session_id and set(server.runtime.sessions) == {a.session_id, b.session_id}
    await a.wait_open()
    a.send({"type": "instruction.set", "text": "What is the speaker's emotion?"})
    done_a = await a.wait_for("response.done", 2)
    done_b = await b.wait_for("response.done", 1)
    turns_a = a.of_type("turn.committed")
    assert [t["mode"] for t in turns_a] == ["analysis", "chat"]
    assert turns_a[0]["instruction"] == "What is the speaker's emotion?"
    for (start, end), turn in zip(speech_two.segments, turns_a):
        assert abs(turn["start"] - start) <= 0.4 and abs(turn["end"] - end) <= 0.4
    assert done_a[0]["text"] == "scripted answer" and "first_token" in done_a[0]["timings"]
    assert len(b.of_type("turn.committed")) == 1 and done_b[0]["turn_id"] == b.of_type("turn.committed")[0]["turn_id"]
    # each client sees its own session only, in order
    assert a.events[0]["type"] == "session.started" and b.events[0]["type"] == "session.started"
    for client in (a, b):
        assert {e["session_id"] for e in client.events} == {client.session_id}
        seqs = [e["seq"] for e in client.events]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/metrics") as r:
        text = await r.text()
    assert 'voice_agent_turns_committed_total{mode="analysis"}' in text
    assert "voice_agent_sessions_active 2.0" in text and "voice_agent_first_token_seconds_count" in text
    await a.close()
    await b.close()
    await until(lambda: not server.runtime.sessions and not server.app[MANAGER].peers)


async def test_commands_over_the_data_channel(server: Server) -> None:
    client = await connect(server.url, BufferTrack(make_speech([2.0]).samples))
    await client.wait_open()
    client.send("not json")
    client.send({"type": "instruction.set"})
    client.send({"type": "session.update", "max_new_tokens": 0})
    errors = await client.wait_for("error", 3)
    assert all(e["code"] == "bad_command" for e in errors)
    assert "text" in errors[1]["message"] and "max_new_tokens" in errors[2]["message"]
    client.send({"type": "session.update", "max_new_tokens": 3})
    await until(lambda: server.runtime.sessions[client.session_id].max_new_tokens == 3)
    client.send({"type": "session.close"})
    ended = await client.wait_for("session.ended")
    assert ended[0]["reason"] == "client"
    await until(lambda: not server.runtime.sessions and not server.app[MANAGER].peers and not own_tasks())
    await client.close()


async def test_whip_round_trip_with_websocket_events(server: Server, http: aiohttp.ClientSession) -> None:
    pc, _ = await offer(BufferTrack(make_speech([0.5, "good morning", 1.0]).samples, loop=True), with_channel=False)
    async with http.post(f"{server.url}/whip", data=pc.localDescription.sdp,
                         headers={"Content-Type": "application/sdp"}) as r:
        assert r.status == 201 and r.content_type == "application/sdp"
        location = r.headers["Location"]
        answer = await r.text()
    assert location.startswith("/whip/") and answer.startswith("v=0")
    from aiortc import RTCSessionDescription

    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    session_id = location.rsplit("/", 1)[1]
    async with http.ws_connect(f"{server.url}/v1/sessions/{session_id}/events") as ws:
        first = json.loads((await ws.receive()).data)
        assert first["type"] == "session.started" and first["session_id"] == session_id
        await ws.send_str('{"type": "nope"}')
        seen: list[dict[str, Any]] = []
        while not any(e["type"] == "turn.committed" for e in seen) or not any(e["type"] == "error" for e in seen):
            seen.append(json.loads((await asyncio.wait_for(ws.receive(), 30)).data))
        assert next(e for e in seen if e["type"] == "error")["code"] == "bad_command"
        async with http.delete(f"{server.url}{location}") as r:
            assert r.status in (200, 204)
        while seen[-1]["type"] != "session.ended":
            seen.append(json.loads((await asyncio.wait_for(ws.receive(), 10)).data))
        assert seen[-1]["reason"] == "client"
    async with http.delete(f"{server.url}{location}") as r:
        assert r.status == 404 and "error" in await r.json()
    assert not server.runtime.sessions
    await pc.close()


async def test_bearer_token(runtime: AgentRuntime, http: aiohttp.ClientSession) -> None:
    srv = await start_server(runtime, token="s3cret")
    try:
        async with http.get(f"{srv.url}/healthz") as r:
            assert r.status == 200 and (await r.json())["status"] == "ok"
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            async with http.post(f"{srv.url}/v1/sessions", json={}, headers=headers) as r:
                assert r.status == 401 and "token" in (await r.json())["error"]
        async with http.get(f"{srv.url}/metrics") as r:
            assert r.status == 401
        async with http.get(f"{srv.url}/?token=s3cret") as r:
            assert r.status == 200 and "<html" in (await r.text()).lower()
        async with http.post(f"{srv.url}/whip?token=s3cret", data="v=0") as r:
            assert r.status == 401  # query tokens are for browser GETs only
        client = await connect(srv.url, MuteTrack(), token="s3cret")
        await client.close()
    finally:
        await srv.runner.cleanup()


async def test_max_sessions_answers_503(runtime: AgentRuntime, http: aiohttp.ClientSession) -> None:
    srv = await start_server(runtime, max_sessions=1)
    try:
        first = await connect(srv.url, MuteTrack())
        pc, _ = await offer(MuteTrack())
        async with http.post(f"{srv.url}/v1/sessions", json={"type": "offer", "sdp": pc.localDescription.sdp}) as r:
            assert r.status == 503 and "limit of 1 sessions" in (await r.json())["error"]
        assert list(runtime.sessions) == [first.session_id]
        await first.close()
        await pc.close()
        await until(lambda: not runtime.sessions)
    finally:
        await srv.runner.cleanup()


async def test_bad_requests_get_clear_4xx(server: Server, http: aiohttp.ClientSession) -> None:
    pc, _ = await offer(None)  # data channel only: no microphone
    no_audio = pc.localDescription.sdp
    await pc.close()
    cases = [
        ("/v1/sessions", {"data": "{nope", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
        ("/v1/sessions", {"json": {"type": "offer"}}, 400, '"sdp"'),
        ("/v1/sessions", {"json": {"type": "offer", "sdp": "hello"}}, 400, "v=0"),
        ("/v1/sessions", {"json": {"type": "answer", "sdp": no_audio}}, 400, "expected an SDP offer"),
        ("/v1/sessions", {"json": {"type": "offer", "sdp": no_audio}}, 400, "no audio"),
        ("/v1/sessions", {"data": "v=0", "headers": {"Content-Type": "text/plain"}}, 415, "application/json"),
        ("/whip", {"data": "{}", "headers": {"Content-Type": "application/json"}}, 415, "application/sdp"),
        ("/whip", {"data": "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n", "headers": {"Content-Type": "application/sdp"}},
         400, "fingerprint"),
        ("/whip", {"data": "x" * 70_000, "headers": {"Content-Type": "application/sdp"}}, 413, "exceeds"),
    ]
    for path, kwargs, status, reason in cases:
        async with http.post(f"{server.url}{path}", **kwargs) as r:
            body = await r.json()
            assert r.status == status and reason in body["error"], (path, kwargs, r.status, body)
    async with http.get(f"{server.url}/v1/sessions") as r:
        assert r.status == 405 and "not allowed" in (await r.json())["error"]
    async with http.get(f"{server.url}/v1/sessions/unknown/events") as r:
        assert r.status == 404 and "error" in await r.json()
    async with http.patch(f"{server.url}/whip/x") as r:
        assert r.status == 405
    assert not server.runtime.sessions


async def test_cors_preflight(runtime: AgentRuntime, http: aiohttp.ClientSession) -> None:
    srv = await start_server(runtime, cors_origins=["https://app.example"])
    try:
        pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization, content-type"}
        async with http.options(f"{srv.url}/whip", headers=pre) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
        async with http.options(f"{srv.url}/whip", headers={**pre, "Origin": "https://evil.example"}) as r:
            assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
        async with http.get(f"{srv.url}/healthz", headers={"Origin": "https://app.example"}) as r:
            assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
    finally:
        await srv.runner.cleanup()


@pytest.mark.parametrize("limits, reason", [({"no_audio_timeout_s": 0.5}, "no_audio"),
                                            ({"idle_timeout_s": 0.5}, "idle_timeout")])
async def test_timeouts_close_the_session(runtime: AgentRuntime, limits: dict[str, float], reason: str) -> None:
    srv = await start_server(runtime, **limits)
    try:
        client = await connect(srv.url, MuteTrack())
        ended = await client.wait_for("session.ended", timeout=20)
        assert ended[0]["reason"] == reason
        await until(lambda: not runtime.sessions and not srv.app[MANAGER].peers)
        await client.close()
    finally:
        await srv.runner.cleanup()


async def test_a_session_that_falls_behind_drops_oldest_audio(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.session import Session

    async def slow_push(self: Session, samples: Any) -> None:
        await asyncio.sleep(3.0)  # stalls longer than the 2 s the per-track queue holds

    monkeypatch.setattr(Session, "push_audio", slow_push)
    client = await connect(server.url, BufferTrack(make_speech([1.0]).samples, loop=True))
    peer = server.app[MANAGER].peers[client.session_id]
    await until(lambda: peer.dropped_frames > 0, timeout=30)
    assert peer._ingress is not None and peer._ingress._queued <= peer._ingress.max_samples
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/metrics") as r:
        assert "voice_agent_audio_frames_dropped_total 0.0" not in await r.text()
    await client.close()
    await until(lambda: not server.runtime.sessions)


async def test_healthz_shows_which_plugins_run(http: aiohttp.ClientSession) -> None:
    from tests.test_plugins_host import CLASSES

    rt = AgentRuntime(load_settings(None, model="tiny-random", plugins={"echo": {}, "broken": {}}),
                      backend=ScriptedBackend([]), plugin_classes=CLASSES)
    await rt.start()
    srv = await start_server(rt, token="s3cret")
    try:
        async with http.get(f"{srv.url}/healthz") as r:  # public: names and states, not the reasons
            assert r.status == 200
            body = await r.json()
        assert body["status"] == "ok" and body["plugins"] == {"echo": "running", "broken": "failed"}
        assert "no device" not in json.dumps(body)
    finally:
        await srv.runner.cleanup()
        await rt.close()
