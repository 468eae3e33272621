"""Speech out over WebRTC, end to end: real espeak voices the scripted answers, a real aiortc
peer on loopback talks (espeak speech) and records the agent's audio track."""

from __future__ import annotations

import asyncio
import fractions
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import av
import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from agent.config import load_settings
from agent.inference.scripted import ScriptedBackend
from agent.runtime import AgentRuntime
from tests.rtc_util import BufferTrack, RtcClient, connect, loopback_only
from tests.speech import make_speech
from tests.test_server import Server, start_server

pytestmark = [pytest.mark.asyncio(loop_scope="session"),
              pytest.mark.skipif(__import__("shutil").which("espeak-ng") is None, reason="needs espeak-ng")]

LONG = ("Here is a fairly long answer that keeps going for quite a while. It talks about the lights in "
        "the kitchen, the weather outside, and the music in the living room. It ends only after many "
        "more words than anyone would wait for.")
AUDIBLE = 0.02  # frame RMS above this is the agent's voice (Opus silence decodes near zero)


@pytest.fixture(autouse=True)
def _loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    loopback_only(monkeypatch)


async def speaking_server(outputs: list[str], **turns: float) -> tuple[AgentRuntime, Server]:
    settings = load_settings(None, model="tiny-random", max_new_tokens=8, tts={"engine": "espeak"},
                             turns=turns or None)
    runtime = AgentRuntime(settings, backend=ScriptedBackend(outputs, delay=0.01, default="Okay."))
    await runtime.start()
    return runtime, await start_server(runtime)


