"""The agent's voice in a LiveKit room, without a LiveKit server (none runs here).

The mixer on a virtual clock; then the real path: espeak speech → a local mic track →
the router → sessions with live voices → RoomVoice → the SDK's direct-capture AudioSource →
an rtc.AudioStream on the agent's track (what the room would carry). Joining publishes the
track (a Room whose connect is stubbed; the publish call binds to the SDK's own signature).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from livekit import api, rtc

from agent.bus import EventBus
from agent.config import load_settings
from agent.inference.scripted import ScriptedBackend
from agent.plugin import PluginContext
from agent.runtime import AgentRuntime
from agent.speech.chunker import Piece
from agent.speech.playback import Pacer, Player
from agent.speech.stage import SpeechChunk
from agent.transports.livekit import LiveKitConfig, LiveKitPlugin
from agent.transports.livekit.config import make_token
from agent.transports.livekit.participant import ParticipantRouter
from agent.transports.livekit.voice import TRACK_NAME, RoomVoice
from tests.mosquitto import FakeCommands
from tests.speech import make_speech
from tests.test_plugins_livekit import CREDS, Mic, Recorder, until
from tests.test_speech_playback import VirtualClock

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
AUDIBLE = 0.02


def tone(seconds: float, hz: float, rate: int = 48000) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (0.3 * 32767 * np.sin(2 * np.pi * hz * t)).astype(np.int16)


def speak(player: Player, turn_id: str, text: str, pcm: np.ndarray) -> None:
    piece = Piece(text, text)
    player.begin(turn_id)
    player.feed(SpeechChunk(pcm, 48000, piece, 0))
    player.feed(SpeechChunk(np.zeros(0, np.int16), 48000, piece, 0, piece_end=True))
    player.end()


class Sink:
    def __init__(self) -> None:
        self.frames: list[rtc.AudioFrame] = []

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        self.frames.append(frame)

    def pcm(self) -> np.ndarray:
        return np.concatenate([np.frombuffer(f.data, np.int16) for f in self.frames])


def peak_hz(pcm: np.ndarray, rate: int = 48000) -> list[float]:
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64)))
    freqs = np.fft.rfftfreq(pcm.size, 1 / rate)
    return sorted(float(freqs[i]) for i in np.argsort(spectrum)[-2:])


async def test_the_mixer_sums_the_players_onto_one_track_and_a_flush_cuts_one_voice() -> None:
    clock = VirtualClock()
    sink = Sink()
    voice = RoomVoice(source=sink, pacer=Pacer(0.02, clock=clock, sleep=clock.sleep))
    alice, bob = Player(), Player()
    voice.add("alice", alice)
    voice.add("bob", bob)
    with pytest.raises(ValueError, match="16000 Hz"):
        voice.add("odd", Player(sample_rate=16000))
    await voice.tick()  # idle: silence goes out
    assert len(sink.frames) == 2 and all(f.samples_per_channel == 480 and f.sample_rate == 48000 for f in sink.frames)
    assert not sink.pcm().any()

    speak(alice, "a1", "one two three four", tone(1.0, 440))
    speak(bob, "b1", "five six seven eight", tone(0.4, 1000))
    sink.frames.clear()
    for _ in range(10):
        await voice.tick()
    both = sink.pcm()
    assert both.size == 10 * 960
    assert peak_hz(both) == pytest.approx([440, 1000], abs=3)  # both answers, one track
    assert voice.overlapped_frames == 10 and voice.clipped_samples == 0
    report = bob.flush()  # bob barges in: his answer stops at once, alice's goes on
    assert report is not None and report.spoken_text == "five six" and report.interrupted
    sink.frames.clear()
    await voice.tick()
    after = sink.pcm()
    assert peak_hz(after)[-1] == pytest.approx(450, abs=30) and np.abs(after).max() > 5000  # 50 Hz bins
    assert voice.overlapped_frames == 10

    # started, the pacer is its clock: one frame per 20 ms of it
    sink.frames.clear()
    voice.start()
    await until(lambda: len(sink.frames) >= 40, what="twenty frames")
    await voice.aclose()
    assert clock.now == pytest.approx(len(sink.frames) // 2 * 0.02 - 0.02, abs=0.021)
    assert voice.frames == 11 + 1 + len(sink.frames) // 2


# ---- the real path -----------------------------------------------------------------------
class Stamped(Recorder):
    """The room's outbound side, with each event's arrival time."""

    def __init__(self) -> None:
        super().__init__()
        self.stamps: list[tuple[float, str, list[str]]] = []

    async def publish_data(self, payload: bytes | str, **kwargs: Any) -> None:
        await super().publish_data(payload, **kwargs)
        import json

        data = payload if isinstance(payload, str) else payload.decode()
        self.stamps.append((time.monotonic(), json.loads(data)["type"], list(kwargs.get("destination_identities", []))))

    def when(self, identity: str, kind: str, n: int = 0) -> float:
        return [t for t, k, dests in self.stamps if k == kind and dests == [identity]][n]


class Listener:
    """The agent's published track as a subscriber receives it: (arrival, 48 kHz float) frames."""

    def __init__(self, track: rtc.Track) -> None:
        self.frames: list[tuple[float, np.ndarray]] = []
        self._stream = rtc.AudioStream(track, sample_rate=48000, num_channels=1)
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for event in self._stream:
            pcm = np.frombuffer(event.frame.data, np.int16).astype(np.float32) / 32768
            self.frames.append((time.monotonic(), pcm))

    def audible_s(self, start: float = 0.0, end: float = float("inf")) -> float:
        return sum(p.size / 48000 for t, p in self.frames if start <= t < end and np.sqrt((p**2).mean()) > AUDIBLE)

    def first_audible(self, after: float) -> float | None:
        return next((t for t, p in self.frames if t >= after and np.sqrt((p**2).mean()) > AUDIBLE), None)

    async def aclose(self) -> None:
        await self._stream.aclose()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@needs_espeak
