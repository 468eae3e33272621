"""InferencePool: real spawned worker processes running the engine on tiny-random."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from agent.inference import models
from agent.inference.base import GenerationRequest, GenerationStats, InferenceError
from agent.inference.engine import Engine
from agent.inference.pool import InferencePool

torch.set_num_threads(1)
pytestmark = pytest.mark.asyncio(loop_scope="session")  # the fixture loop: the pool routes to it


def noise(seconds: float, seed: int) -> np.ndarray:
    return (np.random.RandomState(seed).randn(int(16000 * seconds)) * 0.1).astype(np.float32)


def req(session: str, seconds: float, seed: int, max_new_tokens: int = 16, turn: str = "1",
        text: str | None = None, **extra: Any) -> GenerationRequest:
    parts: list[dict[str, Any]] = [{"type": "audio", "audio": 0}]
    if text:
        parts.append({"type": "text", "text": text})
    return GenerationRequest(session, turn, [{"role": "user", "content": parts}], [noise(seconds, seed)],
                             max_new_tokens, extra=extra)


def engine_text(r: GenerationRequest) -> str:
    """The same request alone through an in-process engine: the unbatched reference."""
    engine = Engine(models.load(models.TINY_RANDOM))
    engine.submit("x", r)
    text = ""
    while engine.has_work:
        text += "".join(o.text for o in engine.step())
    return text


async def collect(it: AsyncIterator[str]) -> list[str]:
    return [d async for d in it]


@pytest.fixture(scope="module")
async def pool() -> AsyncIterator[InferencePool]:
    p = InferencePool(models.TINY_RANDOM, workers=2, max_batch=8, max_queue=16)
    await p.start()
    yield p
    procs = [w.process for w in p._workers]
    await p.close()
    assert all(not proc.is_alive() and proc.exitcode is not None for proc in procs)  # nothing leaked


async def test_concurrent_sessions_stream_like_engine(pool: InferencePool) -> None:
    assert pool.name == "local" and pool.model_name == models.TINY_RANDOM
    assert pool.warning == models.TINY_WARNING
    reqs = [req(f"s{i}", 0.5 + 0.4 * i, i, max_new_tokens=10 + 3 * i, text="hi" if i % 2 else None)
            for i in range(5)]
    stats = [GenerationStats() for _ in reqs]
    results = await asyncio.gather(*(collect(pool.generate(r, s)) for r, s in zip(reqs, stats, strict=True)))
    for r, deltas, st in zip(reqs, results, stats, strict=True):
        assert len(deltas) > 1  # streamed, not one blob
        assert "".join(deltas) == engine_text(r)
        assert st.tokens > 0 and st.prompt_tokens > 0 and "ttft" in st.timings
    assert pool.queue_depth == 0


async def test_the_agent_process_counts_with_the_model_tokenizer(pool: InferencePool, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """Sessions budget their prompts with the worker model's own tokenizer, loaded from disk."""
    text = "<|im_start|>user\nTurn on the kitchen light, then dim it to 40 %.<|im_end|>\n"
    reference = models.load(models.TINY_RANDOM).processor.tokenizer
    assert pool.tokenizer is not None
    assert pool.tokenizer(text)["input_ids"] == reference(text)["input_ids"]
    assert pool.family is not None and pool.family.name == "qwen2-audio"  # as its workers report it
    assert all(w.info["family"] == "qwen2-audio" for w in pool._workers)
    # No tokenizer files: bytes are counted (a safe over-estimate), and the log says why.
    assert models.load_tokenizer(str(tmp_path)) is None
    assert models.load_tokenizer("Qwen/Qwen2-Audio-7B-Instruct" + "-not-downloaded") is None
    assert "counted as bytes" in caplog.text


async def test_cancel_mid_stream(pool: InferencePool) -> None:
    stats = GenerationStats()
    it = pool.generate(req("c", 1.0, 20, max_new_tokens=400, min_new_tokens=400), stats)
    got = [await it.__anext__() for _ in range(3)]
    assert pool.queue_depth == 1
    await it.aclose()  # closing early cancels in the worker
    assert pool.queue_depth == 0 and len(got) == 3 and stats.tokens == 0
    assert await collect(pool.generate(req("c", 0.6, 21, max_new_tokens=5, turn="2")))


