"""Every transport drives a session the same way: the same speech gives the same turns,
`session.started` comes first, and a session closed from any side takes its transport down."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from livekit import rtc

from agent import events as ev
from agent.config import load_settings
from agent.inference.scripted import ScriptedBackend
from agent.runtime import AgentRuntime
from agent.server.app import MANAGER
from agent.transports.files import run_files
from agent.transports.livekit.participant import ParticipantRouter
from tests.rtc_util import BufferTrack, connect, loopback_only
from tests.test_plugins_livekit import Mic, Recorder
from tests.test_server import start_server, until

pytestmark = pytest.mark.asyncio(loop_scope="session")
TRANSPORTS = ["webrtc", "files", "livekit", "livekit_agents"]


@pytest.fixture(autouse=True)
def _loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    loopback_only(monkeypatch)


@pytest.fixture
async def runtime() -> Any:
    rt = AgentRuntime(load_settings(None, model="tiny-random", max_new_tokens=8),
                      backend=ScriptedBackend([], default="heard you"))
    await rt.start()
    yield rt
    await rt.close()


async def through(transport: str, runtime: AgentRuntime, speech: Any, tmp_path: Path) -> list[dict[str, Any]]:
    """Send `speech` through one transport; the session's events as the client got them."""
    if transport == "webrtc":
        srv = await start_server(runtime)
        try:
            client = await connect(srv.url, BufferTrack(speech.samples))
            await client.wait_for("response.done", count=len(speech.segments), timeout=60)
            await client.close()
            return client.events
        finally:
            await srv.runner.cleanup()
    raise AssertionError(transport)


