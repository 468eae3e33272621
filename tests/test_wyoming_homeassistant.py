"""The Wyoming server against a REAL Home Assistant 2024.3.3 (its own venv, `wyoming==1.5.3` as it
pins it; see tests/homeassistant_server.py): HA's config flow adds our service by host and port,
an `stt.` entity appears, and an Assist pipeline run over HA's WebSocket API streams espeak speech
to it; with a scripted transcript HA's own intent handling switches the light."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import pytest

from agent.config import load_settings
from agent.inference.base import InferenceError
from agent.inference.scripted import ScriptedBackend
from agent.runtime import AgentRuntime
from agent.transports.wyoming import WyomingServer
from tests.homeassistant_server import HA_VERSION, WYOMING, HomeAssistant, InstallError, install, pypi_reachable

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600), pytest.mark.asyncio(loop_scope="session")]
log = logging.getLogger(__name__)
SAID = "turn on the kitchen light"


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory) -> Any:
    try:
        venv, seconds = install(extras=WYOMING)
    except InstallError:
        if not pypi_reachable():
            pytest.skip(f"cannot install Home Assistant {HA_VERSION} with {WYOMING}: PyPI is unreachable")
        raise
    if seconds is not None:
        log.warning("installed Home Assistant %s (+ wyoming) in %.0f s", HA_VERSION, seconds)
    # `intent:` registers HassTurnOn & co., which HA's default conversation agent calls.
    with HomeAssistant(tmp_path_factory.mktemp("ha-wyoming"), venv, extra_config="intent:\n").start() as server:
        yield server


@pytest.fixture(scope="module")
async def agent() -> AsyncIterator[WyomingServer]:
    backend = ScriptedBackend([], default=SAID)  # the transcript HA gets back, whatever was said
    runtime = AgentRuntime(load_settings(None, model="tiny-random"), backend=backend)
    await runtime.start()
    server = WyomingServer(runtime, "tcp://127.0.0.1:0")
    await server.start()
    yield server
    await server.stop()
    await runtime.close()


class HAWebSocket:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.n = 0

    async def call(self, type_: str, **data: Any) -> dict[str, Any]:
        self.n += 1
        await self.ws.send_json({"id": self.n, "type": type_, **data})
        while True:
            msg = await self.ws.receive_json(timeout=60)
            if msg.get("id") == self.n and msg["type"] == "result":
                assert msg["success"], msg
                return msg


async def connect(ha: HomeAssistant, http: aiohttp.ClientSession) -> HAWebSocket:
    ws = await http.ws_connect(f"{ha.url}/api/websocket")
    assert (await ws.receive_json())["type"] == "auth_required"
    await ws.send_json({"type": "auth", "access_token": ha.token})
    assert (await ws.receive_json())["type"] == "auth_ok"
    return HAWebSocket(ws)


def add_service(ha: HomeAssistant, port: int) -> dict[str, Any]:
    """What a user does in Settings → Devices & services → Add integration → Wyoming Protocol."""
    status, flow = ha.request("POST", "/api/config/config_entries/flow", {"handler": "wyoming"})
    assert status == 200 and flow["type"] == "form" and flow["step_id"] == "user", flow
    status, result = ha.request("POST", f"/api/config/config_entries/flow/{flow['flow_id']}",
                                {"host": "127.0.0.1", "port": port})
    assert status == 200 and result["type"] == "create_entry", (result, ha.log_tail())
    return result


async def test_home_assistant_adds_the_service_and_a_pipeline_switches_the_light(
        ha: HomeAssistant, agent: WyomingServer, make_speech_fixture: Any) -> None:
    # HA's REST calls block: they run in a thread so this loop keeps serving HA's Wyoming requests.
    port = int(agent.uri.rsplit(":", 1)[1])
    await asyncio.to_thread(ha.call, "light", "turn_off", entity_id="light.kitchen")
    entry = await asyncio.to_thread(add_service, ha, port)
    assert entry["title"] == "qwen2-audio", entry

    async def stt_entities() -> list[str]:
        states = (await asyncio.to_thread(ha.request, "GET", "/api/states"))[1]
        return [s["entity_id"] for s in states if s["entity_id"].startswith("stt.")]

    for _ in range(300):
        if await stt_entities():
            break
        await asyncio.sleep(0.2)
    (stt,) = await stt_entities()

    speech = make_speech_fixture([0.6, SAID, 2.0], "wy-ha")
    events = await run_pipeline(ha, stt, speech.samples)
    kinds = [e["type"] for e in events]
    assert "error" not in kinds, (events, ha.log_tail())
    (stt_end,) = [e for e in events if e["type"] == "stt-end"]
    assert stt_end["data"]["stt_output"]["text"] == SAID  # our transcript, as HA's events show it
    (intent_end,) = [e for e in events if e["type"] == "intent-end"]
    response = intent_end["data"]["intent_output"]["response"]
    assert response["response_type"] == "action_done", response
    assert (await asyncio.to_thread(ha.state, "light.kitchen"))["state"] == "on"
    # HA streamed the speech to us as it came: one Wyoming connection, its audio converted.
    request = agent.runtime.backend.requests[-1]  # type: ignore[attr-defined]
    assert abs(sum(a.size for a in request.audios) / 16000 - (speech.segments[0][1] - speech.segments[0][0])) < 0.6


async def test_a_failed_transcription_is_home_assistants_stt_error_at_once(
        ha: HomeAssistant, agent: WyomingServer, make_speech_fixture: Any) -> None:
    """The backend down: HA ignores a Wyoming `error`, so without the close that follows it HA
    would wait for its pipeline timeout (300 s); `run_pipeline` gives up after 120 s."""
    states = (await asyncio.to_thread(ha.request, "GET", "/api/states"))[1]
    (stt,) = [s["entity_id"] for s in states if s["entity_id"].startswith("stt.")]  # added by the test above
    agent.runtime.backend.outputs = [  # type: ignore[attr-defined]
        InferenceError("backend_unavailable", "the inference server is unreachable")]
    events = await run_pipeline(ha, stt, make_speech_fixture([0.6, SAID, 2.0], "wy-ha").samples)
    assert events[-1]["type"] == "error", events
    assert events[-1]["data"]["code"].startswith("stt-"), events[-1]  # HA's own speech-to-text error
    assert "intent-start" not in [e["type"] for e in events]


async def run_pipeline(ha: HomeAssistant, stt: str, samples: np.ndarray) -> list[dict[str, Any]]:
    """An Assist pipeline run (speech to text, then HA's intents) over HA's WebSocket API, the
    speech streamed about real time: its events up to `run-end` or `error`."""
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    async with aiohttp.ClientSession() as http:
        ws = await connect(ha, http)
        pipeline = await ws.call("assist_pipeline/pipeline/create", conversation_engine="homeassistant",
                                 conversation_language="en", language="en", name="voice-agent", stt_engine=stt,
                                 stt_language="en", tts_engine=None, tts_language=None, tts_voice=None,
                                 wake_word_entity=None, wake_word_id=None)
        ws.n += 1
        run_id = ws.n
        await ws.ws.send_json({"id": run_id, "type": "assist_pipeline/run", "start_stage": "stt",
                               "end_stage": "intent", "input": {"sample_rate": 16000},
                               "pipeline": pipeline["result"]["id"]})
        events: list[dict[str, Any]] = []
        handler: int | None = None
        sender: asyncio.Task[None] | None = None

        async def stream(handler_id: int) -> None:
            prefix = bytes([handler_id])
            for i in range(0, len(pcm), 1024):  # 32 ms of 16-bit mono per message, about real time
                await ws.ws.send_bytes(prefix + pcm[i : i + 1024])
                await asyncio.sleep(0.01)
            await ws.ws.send_bytes(prefix)  # end of audio

        while not events or events[-1]["type"] not in ("run-end", "error"):
            msg = await ws.ws.receive_json(timeout=120)
            if msg.get("id") != run_id:
                continue
            if msg["type"] == "result":
                assert msg["success"], msg
                continue
            events.append(msg["event"])
            if msg["event"]["type"] == "run-start":
                handler = msg["event"]["data"]["runner_data"]["stt_binary_handler_id"]
                assert handler is not None
                sender = asyncio.create_task(stream(handler))
        if sender is not None:
            sender.cancel()
        await ws.ws.close()
    return events
