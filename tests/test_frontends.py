"""`serve --processes 2` as a user runs it: real aiortc peers on both frontends, routing between
them, the aggregated endpoints, MQTT from both, and a frontend killed mid-call."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from agent.events import SpeechStarted
from agent.server.router import FRONTEND_ENV, FrontendInfo, merge_metrics
from plugins.homeassistant.discovery import Discovery, DiscoveryConfig
from tests.mosquitto import Broker, Observer, free_port, send, until
from tests.rtc_util import BufferTrack, RtcClient, connect, loopback_only, offer
from tests.speech import make_speech

ROOT = Path(__file__).resolve().parent.parent
ANSWER = "Sure, the kitchen light is on now."


class Served:
    def __init__(self, proc: subprocess.Popen[str], url: str, lines: list[str]) -> None:
        self.proc, self.url, self.lines = proc, url, lines

    def frontends(self) -> dict[int, psutil.Process]:
        """The live frontend processes by index (read from the environment the supervisor gave them)."""
        found = {}
        for child in psutil.Process(self.proc.pid).children():
            try:
                raw = child.environ().get(FRONTEND_ENV)
            except psutil.Error:
                continue
            if raw and child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
                found[FrontendInfo(**json.loads(raw)).index] = child
        return found

    def info(self, index: int) -> FrontendInfo:
        return FrontendInfo(**json.loads(self.frontends()[index].environ()[FRONTEND_ENV]))


async def start_serve(tmp: Path, *args: str, env: dict[str, str] | None = None, scripted: bool = True) -> Served:
    script = tmp / "answers.yaml"
    script.write_text(f"turns: ['{ANSWER}']\ndefault: '{ANSWER}'\nchunk: 4\ndelay_s: 0.01\n")
    backend = ["--backend", "scripted", "--script", str(script)] if scripted else []
    proc = await asyncio.to_thread(subprocess.Popen, [sys.executable, "-m", "agent.cli", "serve", "--processes", "2", *backend,
                             "--port", "0", *args], cwd=ROOT, text=True,
                            stderr=subprocess.PIPE, env={**os.environ, **(env or {})})  # fmt: skip
    lines: list[str] = []
    assert proc.stderr is not None
    while True:
        line = await asyncio.to_thread(proc.stderr.readline)
        if not line:
            raise AssertionError(f"serve exited ({proc.wait()}): {''.join(lines)}")
        lines.append(line)
        if m := re.search(r"serving on (http://\S+?)/ \(2 frontends", line):
            break
    asyncio.get_running_loop().run_in_executor(None, lambda: lines.extend(proc.stderr))  # type: ignore[arg-type]
    return Served(proc, m.group(1), lines)


def stop_serve(served: Served) -> None:
    served.proc.send_signal(signal.SIGTERM)
    try:
        assert served.proc.wait(30) == 0
    finally:
        if served.proc.poll() is None:
            served.proc.kill()


@pytest.fixture(autouse=True)
def _loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    loopback_only(monkeypatch)


@pytest.fixture(scope="module")
async def broker(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Broker]:
    b = Broker(tmp_path_factory.mktemp("mosquitto")).start()
    yield b
    b.stop()


async def peers_on_both(url: str, samples: Any) -> dict[int, RtcClient]:
    """Offers over new connections until each frontend holds one (the kernel picks by hash; with
    one session per frontend a full one passes the offer on)."""
    held: dict[int, RtcClient] = {}
    for _ in range(16):
        client = await connect(url, BufferTrack(samples, loop=True))
        index = int(client.session_id[1 : client.session_id.index("-")])
        if index in held:
            await client.close()
            continue
        held[index] = client
        if len(held) == 2:
            return held
    raise AssertionError(f"16 offers all landed on frontend(s) {sorted(held)}")


async def events_via(socket_path: str, session_id: str, seen: list[dict[str, Any]]) -> None:
    """The session's events WebSocket, asked of one given frontend (its private socket)."""
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=socket_path)) as http:
        async with http.ws_connect(f"http://frontend/v1/sessions/{session_id}/events") as ws:
            async for msg in ws:
                seen.append(json.loads(msg.data))


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_two_frontends_route_aggregate_and_survive_a_killed_one(tmp_path: Path, broker: Broker) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(f"plugins:\n  mqtt:\n    port: {broker.port}\n    prefix: va\n")
    speech = make_speech([0.4, "turn on the kitchen light", 1.2], "frontends")
    async with Observer(broker.port, "va/#").running() as mqtt:
        wyoming = f"tcp://127.0.0.1:{free_port()}"  # one owner: a second frontend would fail to bind it
        served = await start_serve(tmp_path, "--config", str(config), "--wyoming", wyoming,
                                   env={"VOICE_AGENT_SERVER__MAX_SESSIONS": "2"})  # one per frontend
        assert sum("Wyoming on" in line for line in served.lines) == 1
        try:
            await _exercise(served, speech.samples, mqtt, broker)
        finally:
            await asyncio.to_thread(stop_serve, served)
        # a clean stop: both frontends said goodbye on their own status topics
        await until(lambda: mqtt.on("va/agent/status")[-1] == mqtt.on("va/agent/frontends/1/status")[-1] == "offline",
                    10, "offline")


