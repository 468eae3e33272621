"""The Wyoming transport's fault paths as Home Assistant meets them (issue 22): a failed request
ends at once (`not-handled` or a close, which HA reports, instead of an `error` HA ignores);
a transcription runs no tools; saved audio answers only the device that sent it; the requests
are logged. The `wyoming` client library against a server in this process, scripted answers."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from wyoming.asr import Transcript
from wyoming.client import AsyncClient

from agent import events as ev
from agent import tool
from agent.config import load_settings
from agent.inference.base import InferenceError
from agent.inference.scripted import ScriptedBackend
from agent.runtime import AgentRuntime
from agent.transports.wyoming import WyomingServer
from tests.speech import Speech
from tests.test_wyoming import closed, pcm16, read_until, send_audio, types

pytestmark = pytest.mark.asyncio(loop_scope="session")
SAID = "turn on the kitchen light"
LIGHTS: list[str] = []


@tool
def turn_on(entity_id: str) -> str:
    """Turn on a light."""
    LIGHTS.append(entity_id)
    return f"{entity_id} is on"


@pytest.fixture(scope="module")
def speech(make_speech_fixture: Any) -> Speech:
    return make_speech_fixture([0.6, SAID, 0.8], "wy-one")


@pytest.fixture
async def server() -> AsyncIterator[WyomingServer]:
    backend = ScriptedBackend([], default=SAID)
    runtime = AgentRuntime(load_settings(None, model="tiny-random"), backend=backend, tools=[turn_on])
    await runtime.start()
    server = WyomingServer(runtime, "tcp://127.0.0.1:0")
    await server.start()
    yield server
    await server.stop()
    await runtime.close()


def backend_of(server: WyomingServer) -> ScriptedBackend:
    backend = server.runtime.backend
    assert isinstance(backend, ScriptedBackend)
    return backend


async def handle(server: WyomingServer, text: str, context: dict[str, Any]) -> tuple[list[Any], bool]:
    """A `transcript` to handle on a connection of its own, as Home Assistant sends it: the
    events up to the answer, and (after `not-handled`) whether the server then closed."""
    async with AsyncClient.from_uri(server.uri, read_timeout=30) as client:
        await client.write_event(Transcript(text, context=context).event())
        events = await read_until(client, "handled-stop", "not-handled")
        return events, events[-1].type == "not-handled" and await closed(client)


def user_parts(server: WyomingServer) -> list[str]:
    return [p["type"] for p in backend_of(server).requests[-1].messages[-1]["content"]]


async def test_a_failed_transcription_is_an_error_and_a_close_at_once(server: WyomingServer,
                                                                      speech: Speech) -> None:
    backend_of(server).outputs = [InferenceError("backend_unavailable", "the inference server is unreachable")]
    async with AsyncClient.from_uri(server.uri, read_timeout=30) as client:  # 30 s, not HA's 300 s
        await send_audio(client, pcm16(speech.samples))
        events = await read_until(client, "transcript-stop")
        assert events[-1].type == "error" and events[-1].data["code"] == "backend_unavailable", types(events)
        assert await closed(client)  # what makes Home Assistant report its speech-to-text error


@pytest.mark.parametrize("case", ["blank", "busy"])
async def test_a_transcript_that_cannot_be_handled_is_not_handled_then_closed(server: WyomingServer,
                                                                              case: str) -> None:
    if case == "busy":
        backend_of(server).outputs = [InferenceError("busy", "all workers are busy, try again")]
    events, was_closed = await handle(server, "   " if case == "blank" else SAID, {"conversation_id": "c1"})
    assert types(events)[-1] == "not-handled", types(events)
    reason = events[-1].data["text"]
    assert ("no text" in reason) if case == "blank" else ("busy" in reason), reason
    assert events[-1].data["context"]["conversation_id"] == "c1"
    assert was_closed


async def test_a_transcription_is_offered_no_tools_and_runs_none(server: WyomingServer, speech: Speech) -> None:
    call = json.dumps({"name": "turn_on", "arguments": {"entity_id": "light.kitchen"}})
    backend_of(server).outputs = [f"<tool_call>{call}</tool_call>"]
    LIGHTS.clear()
    bus = server.runtime.bus.subscribe()
    async with AsyncClient.from_uri(server.uri, read_timeout=30) as client:
        await send_audio(client, pcm16(speech.samples))
        events = await read_until(client, "transcript-stop")
    seen = []
    while not bus.queue.empty():
        seen.append(bus.queue.get_nowait())
    bus.close()
    assert types(events)[-1] == "transcript-stop", types(events)
    assert LIGHTS == []  # the client acts on the transcript: a call run here would be done twice
    assert not [e for e in seen if isinstance(e, (ev.ToolCall, ev.ToolResult))]
    assert "turn_on" not in json.dumps(backend_of(server).requests[-1].messages)  # not even offered


async def test_saved_audio_answers_only_the_device_that_sent_it(server: WyomingServer, speech: Speech) -> None:
    async def stt(context: dict[str, Any] | None) -> None:
        async with AsyncClient.from_uri(server.uri, read_timeout=30) as client:
            await send_audio(client, pcm16(speech.samples), context=context)
            assert types(await read_until(client, "transcript-stop"))[-1] == "transcript-stop"

    await stt({"satellite_id": "kitchen"})
    events, _ = await handle(server, SAID, {"satellite_id": "office"})  # the same words, elsewhere
    assert types(events)[-1] == "handled-stop"
    assert user_parts(server) == ["text"]  # not the kitchen's recording
    await handle(server, SAID, {"satellite_id": "kitchen"})
    assert user_parts(server) == ["audio"]  # the kitchen's own

    # Two recordings of the same words from one client naming no device (two satellites behind
    # one Home Assistant): which is whose cannot be told, so neither is used.
    await stt(None)
    await stt(None)
    await handle(server, SAID, {"conversation_id": "c2"})
    assert user_parts(server) == ["text"]


async def test_requests_and_tool_calls_are_logged_with_session_and_satellite(
        server: WyomingServer, speech: Speech, caplog: pytest.LogCaptureFixture) -> None:
    call = json.dumps({"name": "turn_on", "arguments": {"entity_id": "light.kitchen"}})
    backend_of(server).outputs = [SAID, f"<tool_call>{call}</tool_call>", "It is on."]
    caplog.set_level(logging.INFO, logger="agent.transports.wyoming")
    async with AsyncClient.from_uri(server.uri, read_timeout=30) as client:
        await send_audio(client, pcm16(speech.samples), context={"satellite_id": "kitchen"})
        await read_until(client, "transcript-stop")
    await handle(server, SAID, {"satellite_id": "kitchen"})
    lines = [r.getMessage() for r in caplog.records if r.name == "agent.transports.wyoming"]
    (transcribed,) = [line for line in lines if line.startswith("Wyoming transcribe:")]
    (handled,) = [line for line in lines if line.startswith("Wyoming handle:")]
    (called,) = [line for line in lines if line.startswith("Wyoming tool call:")]
    (result,) = [line for line in lines if line.startswith("Wyoming tool result:")]
    for line in (transcribed, handled, called, result):
        assert "satellite kitchen" in line and "session " in line, line
    assert "turn_on" in called and "ok" in result
