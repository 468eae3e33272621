"""LiveKit room transport without a LiveKit server (none runs here).

The audio path is real: espeak-ng speech → rtc.AudioSource.capture_frame → local audio track
→ rtc.AudioStream → the plugin's pump → a real AgentRuntime (real VAD). The room's outbound
side is a recorder with LocalParticipant's signatures. Joining is tested against a closed
port, a server that answers 401, and one that never answers.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from livekit import rtc

from agent.bus import EventBus
from agent.config import load_settings
from agent.inference.scripted import ScriptedBackend
from agent.plugin import PluginContext, PluginHost
from agent.runtime import AgentRuntime
from agent.transports.livekit import LiveKitConfig, LiveKitPlugin
from agent.transports.livekit.participant import ATTR_FINAL, ATTR_SEGMENT_ID, TOPIC_TRANSCRIPTION, ParticipantRouter
from tests.mosquitto import FakeCommands

ROOT = Path(__file__).resolve().parent.parent
EVENTS = "voice-agent.events"
COMMANDS = "voice-agent.commands"
CREDS = {"api_key": "devkey", "api_secret": "a-secret-that-is-long-enough-for-hs256!", "room": "kitchen"}


# ---- helpers ---------------------------------------------------------------------------
class Writer:
    def __init__(self, topic: str, attributes: dict[str, str], destinations: list[str] | None) -> None:
        self.topic, self.attributes, self.destinations = topic, dict(attributes), destinations
        self.chunks: list[str] = []
        self.closed_with: dict[str, str] | None = None

    async def write(self, text: str) -> None:
        assert self.closed_with is None, "write after close"
        self.chunks.append(text)

    async def aclose(self, *, reason: str = "", attributes: dict[str, str] | None = None) -> None:
        assert self.closed_with is None, "closed twice"
        self.closed_with = dict(attributes or {})


class Recorder:
    """What the plugin sends into the room, with LocalParticipant's signatures."""

    def __init__(self) -> None:
        self.packets: list[tuple[str, list[str], bool, bytes]] = []
        self.streams: list[Writer] = []
        self.texts: list[tuple[str, list[str], str]] = []

    async def publish_data(self, payload: bytes | str, *, reliable: bool = True,
                           destination_identities: list[str] = [], topic: str = "") -> None:
        data = payload.encode() if isinstance(payload, str) else payload
        self.packets.append((topic, list(destination_identities), reliable, data))

    async def stream_text(self, *, destination_identities: list[str] | None = None, topic: str = "",
                          attributes: dict[str, str] | None = None) -> Writer:
        writer = Writer(topic, attributes or {}, destination_identities)
        self.streams.append(writer)
        return writer

    async def send_text(self, text: str, *, destination_identities: list[str] | None = None,
                        topic: str = "") -> None:
        self.texts.append((topic, list(destination_identities or []), text))

    def events(self, identity: str) -> list[dict[str, Any]]:
        out = []
        for topic, dests, reliable, data in self.packets:
            assert topic == EVENTS and reliable
            if dests == [identity]:
                out.append(json.loads(data))
        return out

    def of(self, identity: str, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events(identity) if e["type"] == kind]


class Mic:
    """A local audio track fed in real time — what a remote participant's track carries."""

    def __init__(self) -> None:
        self.source = rtc.AudioSource(16000, 1)
        self.track = rtc.LocalAudioTrack.create_audio_track("mic", self.source)

    async def say(self, samples: np.ndarray, frame: int = 320) -> None:
        pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16)
        pcm = np.pad(pcm, (0, -pcm.size % frame))
        for i in range(0, pcm.size, frame):
            await self.source.capture_frame(rtc.AudioFrame(pcm[i : i + frame].tobytes(), 16000, 1, frame))
        await self.source.wait_for_playout()

    async def aclose(self) -> None:
        await self.source.aclose()