async def test_bad_request_does_not_hurt_pool(pool: InferencePool) -> None:
    bad = GenerationRequest("b", "1", [{"role": "user", "content": [{"type": "audio", "audio": 0}]}],
                            [np.zeros(0, np.float32)])
    with pytest.raises(InferenceError) as err:
        await collect(pool.generate(bad))
    assert err.value.code == "bad_request" and "empty" in err.value.message
    assert await collect(pool.generate(req("b", 0.6, 22, max_new_tokens=5)))


async def test_busy_under_overload(pool: InferencePool) -> None:
    pool.max_queue = 2
    try:
        long = [req(f"o{i}", 0.5, 30 + i, max_new_tokens=60, min_new_tokens=60) for i in range(6)]
        results = await asyncio.gather(*(collect(pool.generate(r)) for r in long), return_exceptions=True)
    finally:
        pool.max_queue = 16
    busy = [r for r in results if isinstance(r, InferenceError) and r.code == "busy"]
    assert len(busy) == 4 and "max_queue=2" in busy[0].message
    assert all(isinstance(r, list) and r for r in results if r not in busy)


@pytest.mark.slow
async def test_speculative_prefill_through_pool(pool: InferencePool) -> None:
    r = req("sp", 1.0, 40, max_new_tokens=12, turn="9")
    await pool.prefill(r)
    stats = GenerationStats()
    text = "".join(await collect(pool.generate(r, stats)))
    assert text == engine_text(r)
    await pool.drop("sp", "9")
    await pool.forget("sp")


@pytest.mark.slow
async def test_killed_worker_is_replaced(pool: InferencePool) -> None:
    victim_req = req("victim", 1.0, 50, max_new_tokens=2000, min_new_tokens=2000)
    other_req = req("other", 1.0, 51, max_new_tokens=300, min_new_tokens=300)
    victim = pool.generate(victim_req)
    await victim.__anext__()  # mid-turn
    other_task = asyncio.ensure_future(collect(pool.generate(other_req)))
    await asyncio.sleep(0.05)
    pid = pool._workers[pool._sessions["victim"]].process.pid
    assert pool._sessions["other"] != pool._sessions["victim"]  # spread over both workers
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(InferenceError) as err:
        await collect(victim)
    assert err.value.code == "worker_died"
    assert "".join(await other_task) == engine_text(other_req)  # the other worker went on
    assert pool.restarts == 1 and pid not in [w.process.pid for w in pool._workers]
    # the same session goes on, on the restarted worker
    text = "".join(await asyncio.wait_for(collect(pool.generate(req("victim", 0.6, 52, 8, turn="2"))), 120))
    assert text


@pytest.mark.slow
async def test_bad_model_fails_start(tmp_path: Path) -> None:
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    missing = InferencePool(str(tmp_path / "does-not-exist"), workers=1)
    not_audio = InferencePool(str(tmp_path / "bert"), workers=1)
    errors = await asyncio.gather(missing.start(), not_audio.start(), return_exceptions=True)
    assert all(isinstance(e, InferenceError) and e.code == "model_load" for e in errors), errors
    assert "does-not-exist" in errors[0].message  # type: ignore[union-attr]
    assert "not a Qwen2-Audio model" in errors[1].message  # type: ignore[union-attr]
    assert not missing._workers and not not_audio._workers


@pytest.mark.slow
async def test_preemptive_answers_through_pool(pool: InferencePool) -> None:
    """A newer preemptive answer of a session replaces the older one (cancelled); promoted, it
    streams like a committed turn."""
    first = req("pre", 1.0, 60, max_new_tokens=2000, min_new_tokens=2000, turn="1")
    second = req("pre", 1.1, 61, max_new_tokens=12, turn="2")
    first.preemptive = second.preemptive = True
    it = pool.generate(first)
    await it.__anext__()  # it is decoding
    newer = asyncio.create_task(collect(pool.generate(second)))
    with pytest.raises(InferenceError) as err:
        await collect(it)
    assert err.value.code == "cancelled"
    await pool.promote("pre", "2")
    assert "".join(await newer) == engine_text(second)
    await pool.forget("pre")