async def _exercise(served: Served, samples: Any, mqtt: Observer, broker: Broker) -> None:
    peers = await peers_on_both(served.url, samples)
    a, b = peers[0], peers[1]
    for client in (a, b):
        done = await client.wait_for("response.done")
        assert done[0]["text"] == ANSWER and done[0]["session_id"] == client.session_id
    # Each session's WebSocket asked of the *other* frontend is proxied to its holder.
    ws_events: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
    sockets = {i: served.info(i).socket(i) for i in (0, 1)}
    ws_tasks = [asyncio.create_task(events_via(sockets[1 - i], peers[i].session_id, ws_events[i])) for i in (0, 1)]
    await until(lambda: all(any(e["type"] == "response.done" for e in ws_events[i]) for i in (0, 1)), 60,
                "proxied events")
    for i in (0, 1):
        assert ws_events[i][0] == {**ws_events[i][0], "type": "session.started", "session_id": peers[i].session_id}
        assert {e["session_id"] for e in ws_events[i]} == {peers[i].session_id}

    async with aiohttp.ClientSession() as http:
        # max_sessions is the whole server's: a full frontend passes offers on; both full → 503
        pc, _ = await offer(BufferTrack(samples))
        async with http.post(f"{served.url}/v1/sessions", json={"type": "offer", "sdp": pc.localDescription.sdp}) as r:
            assert r.status == 503 and "limit of 2 sessions" in (await r.json())["error"]
        await pc.close()
        async with http.get(f"{served.url}/healthz") as r:
            health = await r.json()
        assert r.status == 200 and health["status"] == "ok" and health["sessions"] == 2
        assert [(f["index"], f["sessions"]) for f in health["frontends"]] == [(0, 1), (1, 1)]
        async with http.get(f"{served.url}/metrics") as r:
            metrics = await r.text()
        assert "voice_agent_sessions_active 2.0" in metrics and 'voice_agent_frontends{state="up"} 2.0' in metrics
        # A request for a session held elsewhere, over the shared port: answered by its holder.
        async with http.patch(f"{served.url}/whip/{b.session_id}") as r:
            assert r.status == 405  # the holder's own answer (WHIP PATCH), not a 404 from the wrong process

    # MQTT: each frontend publishes its own sessions' events and acts only on its own sessions' commands.
    await until(lambda: all(mqtt.json_on(f"va/agent/sessions/{c.session_id}/events") for c in (a, b)), 30,
                "mqtt events")
    await until(lambda: mqtt.on("va/agent/frontends/1/status")[-1:] == ["online"], 10, "frontend 1 online")
    assert mqtt.on("va/agent/status")[-1] == "online"
    await send(broker.port, f"va/agent/sessions/{b.session_id}/commands", json.dumps({"type": "response.cancel"}))
    await asyncio.sleep(1.0)  # a wrong frontend would answer "unknown session" by now
    errors = [e for e in mqtt.json_on("va/agent/sessions/+/events") + mqtt.json_on("va/agent/events")
              if e["type"] == "error"]
    assert not errors, errors

    # kill -9 frontend 1 mid-call: its session ends with a reason on every transport still there;
    # frontend 0's peer keeps being answered; frontend 1 is back within seconds.
    victim = served.frontends()[1]
    answered_before = len(a.of_type("response.done"))
    victim.send_signal(signal.SIGKILL)
    await until(lambda: any(e["type"] == "session.ended" for e in ws_events[1]), 30, "session.ended via proxy")
    ended = next(e for e in ws_events[1] if e["type"] == "session.ended")
    assert ended["reason"] == "frontend_lost" and ended["session_id"] == b.session_id
    await until(lambda: b.pc.connectionState in ("failed", "closed"), 60, "the dead frontend's peer to close")
    await a.wait_for("response.done", answered_before + 1, timeout=60)
    await until(lambda: 1 in served.frontends() and served.frontends()[1].pid != victim.pid, 30, "a new frontend 1")
    async with aiohttp.ClientSession() as http:
        async def healthy() -> bool:
            async with http.get(f"{served.url}/healthz") as r:
                return r.status == 200 and (await r.json())["status"] == "ok"

        for _ in range(300):
            if await healthy():
                break
            await asyncio.sleep(0.1)
        assert await healthy()
    # The new frontend 1 announced its predecessor's session as lost (MQTT subscribers hear it).
    await until(lambda: any(e["type"] == "session.ended" and e["reason"] == "frontend_lost"
                            for e in mqtt.json_on(f"va/agent/sessions/{b.session_id}/events")), 30, "lost on mqtt")
    assert "offline" in mqtt.on("va/agent/frontends/1/status")  # its last will
    await until(lambda: mqtt.on("va/agent/frontends/1/status")[-1:] == ["online"], 30, "frontend 1 back online")
    assert any("frontend 1 exited" in line for line in served.lines)
    assert not any(e["type"] == "session.ended" for e in ws_events[0])
    for task in ws_tasks:
        task.cancel()
    await asyncio.gather(*ws_tasks, return_exceptions=True)
    await a.close()
    await b.close()


