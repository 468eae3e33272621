"""The `openai` backend against a local server that speaks vLLM's chat-completions wire format."""

import asyncio
import base64
import io
import json
import socket
import wave

import numpy as np
import pytest
from aiohttp import web
from aiohttp.client_exceptions import ClientConnectionResetError

from agent import events as ev
from agent.config import load_settings
from agent.conversation import Conversation
from agent.filerun import run_files
from agent.inference.base import GenerationStats, InferenceError
from agent.inference.openai import OpenAIBackend


class FakeVLLM:
    """Validates requests like vLLM would and streams scripted SSE deltas."""

    def __init__(self, pieces=("Hel", "lo", " there"), status=200, stall_after=None):
        self.pieces, self.status, self.stall_after = list(pieces), status, stall_after
        self.requests: list[dict] = []
        self.disconnected = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        if self.status != 200:
            return web.json_response({"error": {"message": "model is overloaded"}}, status=self.status)
        assert body["stream"] is True and body["model"] == "Qwen/Qwen2-Audio-7B-Instruct"
        for message in body["messages"]:
            for part in message["content"] if isinstance(message["content"], list) else []:
                if part["type"] == "input_audio":
                    with wave.open(io.BytesIO(base64.b64decode(part["input_audio"]["data"]))) as w:
                        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i, piece in enumerate(self.pieces):
                while self.stall_after is not None and i >= self.stall_after:
                    await resp.write(b": still thinking\n\n")  # SSE comment; fails once the client left
                    await asyncio.sleep(0.05)
                chunk = {"choices": [{"index": 0, "delta": {"content": piece}}]}
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            usage = {"choices": [], "usage": {"prompt_tokens": 42, "completion_tokens": len(self.pieces)}}
            await resp.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        except (ConnectionResetError, ClientConnectionResetError, asyncio.CancelledError):
            self.disconnected.set()
            raise
        return resp


@pytest.fixture
async def fake():
    server = FakeVLLM()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    server.url = f"http://127.0.0.1:{port}/v1"
    yield server
    await runner.cleanup()


def request_for(audio, instruction=None):
    conv = Conversation()
    conv.add_user(audio, instruction)
    return conv.request("s1", "t1", max_new_tokens=16)


async def collect(backend, request, stats=None):
    return [piece async for piece in backend.generate(request, stats)]


async def test_streams_deltas_and_sends_the_audio_and_instruction(fake, speech_two):
    backend = OpenAIBackend(fake.url, "Qwen/Qwen2-Audio-7B-Instruct")
    await backend.start()
    stats = GenerationStats()
    pieces = await collect(backend, request_for(speech_two.samples, "Transcribe it."), stats)
    await backend.close()
    assert pieces == ["Hel", "lo", " there"] and stats.tokens == 3 and stats.prompt_tokens == 42
    content = fake.requests[0]["messages"][-1]["content"]
    assert content[-1] == {"type": "text", "text": "Transcribe it."}
    with wave.open(io.BytesIO(base64.b64decode(content[0]["input_audio"]["data"]))) as w:
        sent = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32767
    np.testing.assert_allclose(sent, speech_two.samples, atol=1 / 16000)


async def test_cancel_mid_stream_closes_the_server_stream(fake, speech_two):
    fake.stall_after = 1
    backend = OpenAIBackend(fake.url, "Qwen/Qwen2-Audio-7B-Instruct")
    await backend.start()
    stream = backend.generate(request_for(speech_two.samples))
    assert await stream.__anext__() == "Hel"
    await stream.aclose()  # what a barge-in does
    await asyncio.wait_for(fake.disconnected.wait(), 10)
    await backend.close()


@pytest.mark.parametrize("status,code", [(500, "backend_error"), (503, "busy"), (429, "busy")])
async def test_http_errors_map_to_clear_codes(fake, speech_two, status, code):
    fake.status = status
    backend = OpenAIBackend(fake.url, "Qwen/Qwen2-Audio-7B-Instruct")
    await backend.start()
    with pytest.raises(InferenceError) as info:
        await collect(backend, request_for(speech_two.samples))
    await backend.close()
    assert info.value.code == code and str(status) in info.value.message and "overloaded" in info.value.message


async def test_dead_endpoint_is_backend_unavailable(speech_two):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    backend = OpenAIBackend(f"http://127.0.0.1:{port}/v1", "m", timeout=10)
    await backend.start()
    with pytest.raises(InferenceError) as info:
        await collect(backend, request_for(speech_two.samples))
    await backend.close()
    assert info.value.code == "backend_unavailable" and str(port) in info.value.message


async def test_file_run_through_the_openai_backend(fake, speech_two):
    settings = load_settings(None, backend="openai", openai_url=fake.url)
    out = io.StringIO()
    assert await run_files(settings, [str(speech_two.path)], jsonl=True, out=out) == 0
    events = [ev.parse_event(line) for line in out.getvalue().splitlines()]
    done = [e for e in events if isinstance(e, ev.ResponseDone)]
    assert [d.text for d in done] == ["Hello there", "Hello there"]
    # the second turn carries the whole history: two audios, the first answer in between
    second = fake.requests[1]["messages"]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[1]["content"] == "Hello there"
