"""`voice-agent serve-model`: the real tiny-random pool behind the chat-completions wire,
driven by our own `openai` backend over TCP and over a Unix socket."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from agent.config import load_settings
from agent.conversation import Conversation
from agent.inference.base import GenerationStats, InferenceError
from agent.inference.openai import OpenAIBackend
from agent.inference.pool import InferencePool
from agent.model.qwen2_audio import audio_base64
from agent.server.model_server import ModelServer, run_model_server
from agent.server.model_wire import ConversationKeys
from agent.server.secrets import tenant_of

pytestmark = pytest.mark.asyncio(loop_scope="session")

TOKEN = "s3cret"
ROOT = Path(__file__).resolve().parent.parent
GUARD = 60  # seconds: a hang fails the test instead of stalling the run (not a timing assert)


@dataclass
class Served:
    server: ModelServer
    pool: InferencePool
    tcp: str
    unix: str

    def client(self, transport: str = "tcp", token: str | None = TOKEN) -> OpenAIBackend:
        # The client's default model name: our server tells it the one it serves.
        return OpenAIBackend(self.tcp if transport == "tcp" else self.unix, "Qwen/Qwen2-Audio-7B-Instruct",
                             api_key=token)

    def key(self, key: str) -> str:
        """How the server holds `key` sent with TOKEN (keys are scoped to their credential)."""
        return self.server.scoped(tenant_of(TOKEN), key)

    def metric(self, name: str, **labels: str) -> float:
        body, _ = self.server.metrics.render()
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return 0.0


@pytest.fixture(scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    settings = load_settings(None, model="tiny-random", max_new_tokens=8, workers=1, max_batch=4, max_queue=3)
    pool = InferencePool(settings.model, workers=1, max_batch=4, max_queue=3)
    await pool.start()
    server = ModelServer(pool, settings, token=TOKEN)
    runner = server.runner()
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
    path = str(tmp_path_factory.mktemp("model") / "model.sock")
    await web.UnixSite(runner, path).start()
    yield Served(server, pool, f"http://127.0.0.1:{port}/v1", f"unix://{path}")
    await runner.cleanup()
    await pool.close()


async def until(predicate: Any, timeout: float = GUARD) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).uniform(-0.3, 0.3, int(seconds * 16000))).astype(np.float32)


async def answer(backend: OpenAIBackend, request: Any, stats: GenerationStats | None = None) -> str:
    async def run() -> str:
        return "".join([d async for d in backend.generate(request, stats)])

    return await asyncio.wait_for(run(), GUARD)


def raw_session(served: Served, token: str | None = TOKEN) -> aiohttp.ClientSession:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return aiohttp.ClientSession(headers=headers)


def body(seconds: float = 0.5, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny-random", "max_tokens": 4, **extra, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": audio_base64(noise(seconds)), "format": "wav"}}]}]}


# ---- through our own client ------------------------------------------------------------

@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_two_turns_reuse_the_conversations_kv(served: Served, transport: str) -> None:
    backend = served.client(transport)
    await backend.start()
    assert backend.model_name == "tiny-random" and {"prefill", "forget", "conversation"} <= backend.features
    reused_before = served.metric("voice_agent_model_tokens_total", kind="reused")
    conv, sid = Conversation(), f"talk-{transport}"
    first, second = GenerationStats(), GenerationStats()
    conv.add_user(noise(1.0, 1))
    conv.add_assistant(await answer(backend, conv.request(sid, "t1", 8), first))
    conv.add_user(noise(0.8, 2))
    await answer(backend, conv.request(sid, "t2", 8), second)
    assert first.tokens > 0 and first.reused_tokens == 0
    # The second turn's prompt starts with the first turn and its answer: their KV is reused.
    assert second.prompt_tokens > first.prompt_tokens and second.reused_tokens >= first.prompt_tokens
    assert served.metric("voice_agent_model_tokens_total", kind="reused") - reused_before == second.reused_tokens
    assert served.key(sid) in served.server.keys
    await backend.forget(sid)  # the session ended: its key and KV go
    await backend.close()
    assert served.key(sid) not in served.server.keys and served.metric("voice_agent_model_conversations_forgotten_total",
                                                           reason="deleted") >= 1


async def test_a_prefill_only_request_is_continued_by_its_turn(served: Served) -> None:
    backend = served.client("unix")
    await backend.start()
    conv = Conversation()
    conv.add_user(noise(1.5, 3))
    request = conv.request("spec", "t1", 6)
    adopted = served.metric("voice_agent_model_request_phase_seconds_count", phase="speculative_prefill")
    await backend.prefill(request)  # 204 once the pool has it
    assert served.metric("voice_agent_model_requests_total", outcome="prefill") >= 1
    await until(lambda: not served.pool._specs)  # prefilled: the worker keeps it for the commit
    stats = GenerationStats()
    await answer(backend, request, stats)
    assert stats.tokens > 0
    assert served.metric("voice_agent_model_request_phase_seconds_count", phase="speculative_prefill") == adopted + 1
    await backend.forget("spec")
    await backend.close()


async def test_busy_is_429_and_a_disconnect_cancels_the_generation(served: Served) -> None:
    backend = served.client("tcp")
    await backend.start()
    cancelled = served.metric("voice_agent_model_requests_total", outcome="cancelled")
    streams = []
    for i in range(3):  # max_queue: long answers (EOS suppressed), each read to its first delta
        conv = Conversation()
        conv.add_user(noise(0.5, 10 + i))
        request = conv.request(f"long{i}", "t1", 4000)
        request.extra["min_new_tokens"] = 4000
        stream = backend.generate(request)
        await asyncio.wait_for(anext(stream), GUARD)
        streams.append(stream)
    assert served.pool.queue_depth == 3
    conv = Conversation()
    conv.add_user(noise(0.5, 20))
    with pytest.raises(InferenceError) as info:
        await answer(backend, conv.request("one-too-many", "t1", 4))
    assert info.value.code == "busy" and "max_queue=3" in info.value.message and "retry after 1 s" in info.value.message
    async with raw_session(served) as http:
        async with http.post(f"{served.tcp}/chat/completions", json=body(stream=True)) as response:
            assert response.status == 429 and response.headers["Retry-After"] == "1"
            error = (await response.json())["error"]
            assert error["code"] == "busy" and error["type"] == "rate_limit_error" and "max_queue" in error["message"]
    for stream in streams:  # the caller stops reading: the connection goes, the server cancels
        await stream.aclose()
    await until(lambda: served.pool.queue_depth == 0)
    assert served.metric("voice_agent_model_requests_total", outcome="cancelled") == cancelled + 3
    assert served.metric("voice_agent_errors_total", code="busy") >= 2
    await backend.close()


# ---- the wire itself ---------------------------------------------------------------------

async def test_a_raw_client_streams_or_gets_one_answer(served: Served) -> None:
    keys = len(served.server.keys)
    async with raw_session(served) as http:
        async with http.post(f"{served.tcp}/chat/completions", json=body()) as response:
            assert response.status == 200
            whole = await response.json()
        async with http.post(f"{served.tcp}/chat/completions",
                             json=body(stream=True, stream_options={"include_usage": True})) as response:
            assert response.status == 200 and response.content_type == "text/event-stream"
            lines = [line.decode().strip() async for line in response.content if line.strip()]
    assert whole["object"] == "chat.completion" and whole["model"] == "tiny-random"
    message = whole["choices"][0]["message"]
    assert message["role"] == "assistant" and whole["usage"]["completion_tokens"] == 4
    assert whole["choices"][0]["finish_reason"] == "length"
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[5:]) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == message["content"]  # greedy: the same answer both ways
    assert chunks[-1]["usage"]["completion_tokens"] == 4 and chunks[-1]["choices"] == []
    assert len(served.server.keys) == keys  # no conversation key: nothing kept


async def test_models_lists_max_model_len_and_our_features(served: Served) -> None:
    async with raw_session(served) as http, http.get(f"{served.tcp}/models") as response:
        card = (await response.json())["data"][0]
    assert card["id"] == "tiny-random" and card["max_model_len"] == 8192
    assert set(card["voice_agent"]["features"]) >= {"prefill", "drop", "promote", "forget"}


async def test_a_token_is_required(served: Served) -> None:
    for token, reason in ((None, "missing bearer token"), ("wrong", "invalid bearer token")):
        async with raw_session(served, token) as http, http.post(f"{served.tcp}/chat/completions",
                                                                 json=body()) as response:
            assert response.status == 401 and reason in (await response.json())["error"]["message"]
    backend = served.client("unix", token=None)
    await backend.start()
    with pytest.raises(InferenceError) as info:
        await answer(backend, _request())
    assert info.value.code == "backend_error" and "401" in info.value.message
    await backend.close()
    async with aiohttp.ClientSession() as http, http.get(f"{served.tcp.removesuffix('/v1')}/healthz") as response:
        assert response.status == 200  # public, for probes


def _request() -> Any:
    conv = Conversation()
    conv.add_user(noise(0.5))
    return conv.request("x", "t1", 4)


@pytest.mark.parametrize("change,status,code", [
    ({"model": "gpt-4o"}, 404, "model_not_found"),
    ({"messages": []}, 400, "invalid_request"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "invalid_request"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "%%%"}}]}]}, 400,
     "invalid_audio"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "unsupported"),
    ({"max_tokens": 100000}, 400, "invalid_request"),
])
async def test_bad_requests_get_an_openai_error(served: Served, change: dict[str, Any], status: int, code: str) -> None:
    async with raw_session(served) as http, http.post(f"{served.tcp}/chat/completions",
                                                      json=body() | change) as response:
        assert response.status == status
        error = (await response.json())["error"]
    assert error["code"] == code and error["message"] and error["type"] == "invalid_request_error"


async def test_no_worker_up_is_503_with_retry_after() -> None:
    settings = load_settings(None, model="tiny-random")
    server = ModelServer(InferencePool("tiny-random", workers=1), settings)  # never started: no worker
    runner = server.runner()
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/healthz") as response:
                assert response.status == 503 and (await response.json())["status"] == "unavailable"
            async with http.post(f"{url}/v1/chat/completions", json=body()) as response:
                assert response.status == 503 and response.headers["Retry-After"] == "1"
                assert (await response.json())["error"]["code"] == "backend_unavailable"
        backend = OpenAIBackend(f"{url}/v1", "tiny-random")
        await backend.start()
        with pytest.raises(InferenceError) as info:
            await answer(backend, _request())
        assert info.value.code == "backend_unavailable" and "503" in info.value.message
        await backend.close()
    finally:
        await runner.cleanup()


async def test_beyond_loopback_without_a_token_does_not_start(capsys: pytest.CaptureFixture[str]) -> None:
    settings = load_settings(None, model="no-such-org/never-loaded")
    assert await run_model_server(settings, "tcp://0.0.0.0:0") == 2
    err = capsys.readouterr().err
    assert "set a token" in err and "0.0.0.0" in err and "Traceback" not in err
    assert await run_model_server(settings, "http://127.0.0.1:80") == 2
    assert "tcp://HOST:PORT or unix:///PATH" in capsys.readouterr().err


async def test_conversation_keys_are_bounded_and_expire() -> None:
    now = [0.0]
    keys = ConversationKeys(max_keys=2, ttl_s=10, clock=lambda: now[0])
    assert keys.touch("a") == [] and keys.begin("b") == []
    assert keys.touch("c") == ["a"]  # over the bound: the least recently used idle key
    assert keys.touch("d") == ["c"]  # "b" has a request running: never evicted under it
    now[0] = 11
    assert keys.expire() == ["d"] and "b" in keys  # idle for the TTL; "b" is still busy
    keys.end("b")
    now[0] = 20
    assert keys.expire() == []
    now[0] = 21
    assert keys.expire() == ["b"] and len(keys) == 0
    assert keys.expired == {"idle": 2, "lru": 2, "deleted": 0}


async def test_idle_conversations_are_forgotten_on_the_server(served: Served) -> None:
    backend = served.client("tcp")
    await backend.start()
    await answer(backend, _request())  # conversation "x"
    assert served.key("x") in served.server.keys
    ttl = served.server.keys.ttl_s
    served.server.keys.ttl_s = 0.0  # everything idle is due now: the sweeper forgets it
    try:
        await until(lambda: served.key("x") not in served.server.keys)
    finally:
        served.server.keys.ttl_s = ttl
    assert served.metric("voice_agent_model_conversations_forgotten_total", reason="idle") >= 1
    await backend.close()


# ---- as users run it ---------------------------------------------------------------------

def _connectable(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
            return True
        except OSError:
            return False


@pytest.mark.slow
async def test_voice_agent_run_against_a_serve_model_process(tmp_path: Path, speech_two: Any) -> None:
    path = str(tmp_path / "pool.sock")
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", "serve-model", "--model", "tiny-random", "--listen", f"unix://{path}",
        "--max-new-tokens", "6", stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(180):  # ready: the socket accepts once the pool has loaded
            while not _connectable(path):
                assert server.returncode is None
                await asyncio.sleep(0.2)
        run = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.cli", "run", str(speech_two.path), "--jsonl", "--backend", "openai",
            "--openai-url", f"unix://{path}", "--max-new-tokens", "6",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(run.communicate(), 240)
        assert run.returncode == 0, err.decode()
        events = [json.loads(line) for line in out.decode().splitlines()]
        done = [e for e in events if e["type"] == "response.done"]
        assert events[0]["model"] == "tiny-random" and len(done) == 2 and all(d["tokens"] > 0 for d in done)
        metrics = await _metrics(path)
        assert 'voice_agent_model_requests_total{outcome="done"} 2.0' in metrics
        reused = [line for line in metrics.splitlines() if line.startswith('voice_agent_model_tokens_total{kind="reused"}')]
        assert float(reused[0].split()[-1]) > 0  # the second turn reused the first turn's KV
        assert 'voice_agent_model_conversations_forgotten_total{reason="deleted"} 1.0' in metrics  # session end
    finally:
        if server.returncode is None:
            server.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(server.communicate(), 60)
    assert server.returncode == 0, err.decode()
    assert "model server on unix://" in err.decode() and not _connectable(path)


async def _metrics(path: str) -> str:
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path)) as http, \
            http.get("http://localhost/metrics") as response:
        return await response.text()


@pytest.mark.slow
async def test_the_livekit_example_job_uses_the_pool_server(served: Served, speech_two: Any,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_livekit_realtime import FIRST, frames_48k_stereo, run_agent_session

    spec = importlib.util.spec_from_file_location("livekit_agents_realtime", ROOT / "examples" / "livekit_agents_realtime.py")
    example = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(example)  # type: ignore[union-attr]
    monkeypatch.setenv("QWEN_OPENAI_URL", served.unix)
    monkeypatch.setenv("QWEN_OPENAI_API_KEY", TOKEN)
    proc = type("Proc", (), {"userdata": {}})()
    example.prewarm(proc)  # what livekit-agents runs in each job process
    model = proc.userdata["model"]
    done = served.metric("voice_agent_model_requests_total", outcome="done")
    forgotten = served.metric("voice_agent_model_conversations_forgotten_total", reason="deleted")
    await run_agent_session(model, example.build_agent(), frames_48k_stereo(speech_two.samples[:FIRST]),
                            lambda s: served.metric("voice_agent_model_requests_total", outcome="done") > done)
    runtime = await model.runtime()
    assert runtime.backend.name == "openai" and runtime.backend.model_name == "tiny-random"
    # The job's session ended with the AgentSession: its conversation was freed on the server.
    await until(lambda: served.metric("voice_agent_model_conversations_forgotten_total", reason="deleted") > forgotten)
    await model.aclose()


async def test_serve_model_settings_are_validated_and_the_cli_refuses_an_open_port(tmp_path: Path) -> None:
    from agent.config import ConfigError

    with pytest.raises(ConfigError, match="model_server.listen"):
        load_settings(None, model_server={"listen": "http://127.0.0.1:8000"})
    with pytest.raises(ConfigError, match="max_conversation"):
        load_settings(None, model_server={"max_conversation": 5})  # a typo is named, not ignored
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", "serve-model", "--listen", "tcp://0.0.0.0:0", "--max-queue", "4",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), GUARD)
    assert proc.returncode == 2 and "set a token" in err.decode() and "Traceback" not in err.decode()


async def test_input_audio_of_any_rate_and_channels_becomes_16k_mono() -> None:
    import io
    import wave

    from agent.server.model_wire import decode_audio

    t = np.arange(48000) / 48000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(48000)
        w.writeframes(np.repeat(tone[:, None], 2, axis=1).tobytes())
    samples = decode_audio(base64.b64encode(buf.getvalue()).decode(), "wav")
    assert samples.dtype == np.float32 and abs(samples.size - 16000) <= 64  # one second, at 16 kHz, mono
    assert 0.45 < float(np.abs(samples).max()) < 0.55  # channels averaged, not summed
    with pytest.raises(ValueError, match="base64"):
        decode_audio("not base64!", "wav")
    with pytest.raises(ValueError, match="WAV"):
        decode_audio(audio_base64(noise(0.1))[:40], "wav")