@pytest.fixture
async def stack(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    made: list[tuple[AgentRuntime, Server]] = []

    async def make(outputs: list[str], **turns: float) -> tuple[AgentRuntime, Server]:
        made.append(await speaking_server(outputs, **turns))
        return made[-1]

    yield make
    for runtime, server in made:
        await server.runner.cleanup()
        await runtime.close()


async def voice_metrics(server: Server) -> dict[str, float]:
    """/metrics' speech-out samples, e.g. {"voice_agent_speech_backchannels_total": 1.0}."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/metrics") as r:
        text = await r.text()
    return {(s.name + "".join(f"{{{v}}}" for v in s.labels.values())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith("voice_agent_speech_")}


class Recorder:
    """The agent's track as the peer hears it: (arrival time, 48 kHz mono float) per frame,
    and every event's arrival time."""

    def __init__(self, client: RtcClient) -> None:
        self.frames: list[tuple[float, np.ndarray]] = []
        self.heard: deque[np.ndarray] = deque()  # for an echo path
        self.stamps: list[tuple[float, dict[str, Any]]] = []
        self.task: asyncio.Task[None] | None = None
        client.channel.on("message", lambda m: self.stamps.append((time.monotonic(), json.loads(m))))
        # the answer was applied already (its "track" event is past): read the receiver's track
        tracks = [r.track for r in client.pc.getReceivers() if r.track is not None and r.track.kind == "audio"]
        assert tracks, "the answer carries no audio track for the agent's voice"
        self.task = asyncio.ensure_future(self._read(tracks[0]))

    async def _read(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            channels = len(frame.layout.channels)
            pcm = frame.to_ndarray().reshape(-1, channels).mean(axis=1) / 32768.0
            self.frames.append((time.monotonic(), pcm))
            self.heard.append(pcm)

    def audible_s(self, start: float = 0.0, end: float = float("inf")) -> float:
        return sum(p.size / 48000 for t, p in self.frames if start <= t < end and np.sqrt((p**2).mean()) > AUDIBLE)

    def first_audible(self, after: float = 0.0) -> float | None:
        return next((t for t, p in self.frames if t >= after and np.sqrt((p**2).mean()) > AUDIBLE), None)

    def when(self, kind: str, n: int = 0) -> float:
        return [t for t, e in self.stamps if e["type"] == kind][n]

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


class EchoTrack(BufferTrack):
    """A microphone that hears the user's script plus the agent's own voice from the peer's
    loudspeaker, `gain` lower (no echo cancellation)."""

    def __init__(self, samples: np.ndarray, heard: deque[np.ndarray], gain: float) -> None:
        super().__init__(samples)
        self.heard = heard
        self.gain = gain
        self._echo = np.zeros(0, np.float32)

    async def recv(self) -> av.AudioFrame:
        frame = await super().recv()
        while self.heard:  # 48 kHz → 16 kHz (mean of 3: enough for a test loudspeaker)
            pcm = self.heard.popleft()
            pcm = pcm[: pcm.size // 3 * 3].reshape(-1, 3).mean(axis=1)
            self._echo = np.concatenate([self._echo, pcm.astype(np.float32)])
        echo, self._echo = self._echo[: self.step], self._echo[self.step :]
        mic = frame.to_ndarray().reshape(-1).astype(np.float32) / 32768
        mic[: echo.size] += self.gain * echo
        out = av.AudioFrame.from_ndarray((np.clip(mic, -1, 1) * 32767).astype(np.int16).reshape(1, -1),
                                         format="s16", layout="mono")
        out.sample_rate, out.pts, out.time_base = self.rate, frame.pts, fractions.Fraction(1, self.rate)
        return out


async def test_two_spoken_turns_get_spoken_answers(stack: Any) -> None:
    runtime, server = await stack(["Okay, the kitchen light is on.", "It is sunny today."])
    speech = make_speech([0.8, "turn on the kitchen light", 4.5, "what is the weather like today", 4.0], "speak-two")
    client = await connect(server.url, BufferTrack(speech.samples), wait=False)
    rec = Recorder(client)
    await client.wait_connected()
    done = await client.wait_for("response.audio.done", 2, timeout=90)
    assert [d["interrupted"] for d in done] == [False, False]
    answers = client.of_type("response.done")
    assert [d["spoken_text"] for d in done] == [a["text"] for a in answers]
    assert [d["turn_id"] for d in done] == [a["turn_id"] for a in answers]
    assert all(d["duration_s"] > 0.8 for d in done)
    assert all("tts_first_audio_s" in d["timings"] and "tts_rtf" in d["timings"] for d in done)
    assert not client.of_type("response.cancelled") and not client.of_type("error")
    for n in (0, 1):  # audible speech arrives after its response.started, about as long as reported
        first = rec.first_audible(after=rec.when("response.started", n))
        assert first is not None and first < rec.when("response.audio.done", n) + 0.5
    played = sum(d["duration_s"] for d in done)  # speech has quiet stretches: audible is less
    assert 0.4 * played < rec.audible_s() <= played + 0.1
    print(f"first audio after first delta: {[d['timings']['tts_first_audio_s'] for d in done]} s")
    m = await voice_metrics(server)
    assert m["voice_agent_speech_answers_total{played}"] == 2 and m["voice_agent_speech_answers_total{interrupted}"] == 0
    assert m["voice_agent_speech_played_seconds_total"] == pytest.approx(played, abs=0.01)
    print(f"speech underruns (gaps while the engine was behind): {m['voice_agent_speech_underruns_total']:g}")
    await rec.stop()
    await client.close()


async def test_barge_in_stops_the_voice_and_keeps_only_what_was_heard(stack: Any) -> None:
    runtime, server = await stack([LONG, "Sure, I will wait."])
    backend = runtime.backend
    assert isinstance(backend, ScriptedBackend)
    speech = make_speech([0.8, "turn on the kitchen light", 3.5, "stop, please wait a moment", 4.0], "speak-barge")
    client = await connect(server.url, BufferTrack(speech.samples), wait=False)
    rec = Recorder(client)
    await client.wait_connected()
    done = await client.wait_for("response.audio.done", 2, timeout=90)
    cancelled = client.of_type("response.cancelled")
    assert len(cancelled) == 1 and cancelled[0]["reason"] == "barge_in"
    heard = cancelled[0]["spoken_text"]
    assert heard and LONG.startswith(heard) and len(heard) < len(LONG) / 2
    assert done[0]["interrupted"] and done[0]["spoken_text"] == heard
    assert not done[1]["interrupted"]
    # the voice stopped: (almost) nothing audible between the cut and the next answer's audio
    cut, next_audio = rec.when("response.cancelled"), rec.when("response.audio.started", 1)
    assert rec.audible_s(cut + 0.3, next_audio) < 0.2
    # the model's next request shows only what the user heard of the first answer
    second = [r for r in backend.requests if not r.speculative][-1]
    said = [m["content"] for m in second.messages if m["role"] == "assistant"]
    assert said and said[0] in (heard, [{"type": "text", "text": heard}])
    assert len(client.of_type("turn.committed")) == 2
    m = await voice_metrics(server)
    assert m["voice_agent_speech_answers_total{interrupted}"] == 1 and m["voice_agent_speech_answers_total{played}"] == 1
    assert m["voice_agent_speech_flushed_seconds_total"] > 0.5  # the rest of LONG, never played
    await rec.stop()
    await client.close()


async def test_a_backchannel_does_not_interrupt(stack: Any) -> None:
    runtime, server = await stack([LONG], interrupt_min_speech_s=1.0)
    speech = make_speech([0.8, "turn on the kitchen light", 3.5, "okay", 12.0], "speak-backchannel")
    client = await connect(server.url, BufferTrack(speech.samples), wait=False)
    rec = Recorder(client)
    await client.wait_connected()
    done = await client.wait_for("response.audio.done", 1, timeout=90)
    assert len(client.of_type("speech.started")) == 2  # the "okay" was heard as speech …
    assert not done[0]["interrupted"] and done[0]["spoken_text"] == LONG  # … and did not cut the answer
    assert not client.of_type("response.cancelled")
    assert len(client.of_type("turn.committed")) == 1  # nor became a turn of its own
    m = await voice_metrics(server)
    assert m["voice_agent_speech_backchannels_total"] == 1 and m["voice_agent_speech_flushed_seconds_total"] == 0
    await rec.stop()
    await client.close()


async def test_the_agents_own_voice_fed_back_does_not_cancel_it(stack: Any) -> None:
    runtime, server = await stack([LONG])
    speech = make_speech([0.8, "turn on the kitchen light", 14.0], "speak-echo")
    heard: deque[np.ndarray] = deque()
    client = await connect(server.url, EchoTrack(speech.samples, heard, gain=10 ** (-12 / 20)), wait=False)
    rec = Recorder(client)
    rec.heard = heard
    await client.wait_connected()
    done = await client.wait_for("response.audio.done", 1, timeout=90)
    assert not done[0]["interrupted"] and done[0]["spoken_text"] == LONG
    assert not client.of_type("response.cancelled")
    assert len(client.of_type("turn.committed")) == 1
    session_voice = runtime.sessions[client.session_id].voice
    assert session_voice is not None
    print(f"speech starts over the agent's voice: {len(client.of_type('speech.started')) - 1}, "
          f"gated as echo: {session_voice.echo_gated}")
    m = await voice_metrics(server)
    assert m["voice_agent_speech_echo_gated_total"] == session_voice.echo_gated
    assert m["voice_agent_speech_backchannels_total"] == 0 and m["voice_agent_speech_answers_total{interrupted}"] == 0
    await rec.stop()
    await client.close()




async def test_a_yeah_pauses_the_voice_and_it_resumes_a_real_interruption_stops_it(stack: Any) -> None:
    runtime, server = await stack([LONG, "Sure, I will wait."])
    backend = runtime.backend
    assert isinstance(backend, ScriptedBackend)
    speech = make_speech([0.8, "turn on the kitchen light", 3.5, "yeah", 2.5,
                          "wait, stop, I have another question for you", 4.0], "speak-bargein")
    client = await connect(server.url, BufferTrack(speech.samples), wait=False)
    rec = Recorder(client)
    await client.wait_connected()
    await client.wait_for("response.audio.done", 2, timeout=90)
    kinds = [e["type"] for e in client.events]
    assert kinds.count("response.paused") == 2 and kinds.count("response.resumed") == 1
    assert kinds.count("speech.backchannel") == 1 and kinds.count("turn.committed") == 2
    (cancelled,) = client.of_type("response.cancelled")
    assert cancelled["reason"] == "barge_in"
    heard = cancelled["spoken_text"]
    assert heard and LONG.startswith(heard) and len(heard) < len(LONG)
    # the peer hears the pause, the voice again after the yeah, and silence after the interruption
    paused, resumed = rec.when("response.paused"), rec.when("response.resumed")
    assert rec.audible_s(paused + 0.2, resumed) < 0.1 < rec.audible_s(resumed, rec.when("response.paused", 1))
    assert rec.audible_s(rec.when("response.paused", 1) + 0.2, rec.when("response.audio.started", 1)) < 0.1
    # "yeah" was no turn; the model's next request holds what the user heard of the answer, once
    second = [r for r in backend.requests if not r.speculative][-1]
    said = [m["content"] for m in second.messages if m["role"] == "assistant"]
    assert said in ([heard], [[{"type": "text", "text": heard}]])
    await rec.stop()
    await client.close()