def test_metrics_of_frontends_are_summed_and_means_labelled() -> None:
    one = ('# HELP voice_agent_turns_committed Turns committed\n# TYPE voice_agent_turns_committed counter\n'
           'voice_agent_turns_committed_total{mode="chat"} 2.0\n'
           'voice_agent_turns_committed_created{mode="chat"} 1.7e9\n'
           '# HELP voice_agent_vad_batch_size Streams per VAD tick\n# TYPE voice_agent_vad_batch_size gauge\n'
           'voice_agent_vad_batch_size{stat="mean"} 3.0\n')
    two = one.replace("} 2.0", "} 5.0").replace("} 3.0", "} 1.0")
    merged = merge_metrics({0: one, 1: two}, count=3)
    assert 'voice_agent_turns_committed_total{mode="chat"} 7.0' in merged
    assert "created" not in merged
    assert 'voice_agent_vad_batch_size{frontend="0",stat="mean"} 3.0' in merged
    assert 'voice_agent_vad_batch_size{frontend="1",stat="mean"} 1.0' in merged
    assert 'voice_agent_frontends{state="down"} 1.0' in merged


def test_session_ids_name_their_frontend_and_max_sessions_is_split() -> None:
    infos = [FrontendInfo(i, 3, "/tmp/x", max_sessions=8, port=1) for i in range(3)]
    assert [f.share for f in infos] == [3, 3, 2]
    sid = infos[2].new_session_id()
    assert [f.owns(sid) for f in infos] == [False, False, True]
    assert infos[0].owns(None) and infos[0].owns("legacy-id") and infos[0].owns("f9-abc")  # unknown: frontend 0


@pytest.mark.asyncio(loop_scope="module")
async def test_home_assistant_discovery_has_one_owner(broker: Broker) -> None:
    """Every frontend publishes its sessions' states; only frontend 0 announces the device and its
    availability, so another frontend stopping (or dying) does not take the device offline."""
    config = DiscoveryConfig(port=broker.port, state_prefix="one")
    async with Observer(broker.port, "#").running() as mqtt:
        owner, other = Discovery(config, "agent"), Discovery(config, "agent", owner=False)
        owner.start()
        other.start()
        await until(lambda: owner.conn.connected.is_set() and other.conn.connected.is_set(), 10, "connected")
        other.on_event(SpeechStarted(session_id="f1-abc", t=0.0))
        await until(lambda: mqtt.on("one/agent/ha/listening")[-1:] == ["ON"], 10, "listening from frontend 1")
        await other.stop()
        await owner.stop()
        await until(lambda: mqtt.on("one/agent/ha/availability")[-1:] == ["offline"], 10, "owner offline")
        assert mqtt.on("one/agent/ha/availability") == ["online", "offline"]  # the owner's only
        assert len(mqtt.on("homeassistant/switch/agent/muted/config")) == 1


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_one_model_server_for_both_frontends_killed_and_restarted(tmp_path: Path) -> None:
    """The local pool runs once, as `serve-model` on a Unix socket; killing it fails turns with
    backend_unavailable until the supervisor has it back, and no frontend restarts."""
    speech = make_speech([0.4, "turn on the kitchen light", 1.2], "frontends")
    served = await start_serve(tmp_path, "--model", "tiny-random", "--max-new-tokens", "4",
                               env={"OMP_NUM_THREADS": "1"}, scripted=False)
    try:
        model = next(p for p in psutil.Process(served.proc.pid).children() if "serve-model" in p.cmdline())
        frontends = {i: p.pid for i, p in served.frontends().items()}
        assert sorted(frontends) == [0, 1]
        client = await connect(served.url, BufferTrack(speech.samples, loop=True))
        await client.wait_for("response.done", timeout=120)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{served.url}/healthz") as r:
                assert (await r.json())["model_server"] == "ok"
            async with http.get(f"{served.url}/metrics") as r:
                assert "voice_agent_kv_cache" in await r.text()  # the pool's own figures, from the model server
            model.send_signal(signal.SIGKILL)
            error = await client.wait_for("error", timeout=120)
            assert error[0]["code"] == "backend_unavailable", error
            answered = len(client.of_type("response.done"))
            await client.wait_for("response.done", answered + 1, timeout=180)  # the restarted pool answers
            async with http.get(f"{served.url}/healthz") as r:
                assert (await r.json())["model_server"] == "ok"
        assert {i: p.pid for i, p in served.frontends().items()} == frontends  # no frontend restarted
        assert any("model server exited" in line for line in served.lines)
        await client.close()
    finally:
        await asyncio.to_thread(stop_serve, served)
