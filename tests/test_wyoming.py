"""The Wyoming transport at protocol level: the `wyoming` client library against a server in this
process on 127.0.0.1 — the real tiny-random Qwen2-Audio for transcripts, a scripted backend where
a test needs to know the model's words (handle, tools, conversation per satellite)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncClient
from wyoming.event import Event
from wyoming.info import Describe, Info

from agent import events as ev
from agent import tool
from agent.config import load_settings
from agent.inference.scripted import ScriptedBackend
from agent.runtime import AgentRuntime
from agent.transports.wyoming import TRANSCRIBE, WyomingOptions, WyomingServer
from tests.mosquitto import until
from tests.speech import Speech, make_speech

pytestmark = pytest.mark.asyncio(loop_scope="session")
RATE = 16000


def pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def chunks(data: bytes, size: int = 4096, frame: int = 2) -> list[bytes]:
    size -= size % frame  # whole frames, as real clients send
    return [data[i : i + size] for i in range(0, len(data), size)]


async def read_until(client: AsyncClient, *last: str) -> list[Event]:
    """Events up to one of `last`, an `error`, or the server closing (then the list ends)."""
    out: list[Event] = []
    while True:
        event = await client.read_event()
        if event is None:
            return out
        out.append(event)
        if event.type in last or event.type == "error":
            return out


async def send_audio(client: AsyncClient, data: bytes, rate: int = RATE, width: int = 2, channels: int = 1,
                     language: str | None = "en", context: dict[str, Any] | None = None) -> None:
    await client.write_event(Transcribe(language=language, context=context).event())
    await client.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
    for piece in chunks(data, frame=width * channels):
        await client.write_event(AudioChunk(rate=rate, width=width, channels=channels, audio=piece).event())
    await client.write_event(AudioStop().event())


async def transcribe(uri: str, data: bytes, **fmt: Any) -> list[Event]:
    client = AsyncClient.from_uri(uri, read_timeout=120)
    await client.connect()
    try:
        await send_audio(client, data, **fmt)
        return await read_until(client, "transcript-stop")
    except ConnectionError:  # the server closed after an error while we were still sending
        return await read_until(client, "transcript-stop")
    finally:
        with contextlib.suppress(ConnectionError):
            await client.disconnect()


def types(events: list[Event]) -> list[str]:
    return [e.type for e in events]


@pytest.fixture(scope="module")
def one(make_speech_fixture: Any) -> Speech:
    return make_speech_fixture([0.6, "turn on the kitchen light", 0.8], "wy-one")


# ---- the real tiny-random model --------------------------------------------------------------
@pytest.fixture(scope="module")
async def tiny() -> AsyncIterator[WyomingServer]:
    runtime = AgentRuntime(load_settings(None, model="tiny-random", workers=1, max_new_tokens=8))
    await runtime.start()
    server = WyomingServer(runtime, "tcp://127.0.0.1:0")
    await server.start()
    yield server
    await server.stop()
    await runtime.close()


async def test_describe_lists_an_installed_asr_program_with_languages(tiny: WyomingServer) -> None:
    async with AsyncClient.from_uri(tiny.uri, read_timeout=30) as client:
        await client.write_event(Describe().event())
        event = await client.read_event()
    assert event is not None and event.type == "info"
    info = Info.from_event(event)
    (asr,) = info.asr
    assert asr.installed and asr.name == "qwen2-audio" and asr.supports_transcript_streaming
    (model,) = asr.models
    assert model.installed and model.name == tiny.runtime.backend.model_name and "en" in model.languages
    (handle,) = info.handle
    assert handle.installed and handle.supports_handled_streaming and handle.models[0].languages == model.languages


async def test_tiny_random_transcribes_speech_streaming(tiny: WyomingServer, one: Speech) -> None:
    bus = tiny.runtime.bus.subscribe()
    events = await transcribe(tiny.uri, pcm16(one.samples))
    kinds = types(events)
    assert kinds[0] == "transcript-start" and kinds[-2:] == ["transcript", "transcript-stop"], kinds
    final = Transcript.from_event(events[-2])
    assert final.text.strip() and final.language == "en"
    assert "".join(e.data["text"] for e in events if e.type == "transcript-chunk").strip() == final.text
    # The connection was a session on the bus: an analysis turn with the transcription instruction.
    seen: list[ev.Event] = []
    while not bus.queue.empty():
        seen.append(bus.queue.get_nowait())
    bus.close()
    (turn,) = [e for e in seen if isinstance(e, ev.TurnCommitted)]
    assert turn.mode == "analysis" and turn.instruction is not None and turn.instruction.startswith(TRANSCRIBE)
    assert abs(turn.end - turn.start - (one.segments[0][1] - one.segments[0][0])) <= 0.6
    assert [e.type for e in seen if e.session_id == turn.session_id][0] == "session.started"
    assert any(isinstance(e, ev.ResponseDone) and e.session_id == turn.session_id for e in seen)


async def test_a_vanished_client_leaves_the_server_working(tiny: WyomingServer, one: Speech) -> None:
    data = pcm16(one.samples)
    for cut in ("mid_chunks", "after_stop"):
        reader, writer = await asyncio.open_connection(*tiny.uri[len("tcp://"):].rsplit(":", 1))
        client = AsyncClient()
        client._reader, client._writer = reader, writer
        await client.write_event(Transcribe().event())
        await client.write_event(AudioStart(rate=RATE, width=2, channels=1).event())
        parts = chunks(data)
        for piece in parts[: len(parts) // 2]:
            await client.write_event(AudioChunk(rate=RATE, width=2, channels=1, audio=piece).event())
        if cut == "mid_chunks":  # half an event: a header promising more payload than comes
            writer.write(b'{"type": "audio-chunk", "data": {"rate": 16000, "width": 2, "channels": 1}, '
                         b'"payload_length": 4096}\n' + b"\0" * 100)
        else:
            for piece in parts[len(parts) // 2 :]:
                await client.write_event(AudioChunk(rate=RATE, width=2, channels=1, audio=piece).event())
            await client.write_event(AudioStop().event())  # ...and gone before the transcript
        await writer.drain()
        writer.close()
        await until(lambda: not tiny.connections, 60, "the server to drop the connection")
    assert not tiny.runtime.sessions
    events = await transcribe(tiny.uri, data)
    assert types(events)[-1] == "transcript-stop" and Transcript.from_event(events[-2]).text.strip()


# ---- scripted answers ------------------------------------------------------------------------
LIGHTS: list[dict[str, Any]] = []


@tool
def turn_on(entity_id: str) -> str:
    """Turn on a light."""
    LIGHTS.append({"entity_id": entity_id})
    return f"{entity_id} is on"


@pytest.fixture
async def scripted() -> AsyncIterator[WyomingServer]:
    backend = ScriptedBackend([], default="turn on the kitchen light")
    runtime = AgentRuntime(load_settings(None, model="tiny-random"), backend=backend, tools=[turn_on])
    await runtime.start()
    server = WyomingServer(runtime, "tcp://127.0.0.1:0", WyomingOptions(max_audio_s=30.0))
    await server.start()
    yield server
    await server.stop()
    await runtime.close()
    assert not runtime.sessions


def backend_of(server: WyomingServer) -> ScriptedBackend:
    backend = server.runtime.backend
    assert isinstance(backend, ScriptedBackend)
    return backend


def audio_seconds(request: Any) -> float:
    return sum(a.size for a in request.audios) / RATE


@pytest.mark.parametrize("rate,width,channels", [(16000, 2, 1), (44100, 2, 2), (8000, 1, 1), (48000, 4, 2),
                                                 (22050, 3, 1)])
async def test_any_rate_width_and_channel_count_is_converted(scripted: WyomingServer, one: Speech, rate: int,
                                                             width: int, channels: int) -> None:
    import av

    from agent.audio import frame_from_pcm

    # The speech in the client's format: resampled by PyAV, then packed at that width.
    conv = av.AudioResampler(format="flt", layout="mono" if channels == 1 else "stereo", rate=rate)
    frames = conv.resample(frame_from_pcm(one.samples, RATE)) + conv.resample(None)
    pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in frames])  # interleaved
    ints = np.round(np.clip(pcm, -1, 1) * float(2 ** (8 * width - 1) - 1)).astype("<i4")
    if width == 1:
        data = (ints + 128).astype(np.uint8).tobytes()  # 8-bit PCM is unsigned
    else:  # little-endian: the low `width` bytes of each int32
        data = ints.view(np.uint8).reshape(-1, 4)[:, :width].tobytes()
    events = await transcribe(scripted.uri, data, rate=rate, width=width, channels=channels)
    assert Transcript.from_event(events[-2]).text == "turn on the kitchen light", types(events)
    (request,) = backend_of(scripted).requests
    spoken = one.segments[0][1] - one.segments[0][0]
    assert abs(audio_seconds(request) - spoken) <= 0.6  # 16 kHz mono, the speech's length
    assert request.messages[-1]["content"][-1]["text"].startswith(TRANSCRIBE)


async def test_handle_answers_from_the_audio_just_transcribed_and_streams(scripted: WyomingServer,
                                                                          one: Speech) -> None:
    backend = backend_of(scripted)
    backend.outputs = ["turn on the kitchen light", "Sure, it is on."]
    async with AsyncClient.from_uri(scripted.uri, read_timeout=60) as client:
        await send_audio(client, pcm16(one.samples))
        transcript = Transcript.from_event((await read_until(client, "transcript-stop"))[-2])
        await client.write_event(Transcript(transcript.text, context={"satellite_id": "hall"}).event())
        events = await read_until(client, "handled-stop")
    kinds = types(events)
    assert kinds[0] == "handled-start" and kinds[-2:] == ["handled", "handled-stop"], kinds
    assert events[-2].data["text"] == "Sure, it is on." and events[-2].data["context"]["satellite_id"] == "hall"
    assert "".join(e.data["text"] for e in events if e.type == "handled-chunk") == "Sure, it is on."
    answer = backend.requests[-1]
    # Voice chat on the speaker's audio: an audio part and no text in the user turn.
    assert audio_seconds(answer) > 1.0
    assert [p["type"] for p in answer.messages[-1]["content"]] == ["audio"]

    # As Home Assistant does it: speech to text on one connection, the transcript to handle on
    # another (with the satellite's context), and the answer still comes from the audio.
    backend.outputs = ["turn on the kitchen light", "Done."]
    events = await transcribe(scripted.uri, pcm16(one.samples))
    text = Transcript.from_event(events[-2]).text
    async with AsyncClient.from_uri(scripted.uri, read_timeout=60) as client:
        await client.write_event(Transcript(text.upper() + ".", context={"satellite_id": "hall"}).event())
        events = await read_until(client, "handled-stop")
    assert events[-2].data["text"] == "Done."
    answer = backend.requests[-1]
    assert [p["type"] for p in answer.messages[-1]["content"]] == ["audio"]
    assert len([m for m in answer.messages if m["role"] == "user"]) == 2  # the hall's conversation goes on


async def test_handle_runs_tools_and_keeps_the_conversation_per_satellite(scripted: WyomingServer) -> None:
    backend = backend_of(scripted)
    call = json.dumps({"name": "turn_on", "arguments": {"entity_id": "light.kitchen"}})
    backend.outputs = [f"<tool_call>{call}</tool_call>", "The kitchen light is on.", "It was the kitchen.",
                       "Hello, office."]
    LIGHTS.clear()
    bus = scripted.runtime.bus.subscribe()

    async def handle(text: str, context: dict[str, Any]) -> list[Event]:
        async with AsyncClient.from_uri(scripted.uri, read_timeout=60) as client:  # a connection each, as HA
            await client.write_event(Transcript(text, context=context).event())
            return await read_until(client, "handled-stop")

    first = await handle("turn on the kitchen light", {"satellite_id": "kitchen", "conversation_id": "c1"})
    assert first[-2].data["text"] == "The kitchen light is on." and LIGHTS == [{"entity_id": "light.kitchen"}]
    second = await handle("which light was it?", {"satellite_id": "kitchen", "conversation_id": "c2"})
    assert second[-2].data["text"] == "It was the kitchen."
    follow_up = backend.requests[-1].messages
    assert any("turn on the kitchen light" in json.dumps(m) for m in follow_up)  # the history came along
    await handle("hello", {"satellite_id": "office"})
    assert not any("kitchen" in json.dumps(m) for m in backend.requests[-1].messages[1:])  # another satellite
    seen = []
    while not bus.queue.empty():
        seen.append(bus.queue.get_nowait())
    bus.close()
    assert [e.name for e in seen if isinstance(e, ev.ToolCall)] == ["turn_on"]
    assert any(isinstance(e, ev.ToolResult) and e.ok for e in seen)


# ---- bad input: an error event or a clean close, never a crash --------------------------------
async def expect_error(client: AsyncClient, code: str) -> Event:
    events = await read_until(client, "error")
    assert events and events[-1].type == "error", types(events)
    assert events[-1].data["code"] == code, events[-1].data
    return events[-1]


async def still_answers(client: AsyncClient) -> None:
    await client.write_event(Describe().event())
    assert (await client.read_event()).type == "info"  # type: ignore[union-attr]


async def closed(client: AsyncClient) -> bool:
    return await client.read_event() is None


async def test_chunk_before_start_and_unknown_events_are_errors_the_connection_goes_on(
        scripted: WyomingServer) -> None:
    async with AsyncClient.from_uri(scripted.uri, read_timeout=30) as client:
        await client.write_event(AudioChunk(rate=RATE, width=2, channels=1, audio=b"\0" * 640).event())
        await expect_error(client, "audio_not_started")
        await client.write_event(AudioStop().event())
        await expect_error(client, "audio_not_started")
        await client.write_event(Event(type="launch-rockets", data={"now": True}))
        await expect_error(client, "unknown_event")
        await still_answers(client)
        # A stream in a format that cannot be PCM ends this transcription: error, then close.
        await client.write_event(AudioStart(rate=0, width=2, channels=1).event())
        await expect_error(client, "bad_audio")
        assert await closed(client)


async def test_audio_stop_with_no_audio_is_an_error_then_a_close(scripted: WyomingServer) -> None:
    async with AsyncClient.from_uri(scripted.uri, read_timeout=30) as client:
        await client.write_event(Transcribe().event())
        await client.write_event(AudioStart(rate=RATE, width=2, channels=1).event())
        await client.write_event(AudioStop().event())
        await expect_error(client, "no_audio")
        assert await closed(client)


async def test_a_10_mb_chunk_is_refused_and_other_connections_go_on(scripted: WyomingServer, one: Speech) -> None:
    async def big() -> None:
        async with AsyncClient.from_uri(scripted.uri, read_timeout=60) as client:
            await client.write_event(AudioStart(rate=RATE, width=2, channels=1).event())
            await client.write_event(AudioChunk(rate=RATE, width=2, channels=1, audio=b"\1" * 10_000_000).event())
            await expect_error(client, "chunk_too_large")
            assert await closed(client)

    good, _ = await asyncio.gather(transcribe(scripted.uri, pcm16(one.samples)), big())
    assert Transcript.from_event(good[-2]).text == "turn on the kitchen light"


async def test_an_event_declaring_a_huge_payload_is_closed_unread(scripted: WyomingServer) -> None:
    async with AsyncClient.from_uri(scripted.uri, read_timeout=30) as client:
        assert client._writer is not None
        client._writer.write(b'{"type": "audio-chunk", "data": {"rate": 16000, "width": 2, "channels": 1}, '
                             b'"payload_length": 4000000000}\n')
        await client._writer.drain()
        assert await closed(client)
    assert not scripted.connections or await _no_connections(scripted)


async def _no_connections(server: WyomingServer) -> bool:
    await until(lambda: not server.connections, 10, "connections to close")
    return True


async def test_30_s_of_silence_is_no_speech(scripted: WyomingServer) -> None:
    silence = np.random.default_rng(0).normal(0, 1e-4, 30 * RATE).astype(np.float32)
    events = await transcribe(scripted.uri, pcm16(silence))
    assert types(events) == ["error"] and events[0].data["code"] == "no_speech"
    assert not backend_of(scripted).requests  # the model was never asked


async def test_more_than_30_s_of_speech_is_refused(scripted: WyomingServer) -> None:
    long = make_speech(["turn on the kitchen light", 0.4] * 20, "wy-long")
    assert long.samples.size > 31 * RATE
    events = await transcribe(scripted.uri, pcm16(long.samples))
    assert types(events) == ["error"] and events[0].data["code"] == "audio_too_long"
    assert not backend_of(scripted).requests
    # the errors reached the bus too (plugins, /metrics)
    events = await transcribe(scripted.uri, pcm16(make_speech([0.5, "hello", 0.5], "wy-hello").samples))
    assert Transcript.from_event(events[-2]).text == "turn on the kitchen light"


async def test_a_client_gone_mid_answer_cancels_it_cleanly(one: Speech) -> None:
    backend = ScriptedBackend([], default="a long answer " * 50, delay=0.02)
    runtime = AgentRuntime(load_settings(None, model="tiny-random"), backend=backend)
    await runtime.start()
    server = WyomingServer(runtime, "tcp://127.0.0.1:0")
    await server.start()
    bus = runtime.bus.subscribe()
    try:
        async with AsyncClient.from_uri(server.uri, read_timeout=60) as client:
            await send_audio(client, pcm16(one.samples))
            first = await client.read_event()
            assert first is not None and first.type == "transcript-start"
        await until(lambda: not runtime.sessions, 30, "the session to end")
        seen = []
        while not bus.queue.empty():
            seen.append(bus.queue.get_nowait())
        assert any(isinstance(e, ev.ResponseCancelled) for e in seen)
        assert [e.reason for e in seen if isinstance(e, ev.SessionEnded)] == ["client_disconnected"]
        backend.default, backend.delay = "still here", 0.0
        events = await transcribe(server.uri, pcm16(one.samples))
        assert Transcript.from_event(events[-2]).text == "still here"
    finally:
        bus.close()
        await server.stop()
        await runtime.close()


async def test_a_session_closed_from_elsewhere_closes_its_connection(scripted: WyomingServer) -> None:
    async with AsyncClient.from_uri(scripted.uri, read_timeout=30) as client:
        await client.write_event(AudioStart(rate=RATE, width=2, channels=1).event())
        await until(lambda: bool(scripted.runtime.sessions), 10, "the connection's session")
        (session_id,) = scripted.runtime.sessions
        await scripted.runtime.send_command(session_id, ev.SessionClose())  # e.g. a command over MQTT
        await client.write_event(AudioChunk(rate=RATE, width=2, channels=1, audio=b"\0" * 640).event())
        assert await closed(client)


async def test_connections_over_the_limit_are_told_busy(scripted: WyomingServer) -> None:
    scripted.runtime.settings.server.max_sessions = 1
    async with AsyncClient.from_uri(scripted.uri, read_timeout=30) as first:
        await still_answers(first)
        async with AsyncClient.from_uri(scripted.uri, read_timeout=30) as second:
            await expect_error(second, "busy")
            assert await closed(second)
        await still_answers(first)