async def via_files(runtime_settings: Any, speech: Any, tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "speech.wav"
    from agent.model.qwen2_audio import to_wav_bytes

    path.write_bytes(to_wav_bytes(speech.samples))
    out = io.StringIO()
    code = await run_files(runtime_settings, [str(path)], jsonl=True, out=out,
                           runtime_options={"backend": ScriptedBackend([], default="heard you")})
    assert code == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


async def via_livekit(runtime: AgentRuntime, speech: Any) -> list[dict[str, Any]]:
    router = ParticipantRouter(runtime, runtime.bus, max_queue_s=5.0)
    router.outbound = out = Recorder()
    mic = Mic()
    try:
        router.on_track_subscribed(mic.track, "alice")
        await mic.say(speech.samples)
        await until(lambda: len(out.of("alice", "response.done")) >= len(speech.segments), timeout=60)
    finally:
        await router.aclose()
        await mic.aclose()
    return out.events("alice")


async def via_livekit_agents(runtime: AgentRuntime, speech: Any) -> list[dict[str, Any]]:
    from agent.integrations.livekit_agents import QwenRealtimeModel

    seen: list[dict[str, Any]] = []
    sub = runtime.bus.subscribe()  # what the adapter's own subscription sees, from outside
    model = QwenRealtimeModel(runtime=runtime)
    session = model.session()
    pcm = (np.clip(speech.samples, -1, 1) * 32767).astype(np.int16)
    for i in range(0, pcm.size - 160, 160):
        session.push_audio(rtc.AudioFrame(pcm[i : i + 160].tobytes(), 16000, 1, 160))
    async def done() -> None:
        while sum(e["type"] == "response.done" for e in seen) < len(speech.segments):
            seen.append(json.loads((await sub.get()).model_dump_json()))
    await asyncio.wait_for(done(), 60)
    first_seen_by_adapter = session._first_event_type  # recorded by the adapter's pump
    await session.aclose()
    sub.close()
    assert first_seen_by_adapter == "session.started"
    return seen


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_same_speech_same_turns_and_session_started_first(transport: str, runtime: AgentRuntime,
                                                                 speech_two: Any, tmp_path: Path) -> None:
    if transport == "webrtc":
        events = await through("webrtc", runtime, speech_two, tmp_path)
    elif transport == "files":
        events = await via_files(runtime.settings, speech_two, tmp_path)
    elif transport == "livekit":
        events = await via_livekit(runtime, speech_two)
    else:
        events = await via_livekit_agents(runtime, speech_two)
    assert events[0]["type"] == "session.started", f"{transport}: first event {events[0]['type']}"
    turns = [e for e in events if e["type"] == "turn.committed"]
    assert len(turns) == len(speech_two.segments), f"{transport}: {len(turns)} turns"
    for (start, end), turn in zip(speech_two.segments, turns):
        assert abs(turn["start"] - start) <= 0.4 and abs(turn["end"] - end) <= 0.4, (transport, turn)


async def test_a_session_closed_from_any_side_frees_its_webrtc_peer(runtime: AgentRuntime, speech_two: Any) -> None:
    srv = await start_server(runtime, max_sessions=1)
    try:
        client = await connect(srv.url, BufferTrack(speech_two.samples, loop=True))
        await client.wait_open()
        # What the MQTT plugin does for `…/sessions/<id>/commands`: the runtime's command path.
        await runtime.send_command(client.session_id, ev.SessionClose())
        ended = await client.wait_for("session.ended", timeout=20)
        assert ended[0]["reason"] == "client"
        await until(lambda: not srv.app[MANAGER].peers and not runtime.sessions)
        await client.close()
        # The slot is free again: with max_sessions 1 a new client gets in at once.
        again = await connect(srv.url, BufferTrack(speech_two.samples, loop=True))
        await again.wait_open()
        await runtime.send_command(None, ev.SessionClose())  # the agent-wide topic: every session
        await again.wait_for("session.ended", timeout=20)
        await until(lambda: not srv.app[MANAGER].peers and not runtime.sessions)
        await again.close()
    finally:
        await srv.runner.cleanup()


async def test_a_client_the_bus_cuts_off_takes_its_transport_down(runtime: AgentRuntime, speech_two: Any) -> None:
    srv = await start_server(runtime)
    try:
        client = await connect(srv.url, BufferTrack(speech_two.samples, loop=True))
        await client.wait_open()
        peer = srv.app[MANAGER].peers[client.session_id]
        peer._events._disconnect("test: too slow")  # what the bus does to a hopeless subscriber
        await until(lambda: not srv.app[MANAGER].peers and not runtime.sessions)
        assert peer.session.closed
        await client.close()
    finally:
        await srv.runner.cleanup()


async def test_a_closed_webrtc_session_is_freed_by_the_server_not_left_to_the_collector(
        runtime: AgentRuntime, speech_two: Any) -> None:
    """aiortc's peer connection is a web of reference cycles: only a collection frees it. With
    automatic collection off, only the server's own run after the close can: the dead session's
    connection (sockets, DTLS, SRTP, jitter buffers) must be gone within seconds."""
    runtime.collector.delay_s, runtime.collector.min_interval_s = 0.05, 0.0
    srv = await start_server(runtime)
    gc.disable()
    try:
        client = await connect(srv.url, BufferTrack(speech_two.samples, loop=True))
        await client.wait_open()
        peer = srv.app[MANAGER].peers[client.session_id]
        pc = weakref.ref(peer.pc)
        del peer
        runs = runtime.collector.runs
        await client.close()
        await until(lambda: not srv.app[MANAGER].peers and not runtime.sessions)
        await until(lambda: runtime.collector.runs > runs, timeout=5)
        assert pc() is None, gc.get_referrers(pc())
    finally:
        gc.enable()
        await srv.runner.cleanup()


async def test_sessions_closing_together_cost_one_collection(runtime: AgentRuntime) -> None:
    runtime.collector.delay_s, runtime.collector.min_interval_s = 0.05, 60.0
    before = runtime.collector.runs
    for _ in range(3):  # three sessions end together: one collection, not three
        session, events = runtime.open_session()
        await session.close("client")
        events.close()
    await until(lambda: runtime.collector.runs == before + 1, timeout=5)
    session, events = runtime.open_session()
    await session.close("client")  # within the minimum interval: postponed, not run now
    events.close()
    await asyncio.sleep(0.2)
    assert runtime.collector.runs == before + 1
