"""Out of memory at every point of a step that allocates: one request fails at most, never the
batch or the engine, and no token is emitted twice (tiny-random, greedy)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from agent.inference import models
from agent.inference.engine import Engine, Output
from tests.test_engine import noise, request, run, sharpened, tokens, user
from tests.test_engine_scheduling import speculative

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def loaded() -> models.LoadedModel:
    return sharpened()


def workload(engine: Engine, inject: Callable[[str], None]) -> dict[str, list[Output]]:
    """A cached history; then (injecting) a step where a history turn, a new session and a
    speculative prefill of a third arrive together, then the speculation's commit."""
    a1 = noise(1.0, 1)
    first = run(engine, {0: [("h1", request([user(0)], [a1], 5, session="h", turn="1"))]})["h1"]
    engine.inject = inject
    turn2 = request([user(0), {"role": "assistant", "content": "".join(o.text for o in first)}, user(1)],
                    [a1, noise(0.6, 2)], 6, session="h", turn="2", min_new_tokens=6)
    fresh = request([user(0, "hi")], [noise(0.8, 3)], 6, session="n", turn="1", min_new_tokens=6)
    final = request([user(0)], [noise(0.7, 4)], 4, session="p", turn="1", min_new_tokens=4)
    outs = run(engine, {0: [("h2", turn2), ("n1", fresh), ("spec", speculative(final))], 12: [("p1", final)]})
    outs["h1"] = first
    return outs


def injector(at: int, calls: list[str]) -> Callable[[str], None]:
    def inject(where: str) -> None:
        calls.append(where)
        if len(calls) == at:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected at {where})")
    return inject


def test_oom_at_every_allocation_point_fails_one_request_at_most(loaded: models.LoadedModel) -> None:
    clean_calls: list[str] = []
    clean = workload(Engine(loaded, prefill_chunk_tokens=24), clean_calls.append)
    expected = {rid: tokens(o) for rid, o in clean.items() if rid != "spec"}
    assert {"grow", "embed", "encoder", "prefill", "decode", "history", "hold"} <= set(clean_calls)
    for at in range(1, len(clean_calls) + 1):
        calls: list[str] = []
        engine = Engine(loaded, prefill_chunk_tokens=24)
        outs = workload(engine, injector(at, calls))
        where = calls[at - 1]
        failed = [rid for rid, o in outs.items() if o[-1].error is not None]
        assert len(failed) <= 1, (at, where, failed)
        for rid, want in expected.items():
            got = tokens(outs[rid])
            if rid in failed:
                assert outs[rid][-1].error[0] == "out_of_memory", (at, where, outs[rid][-1].error)  # type: ignore[index]
                assert got == want[:len(got)], (at, where, rid)  # what it said stands, nothing twice
            else:
                assert got == want, (at, where, rid)
        assert not engine.has_work and engine.running == 0


def test_oom_while_cancelling_keeps_the_engine(loaded: models.LoadedModel) -> None:
    engine = Engine(loaded)
    a = request([user(0)], [noise(1.0, 10)], 20, session="a", min_new_tokens=20)
    b = request([user(0)], [noise(0.9, 11)], 8, session="b", min_new_tokens=8)
    engine.submit("a", a)
    engine.submit("b", b)
    while engine.running < 2:
        engine.step()
    calls: list[str] = []
    engine.inject = injector(1, calls)
    engine.cancel("a")  # copying its history runs out of memory: no history, still cancelled
    engine.inject = None
    assert calls == ["history"] and "a" not in engine._sessions
    outs = run(engine, {0: []})
    assert outs["a"][-1].error is not None and outs["a"][-1].error[0] == "cancelled"
    assert outs["b"][-1].finished and outs["b"][-1].error is None  # the other request goes on
