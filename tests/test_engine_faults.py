"""Out of memory at every point of a step that allocates: one request fails at most, never the
batch or the engine, and no token is emitted twice (tiny-random, greedy)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from agent.inference import encoder, models
from agent.inference.engine import Engine, Output
from tests.test_engine import noise, request, run, sharpened, tokens, user
from tests.test_engine_scheduling import speculative

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def loaded() -> models.LoadedModel:
    return sharpened()


def inject_at(engine: Engine, monkeypatch: pytest.MonkeyPatch, fault: Callable[[str], None]) -> None:
    """Call `fault(name)` before each of the engine's device allocations (the store growing or
    shrinking, a row's KV copied out, embeddings, the audio encoder, the language model's
    forward): raising torch.OutOfMemoryError there is the device running out at that point."""
    def wrap(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            fault(name)
            return real(*args, **kwargs)
        return call

    store = engine._store
    for name in ("ensure", "shrink", "row_kv"):
        monkeypatch.setattr(store, name, wrap(name, getattr(store, name)))
    monkeypatch.setattr(engine, "_embed", wrap("embed", engine._embed))
    monkeypatch.setattr(engine, "_lm", wrap("lm", engine._lm))
    monkeypatch.setattr(encoder, "encode", wrap("encoder", encoder.encode))


def workload(engine: Engine, monkeypatch: pytest.MonkeyPatch, fault: Callable[[str], None]) -> dict[str, list[Output]]:
    """A cached history; then (injecting) a step where a history turn, a new session and a
    speculative prefill of a third arrive together, then the speculation's commit."""
    a1 = noise(1.0, 1)
    first = run(engine, {0: [("h1", request([user(0)], [a1], 5, session="h", turn="1"))]})["h1"]
    inject_at(engine, monkeypatch, fault)
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
    with pytest.MonkeyPatch.context() as mp:
        clean = workload(Engine(loaded, prefill_chunk_tokens=24), mp, clean_calls.append)
    expected = {rid: tokens(o) for rid, o in clean.items() if rid != "spec"}
    assert {"ensure", "row_kv", "embed", "encoder", "lm"} <= set(clean_calls)
    for at in range(1, len(clean_calls) + 1):
        calls: list[str] = []
        engine = Engine(loaded, prefill_chunk_tokens=24)
        with pytest.MonkeyPatch.context() as mp:
            outs = workload(engine, mp, injector(at, calls))
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
    with pytest.MonkeyPatch.context() as mp:
        inject_at(engine, mp, injector(1, calls))
        engine.cancel("a")  # copying its history runs out of memory: no history, still cancelled
    assert calls == ["row_kv"] and "a" not in engine._sessions
    outs = run(engine, {0: []})
    assert outs["a"][-1].error is not None and outs["a"][-1].error[0] == "cancelled"
    assert outs["b"][-1].finished and outs["b"][-1].error is None  # the other request goes on
