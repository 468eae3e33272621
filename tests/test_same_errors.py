"""The same faults give the same error codes in one process and through the model server (so
`error` events and `/metrics{code}` do not depend on `--processes`), and a wedged worker is
found by the step watchdog, its requests failed, and it is restarted."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from agent.config import load_settings
from agent.inference import models
from agent.inference.base import GenerationRequest, GenerationStats, InferenceError
from agent.inference.openai import OpenAIBackend
from agent.inference.pool import InferencePool
from agent.server.model_server import ModelServer
from tests.test_pool import req

pytestmark = pytest.mark.asyncio(loop_scope="module")


class FailingPool:
    """A pool whose every request fails with `code`, before or after its first token."""

    model_name = models.TINY_RANDOM
    queue_depth = 0
    healthy = True

    def __init__(self) -> None:
        self.code, self.after = "out_of_memory", 0

    async def generate(self, request: GenerationRequest, stats: GenerationStats | None = None) -> AsyncGenerator[str]:
        for _ in range(self.after):
            yield "tok "
        raise InferenceError(self.code, f"{self.code} injected")

    async def forget(self, session_id: str) -> None:
        pass


@dataclass
class Wire:
    server: ModelServer
    client: OpenAIBackend
    runner: web.AppRunner


async def _serve(pool: Any, tmp: Path) -> Wire:
    server = ModelServer(pool, load_settings(None, model="tiny-random"))
    runner = server.runner()
    await runner.setup()
    sock = str(tmp / "model.sock")
    await web.UnixSite(runner, sock).start()
    client = OpenAIBackend(f"unix://{sock}", models.TINY_RANDOM)
    await client.start()
    return Wire(server, client, runner)


async def _code(gen: AsyncIterator[str], fault: Any = None) -> str:
    """The code the generation fails with; `fault()` runs once its first token is in."""
    async with aclosing(gen) as deltas:  # type: ignore[type-var]
        try:
            async for _ in deltas:
                if fault is not None:
                    fault()
                    fault = None
        except InferenceError as exc:
            return exc.code
    raise AssertionError("the generation did not fail")


@pytest.mark.parametrize("after", [0, 2], ids=["before-the-answer", "mid-answer"])
@pytest.mark.parametrize("code", ["out_of_memory", "worker_died", "worker_stalled", "busy"])
async def test_the_pools_code_crosses_the_wire(tmp_path: Path, code: str, after: int) -> None:
    pool = FailingPool()
    pool.code, pool.after = code, after
    wire = await _serve(pool, tmp_path)
    try:
        assert await _code(pool.generate(req("s", 0.3, 1))) == code
        assert await _code(wire.client.generate(req("s", 0.3, 1))) == code  # HTTP error, or SSE error chunk
        assert wire.server.metrics.errors.labels(code)._value.get() == 1
    finally:
        await wire.client.close()
        await wire.runner.cleanup()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def real(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[InferencePool, Wire]]:
    pool = InferencePool(models.TINY_RANDOM, workers=1, max_batch=4, max_queue=8, step_timeout_s=3.0,
                         restart_backoff_s=(0.5, 2.0))
    await pool.start()
    wire = await _serve(pool, tmp_path_factory.mktemp("wire"))
    yield pool, wire
    await wire.client.close()
    await wire.runner.cleanup()
    await pool.close()


def _long(session: str) -> GenerationRequest:
    return req(session, 0.4, 3, max_new_tokens=300, min_new_tokens=300)  # EOS suppressed: still decoding


async def _healthy(pool: InferencePool) -> None:
    for _ in range(1800):
        if pool.healthy:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the worker did not come back")


@pytest.mark.slow
@pytest.mark.parametrize("sig, expected", [(signal.SIGKILL, "worker_died"), (signal.SIGSTOP, "worker_stalled")],
                         ids=["killed", "wedged"])
async def test_a_worker_fault_gives_one_code_in_both_modes(real: tuple[InferencePool, Wire], sig: int,
                                                           expected: str) -> None:
    """Killed mid-answer: `worker_died`; stopped mid-answer (alive, no progress): the watchdog
    fails it `worker_stalled` after `step_timeout_s` and restarts it. The same through the wire."""
    pool, wire = real
    codes = {}
    for mode, backend in (("one process", pool), ("model server", wire.client)):
        await _healthy(pool)
        restarts, stalls = pool.restarts, pool.stalls
        pid = pool._workers[0].process.pid
        codes[mode] = await asyncio.wait_for(_code(backend.generate(_long(f"{mode[0]}{sig}")),
                                                   lambda: os.kill(pid, sig)), 120)  # noqa: B023
        assert codes[mode] == expected, codes
        await _healthy(pool)  # replaced, and answering again
        assert pool.restarts == restarts + 1 and pool._workers[0].process.pid != pid
        assert pool.stalls == stalls + (sig == signal.SIGSTOP)
        assert "".join([d async for d in backend.generate(req(f"{mode[0]}-after", 0.3, 2, max_new_tokens=4))])
    assert codes == {"one process": expected, "model server": expected}
    assert wire.server.metrics.errors.labels(expected)._value.get() >= 1