async def until(cond, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def runtime():
    rt = AgentRuntime(load_settings(None, model="tiny-random"),
                      backend=ScriptedBackend(["Kitchen light is on.", "Sunny, 21 degrees."], chunk=4))
    await rt.start()
    yield rt
    await rt.close()


@pytest.fixture
async def room(runtime):
    router = ParticipantRouter(runtime, runtime.bus, max_queue_s=5.0)
    router.outbound = out = Recorder()
    yield router, out
    await router.aclose()


# ---- audio path ------------------------------------------------------------------------
async def test_speech_in_turns_and_answers_out(room, runtime, speech_two) -> None:
    router, out = room
    mic = Mic()
    session = router.on_track_subscribed(mic.track, "alice")
    pump = router.participants["alice"].pump
    assert "alice" in session.id and session.id.startswith("lk-")
    # The local track plays silence until audio is captured: measure that lead.
    lead = pump.samples / 16000
    await mic.say(speech_two.samples)
    await until(lambda: len(out.of("alice", "response.done")) == 2, what="two answers")
    await mic.aclose()

    turns = out.of("alice", "turn.committed")
    assert len(turns) == 2
    for turn, (start, end) in zip(turns, speech_two.segments):
        assert abs(turn["start"] - lead - start) <= 0.3 and abs(turn["end"] - lead - end) <= 0.3, (turn, start, end, lead)
    events = out.events("alice")
    assert events[0]["type"] == "session.started" and all(e["session_id"] == session.id for e in events)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    done = out.of("alice", "response.done")
    assert [d["text"] for d in done] == ["Kitchen light is on.", "Sunny, 21 degrees."]
    assert pump.frames > 0 and pump.dropped_frames == 0
    # The model got the words at their level: int16 → float32 scaled back to [-1, 1].
    heard = runtime.backend.requests[0].audios[-1]
    start, end = speech_two.segments[0]
    said = speech_two.samples[int(start * 16000) : int(end * 16000)]
    assert abs(np.abs(heard).max() - np.abs(said).max()) < 0.02
    assert abs(np.sqrt(np.mean(heard**2)) - np.sqrt(np.mean(said**2))) < 0.2 * np.sqrt(np.mean(said**2))

    # One transcription stream per answer, the livekit-agents way, to alice only.
    assert len(out.streams) == 2
    for stream, answer, turn in zip(out.streams, done, turns):
        assert stream.topic == TOPIC_TRANSCRIPTION and stream.destinations == ["alice"]
        assert "".join(stream.chunks) == answer["text"] and len(stream.chunks) > 1  # streamed as deltas
        assert stream.attributes[ATTR_FINAL] == "false" and stream.closed_with[ATTR_FINAL] == "true"
        assert stream.attributes[ATTR_SEGMENT_ID] == stream.closed_with[ATTR_SEGMENT_ID] == f"SG_{turn['turn_id']}"


async def test_two_participants_two_sessions_one_leaves(room, runtime, speech_two) -> None:
    router, out = room
    alice, bob = Mic(), Mic()
    s_alice = router.on_track_subscribed(alice.track, "alice")
    s_bob = router.on_track_subscribed(bob.track, "bob@example.com/phone")
    assert s_alice.id != s_bob.id and "bob_example.com_phone" in s_bob.id
    assert router.on_track_subscribed(alice.track, "alice") is s_alice  # the same track again: same session
    await until(lambda: out.of("bob@example.com/phone", "session.started"), what="bob's session.started")

    router.on_participant_left("bob@example.com/phone")
    await until(lambda: out.of("bob@example.com/phone", "session.ended"), what="bob's session.ended")
    assert out.of("bob@example.com/phone", "session.ended")[0]["reason"] == "participant_left"
    assert s_bob.closed and s_bob.id not in runtime.sessions and "bob@example.com/phone" not in router.participants

    # Alice goes on: her first utterance becomes a turn and an answer.
    await alice.say(speech_two.samples[: int(3.2 * 16000)])
    await until(lambda: out.of("alice", "response.done"), what="alice's answer")
    assert not s_alice.closed and not out.of("alice", "session.ended")
    assert len(out.of("alice", "turn.committed")) == 1
    assert all(e["session_id"] == s_alice.id for e in out.events("alice"))

    # Unpublishing her track ends her session too.
    router.on_track_unpublished("alice", alice.track.sid)
    await until(lambda: out.of("alice", "session.ended"), what="alice's session.ended")
    assert out.of("alice", "session.ended")[0]["reason"] == "participant_left"
    await alice.aclose()
    await bob.aclose()


async def test_commands_and_bad_command_packets(room, runtime) -> None:
    router, out = room
    mic = Mic()
    session = router.on_track_subscribed(mic.track, "carol")
    bad = [b"not json {", b'{"type": "launch.rockets"}', b'{"type": "instruction.set"}', b"\xff\xfe"]
    for payload in bad:
        router.on_data("carol", COMMANDS, payload)
    router.on_data("carol", "some.other.topic", b'{"type": "session.close"}')  # not ours: ignored
    router.on_data("mallory", COMMANDS, b'{"type": "session.close"}')  # no session: ignored
    router.on_data("carol", COMMANDS, b'{"type": "instruction.set", "text": "What emotion?"}')
    await until(lambda: len(out.of("carol", "error")) == 4, what="four error events")
    errors = out.of("carol", "error")
    assert all(e["code"] == "bad_command" for e in errors)
    assert "text" in errors[2]["message"] and "UTF-8" in errors[3]["message"]
    await until(lambda: session.commands.next_instruction == "What emotion?", what="the instruction")
    assert not session.closed

    session.report_error("internal", "x" * 20_000)  # too big for one data packet: a text stream
    await until(lambda: out.texts, what="the big event")
    topic, dests, text = out.texts[0]
    assert (topic, dests, json.loads(text)["message"]) == (EVENTS, ["carol"], "x" * 20_000)

    router.on_data("carol", COMMANDS, b'{"type": "session.close"}')
    await until(lambda: out.of("carol", "session.ended"), what="session.ended")
    assert out.of("carol", "session.ended")[0]["reason"] == "client"
    await until(lambda: "carol" not in router.participants, what="carol forgotten")
    again = router.on_track_subscribed(mic.track, "carol")  # her track again: a new session
    assert again.id != session.id and not again.closed and router.participants["carol"].pump.running
    await mic.aclose()


async def test_slow_pipeline_drops_oldest_audio(runtime) -> None:
    from agent.transports.livekit.participant import AudioPump

    class Slow:
        id, closed = "slow", False
        pushed: list[int] = []

        async def push_audio(self, samples: np.ndarray) -> None:
            self.pushed.append(samples.size)
            await asyncio.sleep(0.3)

    mic, sink = Mic(), Slow()
    pump = AudioPump(mic.track, sink, max_queue_s=0.1)  # type: ignore[arg-type]
    await until(lambda: pump.dropped_frames > 0 and len(sink.pushed) >= 3, what="drops")
    await pump.aclose()
    assert max(sink.pushed[1:]) <= 0.1 * 16000 + 480  # never more than the cap (plus one frame)
    await mic.aclose()


# ---- the room's events drive the router; a full disconnect rejoins -------------------------
class Someone:
    def __init__(self, identity: str, kind: int = rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD) -> None:
        self.identity, self.kind = identity, kind


class Pub:
    def __init__(self, sid: str) -> None:
        self.sid = sid


class JoinedRoom:
    def __init__(self, *identities: str) -> None:
        self.remote_participants = {i: Someone(i) for i in identities}


async def test_room_events_drive_sessions_and_a_drop_rejoins(runtime) -> None:
    config = LiveKitConfig.model_validate({"url": f"ws://127.0.0.1:{closed_port()}", **CREDS,
                                           "reconnect_min_s": 0.05, "reconnect_max_s": 0.1})
    plugin = LiveKitPlugin(config, PluginContext(runtime.bus, runtime, sessions=runtime))
    plugin.router = router = ParticipantRouter(runtime, runtime.bus)
    room = rtc.Room()  # never connected: its events are emitted by hand, as the SDK would
    plugin._attach(room)
    plugin.room, router.outbound = room, (out := Recorder())
    alice, bob, bot = Mic(), Mic(), Mic()
    room.emit("track_subscribed", alice.track, Pub("TR_a"), Someone("alice"))
    room.emit("track_subscribed", bob.track, Pub("TR_b"), Someone("bob"))
    room.emit("track_subscribed", bot.track, Pub("TR_c"), Someone("tts-bot", rtc.ParticipantKind.PARTICIPANT_KIND_AGENT))
    assert sorted(router.participants) == ["alice", "bob"]  # another agent's voice is not a person
    room.emit("data_received", rtc.DataPacket(b'{"type": "nope"}', rtc.DataPacketKind.KIND_RELIABLE,
                                              Someone("alice"), COMMANDS))  # type: ignore[arg-type]
    await until(lambda: out.of("alice", "error"), what="the bad command's error")

    # A full disconnect we did not ask for: stop listening, keep the sessions, join again.
    attempts: list[int] = []
    out2 = Recorder()

    async def join() -> None:
        attempts.append(len(attempts))
        if len(attempts) < 3:
            raise ConnectionError("cannot join: refused")
        plugin.room, router.outbound = JoinedRoom("alice"), out2  # type: ignore[assignment]

    plugin._join = join  # type: ignore[method-assign]
    room.emit("disconnected", rtc.DisconnectReason.SIGNAL_CLOSE)
    assert router.outbound is None and all(p.pump is None for p in router.participants.values())
    await until(lambda: plugin.reconnects == 1, what="the rejoin")
    assert len(attempts) == 3  # two failures, backed off, then joined
    # bob left while we were away: his session ends; alice's goes on in the new room.
    await until(lambda: out2.of("bob", "session.ended"), what="bob's session.ended")
    assert "alice" in router.participants and not router.participants["alice"].session.closed
    room.emit("participant_disconnected", Someone("alice"))  # the old room's events are ignored now
    assert "alice" in router.participants

    # Our own disconnect (or a duplicate identity) is not answered with a rejoin.
    for reason in (rtc.DisconnectReason.CLIENT_INITIATED, rtc.DisconnectReason.DUPLICATE_IDENTITY):
        plugin.room = room2 = rtc.Room()
        plugin._attach(room2)
        room2.emit("disconnected", reason)
        await asyncio.sleep(0.2)
        assert plugin.reconnects == 1 and len(attempts) == 3
    await plugin.stop()
    assert not router.participants and runtime.sessions == {}
    for mic in (alice, bob, bot):
        await mic.aclose()


# ---- configuration ---------------------------------------------------------------------
@pytest.mark.parametrize("config, problem", [
    ({"url": "http://127.0.0.1:7880", **CREDS}, "ws:// or wss://"),
    ({"url": "ws://", **CREDS}, "no host"),
    ({"url": "ws://127.0.0.1:7880", "room": "kitchen"}, "api_key"),
    ({"url": "ws://127.0.0.1:7880", **CREDS, "api_secret": ""}, "api_secret"),
    ({"url": "ws://127.0.0.1:7880", **CREDS, "rooom": "typo"}, "rooom"),
    ({"url": "ws://127.0.0.1:7880", **CREDS, "reconnect_min_s": 5, "reconnect_max_s": 1}, "reconnect_max_s"),
    ({"url": "wss://x.livekit.cloud", **CREDS, "connect_timeout_s": 0}, "connect_timeout_s"),
])
def test_config_errors_are_clear(config: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=r"plugin 'livekit': invalid config: .*") as info:
        PluginHost.from_config({"livekit": config}, PluginContext(EventBus(), FakeCommands(EventBus())))
    assert problem in str(info.value)


def test_config_defaults_and_token() -> None:
    from livekit import api

    from agent.transports.livekit.config import make_token

    c = LiveKitConfig.model_validate({"url": "wss://x.livekit.cloud", **CREDS})
    assert (c.events_topic, c.commands_topic, c.connect_timeout_s, c.identity) == (EVENTS, COMMANDS, 10.0, None)
    assert CREDS["api_secret"] not in repr(c)
    plugin = LiveKitPlugin(c, PluginContext(EventBus(), FakeCommands(EventBus()), agent_id="kitchen-agent"))
    claims = api.TokenVerifier(CREDS["api_key"], CREDS["api_secret"]).verify(make_token(c, plugin.identity))
    assert claims.identity == "kitchen-agent"
    assert claims.video.room == "kitchen" and claims.video.room_join and claims.video.can_publish_data


def test_the_room_participant_takes_our_calls() -> None:
    """In production the outbound side is rtc.LocalParticipant: our calls must bind to it."""
    import inspect

    calls = [(rtc.LocalParticipant.publish_data, ("{}",), {"reliable": True, "topic": EVENTS, "destination_identities": ["a"]}),
             (rtc.LocalParticipant.stream_text, (), {"topic": TOPIC_TRANSCRIPTION, "destination_identities": ["a"],
                                                     "attributes": {ATTR_FINAL: "false"}}),
             (rtc.LocalParticipant.send_text, ("{}",), {"topic": EVENTS, "destination_identities": ["a"]}),
             (rtc.TextStreamWriter.write, ("hi",), {}),
             (rtc.TextStreamWriter.aclose, (), {"attributes": {ATTR_FINAL: "true"}})]
    for fn, args, kwargs in calls:
        inspect.signature(fn).bind(object(), *args, **kwargs)


def test_the_compose_config_is_valid() -> None:
    import yaml

    path = ROOT / "deploy" / "agent.yaml"
    if not path.exists():
        pytest.skip("no deploy/agent.yaml")
    block = (yaml.safe_load(path.read_text()).get("plugins") or {}).get("livekit")
    if block is None:
        pytest.skip("deploy/agent.yaml has no livekit block")
    LiveKitConfig.model_validate(block)


# ---- joining fails clearly, never hangs -------------------------------------------------
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Factory:
    def create_session(self, session_id: str | None = None, **options: Any) -> Any:
        raise AssertionError("no session may start without a room")


def plugin_for(url: str, timeout: float = 3.0) -> LiveKitPlugin:
    bus = EventBus()
    config = LiveKitConfig.model_validate({"url": url, **CREDS, "connect_timeout_s": timeout})
    return LiveKitPlugin(config, PluginContext(bus, FakeCommands(bus), sessions=Factory()))


@pytest.fixture
async def rejecting_server():
    seen: list[str] = []

    async def reject(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.Response(status=401, text="invalid token: signature mismatch")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", reject)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"ws://127.0.0.1:{runner.addresses[0][1]}", seen
    await runner.cleanup()


async def start_fails(plugin: LiveKitPlugin) -> str:
    with pytest.raises(ConnectionError) as info:
        await asyncio.wait_for(plugin.start(), plugin.config.connect_timeout_s + 5)  # a hang fails here
    await plugin.stop()
    assert plugin.room is None
    return str(info.value)


async def test_unreachable_url_fails_clearly() -> None:
    url = f"ws://127.0.0.1:{closed_port()}"
    message = await start_fails(plugin_for(url, timeout=1.0))  # a server still starting gets that long
    assert url in message and "'kitchen'" in message and "refused" in message and "kept trying for 1 s" in message


async def test_rejected_credentials_fail_clearly(rejecting_server) -> None:
    url, seen = rejecting_server
    message = await start_fails(plugin_for(url))
    assert url in message and "401" in message and "credentials" in message
    assert any(p.startswith("/rtc") for p in seen)  # it really asked the server


async def test_silent_server_times_out() -> None:
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accept, never answer
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    message = await start_fails(plugin_for(url, timeout=1.0))
    assert url in message and "no answer within 1 s" in message
    server.close()


async def test_plugin_host_disables_it_and_says_why(rejecting_server) -> None:
    url, _ = rejecting_server
    bus = EventBus()
    context = PluginContext(bus, FakeCommands(bus), sessions=Factory())
    host = PluginHost.from_config({"livekit": {"url": url, **CREDS, "connect_timeout_s": 3}}, context)
    await asyncio.wait_for(host.start(), 10)
    assert host.running == [] and "ConnectionError" in host.failed["livekit"] and url in host.failed["livekit"]
    await host.stop()

    # Without a session factory it cannot work at all: also a clear start error.
    host = PluginHost.from_config({"livekit": {"url": url, **CREDS}}, PluginContext(bus, FakeCommands(bus)))
    await host.start()
    assert "creates sessions" in host.failed["livekit"]


# ---- the example -----------------------------------------------------------------------
def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("livekit_room", ROOT / "examples" / "livekit_room.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_example_builds_a_valid_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEKIT_URL", "wss://demo.livekit.cloud")
    monkeypatch.setenv("LIVEKIT_API_KEY", "APIabc")
    monkeypatch.setenv("LIVEKIT_API_SECRET", "s3cret")
    agent = load_example().build("lobby")
    settings = agent.settings()
    host = PluginHost.from_config(settings.plugins, PluginContext(EventBus(), FakeCommands(EventBus())))
    (plugin,) = host.configured
    assert isinstance(plugin, LiveKitPlugin)
    assert (plugin.config.url, plugin.config.api_key, plugin.config.room) == ("wss://demo.livekit.cloud", "APIabc", "lobby")


@pytest.mark.parametrize("server", ["rejecting", pytest.param("unreachable", marks=pytest.mark.slow)])
async def test_example_exits_with_a_clear_error(server: str, rejecting_server) -> None:
    url = rejecting_server[0] if server == "rejecting" else f"ws://127.0.0.1:{closed_port()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LIVEKIT_URL": url, "VOICE_AGENT_BACKEND": "openai",
           "VOICE_AGENT_OPENAI_URL": "http://127.0.0.1:9/v1"}  # nothing to load; the room is what fails
    proc = await asyncio.create_subprocess_exec(sys.executable, "examples/livekit_room.py", cwd=ROOT, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 120)  # the default connect_timeout_s is 10 s
    stderr = err.decode()
    assert proc.returncode == 2, stderr
    assert f"cannot join LiveKit room 'voice-agent' at {url}" in stderr
    assert ("credentials" if server == "rejecting" else "refused") in stderr