async def test_two_participants_hear_their_answers_on_the_agents_one_track() -> None:
    settings = load_settings(None, model="tiny-random", tts={"engine": "espeak"})
    runtime = AgentRuntime(settings, backend=ScriptedBackend([], chunk=4, delay=0.01, default="Okay, the light is on."))
    await runtime.start()
    voice = RoomVoice()
    voice.start()
    router = ParticipantRouter(runtime, runtime.bus, max_queue_s=5.0, voice=voice)
    router.outbound = out = Stamped()
    listener = Listener(voice.new_track())
    alice, bob = Mic(), Mic()
    try:
        s_alice = router.on_track_subscribed(alice.track, "alice")
        s_bob = router.on_track_subscribed(bob.track, "bob")
        assert s_alice.voice is not None and s_bob.voice is not None  # live voices, mixed
        assert set(voice.players) == {s_alice.id, s_bob.id}
        a = make_speech([0.8, "turn on the kitchen light", 4.5, "what is the weather like today", 4.0], "lk-alice")
        b = make_speech([1.0, "turn on the kitchen light", 5.0], "lk-bob")
        await asyncio.gather(alice.say(a.samples), bob.say(b.samples))
        await until(lambda: len(out.of("alice", "response.audio.done")) == 2 and out.of("bob", "response.audio.done"),
                    timeout=30, what="three spoken answers")
        done = {who: out.of(who, "response.audio.done") for who in ("alice", "bob")}
        assert [len(d) for d in done.values()] == [2, 1]
        for who, spoken in done.items():
            answers = out.of(who, "response.done")
            assert [d["spoken_text"] for d in spoken] == [x["text"] for x in answers]
            assert all(not d["interrupted"] and d["duration_s"] > 0.5 for d in spoken)
            assert not out.of(who, "error") and not out.of(who, "response.cancelled")
            for n in range(len(spoken)):  # audible speech on the track after each response.started
                first = listener.first_audible(out.when(who, "response.started", n))
                assert first is not None and first < out.when(who, "response.audio.done", n) + 0.5
        # the answers to alice's first turn and bob's overlapped: one track carried both
        assert voice.overlapped_frames > 0 and voice.capture_errors == 0
        played = sum(d["duration_s"] for spoken in done.values() for d in spoken)
        assert 0.3 * played < listener.audible_s() <= played + 0.1
        print(f"room voice: {voice.frames} frames, {voice.overlapped_frames} with two answers at once")
    finally:
        await listener.aclose()
        await router.aclose()
        assert voice.players == {}  # ended sessions are no longer mixed
        await voice.aclose()
        await alice.aclose()
        await bob.aclose()
        await runtime.close()


@needs_espeak
async def test_in_the_room_a_yeah_pauses_one_voice_and_it_resumes_an_interruption_stops_it() -> None:
    long = ("Here is a fairly long answer that keeps going for quite a while. It talks about the lights "
            "in the kitchen, the weather outside, and the music in the living room, and goes on.")
    settings = load_settings(None, model="tiny-random", tts={"engine": "espeak"})
    runtime = AgentRuntime(settings, backend=ScriptedBackend([long], chunk=4, delay=0.01, default="Sure."))
    await runtime.start()
    voice = RoomVoice()
    voice.start()
    router = ParticipantRouter(runtime, runtime.bus, max_queue_s=5.0, voice=voice)
    router.outbound = out = Stamped()
    listener = Listener(voice.new_track())
    alice = Mic()
    try:
        router.on_track_subscribed(alice.track, "alice")
        said = make_speech([0.8, "turn on the kitchen light", 3.5, "yeah", 2.5,
                            "wait, stop, I have another question for you", 3.0], "lk-bargein")
        await alice.say(said.samples)
        await until(lambda: len(out.of("alice", "response.audio.done")) == 2, timeout=30, what="two answers")
        kinds = [k for _, k, dests in out.stamps if dests == ["alice"]]
        assert kinds.count("response.paused") == 2 and kinds.count("response.resumed") == 1
        assert kinds.count("speech.backchannel") == 1 and kinds.count("turn.committed") == 2
        (cancelled,) = out.of("alice", "response.cancelled")
        assert cancelled["reason"] == "barge_in" and long.startswith(cancelled["spoken_text"])
        paused, resumed = out.when("alice", "response.paused"), out.when("alice", "response.resumed")
        assert listener.audible_s(paused + 0.1, resumed) < 0.05  # the room heard the pause …
        assert listener.audible_s(resumed, out.when("alice", "response.paused", 1)) > 0.1  # … and the voice again
    finally:
        await listener.aclose()
        await router.aclose()
        await voice.aclose()
        await alice.aclose()
        await runtime.close()


