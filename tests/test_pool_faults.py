"""InferencePool under faults and load limits: real spawned tiny-random workers."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import pytest

from agent.config import load_settings
from agent.inference import models
from agent.inference.base import AudioRef, GenerationRequest, InferenceError
from agent.inference.pool import InferencePool
from agent.runtime import AgentRuntime
from tests.test_pool import collect, engine_text, noise, req
from tests.test_server import start_server, until

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _health(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(f"{url}/healthz") as r:
        return r.status, (await r.json())["status"]


@pytest.mark.slow
async def test_double_fault_restarts_with_backoff_and_reports_health() -> None:
    """The worker is killed, then its replacement while it loads: waiting turns get errors,
    /healthz says unavailable while there is no worker, and the pool recovers on its own."""
    pool = InferencePool(models.TINY_RANDOM, workers=1, max_batch=4, max_queue=8, restart_backoff_s=(3.0, 10.0))
    runtime = AgentRuntime(load_settings(None, model="tiny-random"), backend=pool)
    await runtime.start()
    server = await start_server(runtime)
    try:
        async with aiohttp.ClientSession() as http:
            assert await _health(http, server.url) == (200, "ok")
            assert pool.healthy and pool.kv_budget_tokens and pool.kv_budget_tokens > 0
            os.kill(pool._workers[0].process.pid, signal.SIGKILL)
            await until(lambda: pool.restarts == 1)  # the first replacement starts at once
            assert not pool.healthy and await _health(http, server.url) == (503, "unavailable")
            loading = pool._workers[0]
            assert not loading.live
            waiting = asyncio.ensure_future(collect(pool.generate(req("a", 0.6, 1, 6))))
            await asyncio.sleep(0.2)
            assert pool.queue_depth == 1  # it waits for the worker that is loading
            os.kill(loading.process.pid, signal.SIGKILL)  # the replacement dies before it loaded
            with pytest.raises(InferenceError) as died:
                await asyncio.wait_for(waiting, 15)
            assert died.value.code == "worker_died"
            # backing off: no worker at all, a new turn is refused at once, not left waiting
            with pytest.raises(InferenceError) as refused:
                await collect(pool.generate(req("b", 0.6, 2, 6)))
            assert refused.value.code == "backend_unavailable" and "next restart in" in refused.value.message
            assert pool.queue_depth == 0 and await _health(http, server.url) == (503, "unavailable")
            await until(lambda: pool.healthy, timeout=180)  # recovers by itself
            assert pool.restarts == 2 and await _health(http, server.url) == (200, "ok")
            assert await collect(pool.generate(req("b", 0.6, 3, 6)))
    finally:
        await server.runner.cleanup()
        await runtime.close()


@pytest.fixture(scope="module")
async def pool() -> AsyncIterator[InferencePool]:
    p = InferencePool(models.TINY_RANDOM, workers=1, max_batch=4, max_queue=2)
    p.engine_options["feature_cache_bytes"] = 0  # a dropped history cannot be rebuilt from cached features
    await p.start()
    yield p
    await p.close()


async def test_speculative_prefills_are_bounded_like_requests(pool: InferencePool) -> None:
    await pool.prefill(req("s", 1.0, 10, 8, turn="1"))
    await pool.prefill(req("s", 1.2, 11, 8, turn="2"))  # the newer replaces the older
    assert len(pool._specs) == 1
    final = "".join(await collect(pool.generate(req("s", 1.2, 11, 8, turn="2"))))
    assert final and len(pool._specs) == 0
    long = [pool.generate(req(f"o{i}", 0.6, 20 + i, 200, min_new_tokens=200)) for i in range(2)]
    assert [await it.__anext__() for it in long] and pool.queue_depth == 2  # = max_queue
    await pool.prefill(req("t", 1.0, 12, 8, turn="1"))  # no room: skipped, and counted
    assert pool.speculative_skipped == 1 and len(pool._specs) == 0
    for it in long:
        await it.aclose()
    await pool.prefill(req("t", 1.0, 12, 8, turn="1"))
    assert len(pool._specs) == 1


async def test_kv_budget_comes_from_the_worker(pool: InferencePool) -> None:
    per_token = 2 * 4 * 16 * 2 * 4  # tiny-random in fp32
    assert pool.kv_budget_bytes == pool.kv_budget_tokens * per_token  # type: ignore[operator]
    assert await collect(pool.generate(req("k", 0.6, 30, 4)))
    assert pool.kv_used_tokens is not None and pool.kv_used_tokens >= 0


async def test_history_audio_goes_by_reference_and_is_resent_when_gone(pool: InferencePool,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[Any] = []
    original = pool._send
    monkeypatch.setattr(pool, "_send", lambda w, msg: (sent.append(msg), original(w, msg))[1])
    a1, a2, a3 = noise(1.0, 40), noise(0.8, 41), noise(0.6, 42)
    messages: list[dict[str, Any]] = [{"role": "user", "content": [{"type": "audio", "audio": 0}]}]
    answer = "".join(await collect(pool.generate(GenerationRequest("ref", "1", messages, [a1], 6))))
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": [{"type": "audio", "audio": 1}]}]
    assert "".join(await collect(pool.generate(GenerationRequest("ref", "2", messages, [a1, a2], 6))))
    second = sent[-1][2]
    assert isinstance(second.audios[0], AudioRef) and isinstance(second.audios[1], np.ndarray)  # only the new clip
    assert second.audios[0].samples == a1.size and pool.audio_resends == 0
    # the worker loses the session's history behind the pool's back (as an eviction would)
    pool._send(pool._workers[0], ("forget", "ref"))
    messages += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": [{"type": "audio", "audio": 2}]}]
    third = GenerationRequest("ref", "3", messages, [a1, a2, a3], 6)
    text = "".join(await collect(pool.generate(third)))
    assert pool.audio_resends == 1 and all(isinstance(a, np.ndarray) for a in sent[-1][2].audios)
    assert text == engine_text(third)  # sent again whole, answered as a cold engine would