async def test_without_tts_sessions_are_text_only_and_nothing_is_published() -> None:
    settings = load_settings(None, model="tiny-random")
    runtime = AgentRuntime(settings, backend=ScriptedBackend([]))
    await runtime.start()
    router = ParticipantRouter(runtime, runtime.bus)
    router.outbound = Recorder()
    mic = Mic()
    session = router.on_track_subscribed(mic.track, "carol")
    assert session.voice is None and router.voice is None
    await router.aclose()
    await mic.aclose()
    await runtime.close()


# ---- joining publishes the track ---------------------------------------------------------
class Local:
    def __init__(self, refuse: bool) -> None:
        self.refuse = refuse
        self.published: list[tuple[rtc.LocalTrack, rtc.TrackPublishOptions]] = []

    async def publish_track(self, track: rtc.LocalTrack, options: rtc.TrackPublishOptions) -> None:
        import inspect

        inspect.signature(rtc.LocalParticipant.publish_track).bind(object(), track, options)
        if self.refuse:
            from livekit.rtc.participant import PublishTrackError

            raise PublishTrackError("insufficient permissions")
        self.published.append((track, options))


def stub_room(monkeypatch: pytest.MonkeyPatch, refuse: bool = False) -> list[Any]:
    rooms: list[Any] = []

    class StubRoom(rtc.Room):
        def __init__(self) -> None:
            super().__init__()
            self.local = Local(refuse)
            self.token = ""
            self.left = False
            rooms.append(self)

        async def connect(self, url: str, token: str, options: rtc.RoomOptions | None = None) -> None:
            self.token = token

        @property
        def local_participant(self) -> Any:
            return self.local

        async def disconnect(self, **kwargs: Any) -> None:
            self.left = True

    monkeypatch.setattr(rtc, "Room", StubRoom)
    return rooms


def speaking_plugin() -> LiveKitPlugin:
    config = LiveKitConfig.model_validate({"url": "ws://127.0.0.1:7880", **CREDS, "connect_timeout_s": 2})
    sessions = SimpleNamespace(tts=object(), open_session=None)  # a runtime whose TTS engine is on
    bus = EventBus()
    return LiveKitPlugin(config, PluginContext(bus, FakeCommands(bus), sessions=sessions))  # type: ignore[arg-type]


async def test_joining_publishes_one_voice_track_with_a_token_that_may_publish(monkeypatch: pytest.MonkeyPatch) -> None:
    rooms = stub_room(monkeypatch)
    plugin = speaking_plugin()
    await plugin.start()
    (room,) = rooms
    ((track, options),) = room.local.published
    assert isinstance(track, rtc.LocalAudioTrack) and track.name == TRACK_NAME
    assert options.source == rtc.TrackSource.SOURCE_MICROPHONE
    claims = api.TokenVerifier(CREDS["api_key"], CREDS["api_secret"]).verify(room.token)
    assert claims.video is not None and claims.video.can_publish and claims.video.can_publish_sources == ["microphone"]
    assert plugin.voice is not None and plugin.router is not None and plugin.router.voice is plugin.voice
    await plugin.stop()
    assert room.left and plugin.voice._task is None
    # without TTS the agent's token still may not publish
    config = LiveKitConfig.model_validate({"url": "ws://127.0.0.1:7880", **CREDS})
    grants = api.TokenVerifier(CREDS["api_key"], CREDS["api_secret"]).verify(make_token(config, "a")).video
    assert grants is not None and not grants.can_publish


async def test_a_refused_publish_fails_the_join_clearly_and_leaves(monkeypatch: pytest.MonkeyPatch) -> None:
    rooms = stub_room(monkeypatch, refuse=True)
    plugin = speaking_plugin()
    with pytest.raises(ConnectionError, match="cannot publish the agent's voice in LiveKit room 'kitchen'.*permissions"):
        await plugin.start()
    assert rooms[0].left and plugin.room is None and plugin.reconnects == 0
    await plugin.stop()
