"""KV budget from memory figures, out-of-memory handling and prefill scheduling (tiny-random)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from agent.inference import memory, models
from agent.inference.engine import Engine, Output
from tests.test_engine import noise, reference, request, run, sharpened, tokens, user

torch.set_num_threads(1)
MIB, GIB = 1024**2, 1024**3


@pytest.fixture(scope="module")
def loaded() -> models.LoadedModel:
    return sharpened()


# ---- the budget ------------------------------------------------------------------------

def test_budget_from_an_injected_ram_figure(loaded: models.LoadedModel) -> None:
    per_token = 2 * 4 * 16 * 2 * 4  # tiny-random: 2 layers × 4 KV heads × 16 × (K, V) × fp32
    assert Engine(loaded, memory_info=(64 * GIB, 128 * GIB)).budget.bytes_per_token == per_token
    assert Engine(loaded, memory_info=(64 * GIB, 128 * GIB)).kv_budget_tokens == memory.CPU_DEFAULT_BYTES // per_token
    # half of 8 MiB available holds 4096 tokens of 1 KiB: less than the default
    assert Engine(loaded, memory_info=(8 * MIB, 128 * GIB)).kv_budget_tokens == 4096
    assert Engine(loaded, kv_budget_tokens=2000, memory_info=(8 * MIB, 128 * GIB)).kv_budget_tokens == 2000
    with pytest.raises(memory.KVBudgetError) as err:
        Engine(loaded, memory_info=(1 * MIB, 128 * GIB))
    assert "1024 are needed" in str(err.value) and "0.00 GiB of RAM available" in str(err.value)


def test_7b_on_gpus_of_several_sizes() -> None:
    cfg = models._config(models.build_processor(), "7b").text_config
    per_token = memory.bytes_per_token(cfg, 2)
    assert per_token == 512 * 1024  # 32 layers × 32 KV heads × 128 × 2 × bf16 = 0.5 MiB
    weights = int(16.8e9)

    def gpu(total_gib: float, util: float = 0.9) -> memory.KVBudget:
        total = int(total_gib * GIB)
        return memory.plan(per_token=per_token, device="cuda:0", free=total - weights - 500 * MIB, total=total,
                           utilization=util, reserve=2 * GIB)

    h200 = gpu(139.8)
    assert h200.tokens >= 64 * (2048 + 256)  # 64 sessions with 2k tokens of history and an answer
    assert "kv budget:" in h200.describe() and "GiB) on cuda:0" in h200.describe()
    assert gpu(80).tokens < h200.tokens
    assert gpu(139.8, util=40 * GIB).tokens < gpu(139.8).tokens  # bytes, not a fraction
    assert 1024 < gpu(24).tokens < 64 * 2048  # a 24 GB card: ~6k tokens, not 64 long sessions


def test_no_room_fails_with_figures() -> None:
    cfg = models._config(models.build_processor(), "7b").text_config
    per_token = memory.bytes_per_token(cfg, 2)
    total = 24 * GIB
    with pytest.raises(memory.KVBudgetError) as err:
        memory.plan(per_token=per_token, device="cuda:0", free=total - int(16.8e9) - 500 * MIB, total=total,
                    utilization=0.7, reserve=2 * GIB)
    message = str(err.value)
    for figure in ("24.00 GiB", "16.80 GiB", "gpu_memory_utilization=0.7", "0.50 MiB each", "at least 1024"):
        assert figure in message, (figure, message)


# ---- what the budget counts ------------------------------------------------------------

def test_speculative_prefill_caches_count_and_give_way(loaded: models.LoadedModel) -> None:
    probe = Engine(loaded)
    a = request([user(0)], [noise(1.0, 1)], 6, session="a", turn="1")
    n = len(probe.build_prompt(a).ids)
    engine = Engine(loaded, kv_budget_tokens=(n + 6) * 3 // 2 + n // 2)
    spec = request([user(0)], [noise(1.0, 2)], 6, session="b", turn="1")
    spec.speculative = True
    run(engine, {0: [("spec", spec)]})
    # the speculative prefill is counted, beside the capacity the empty store keeps for the next turn
    assert engine.stats()["prefilled"] == 1 and engine.kv_projected() == n + engine._store.allocated_tokens
    out = run(engine, {0: [("a", a)]})
    assert out["a"][-1].error is None and tokens(out["a"]) == reference(loaded, a, sorted(engine.eos_ids))
    assert engine.stats()["prefilled"] == 0  # it gave way to the committed turn


def test_a_request_that_cannot_fit_fails_alone(loaded: models.LoadedModel) -> None:
    short = request([user(0)], [noise(0.5, 3)], 5, session="s")
    huge = request([user(0)], [noise(20.0, 4)], 5, session="h")
    engine = Engine(loaded, kv_budget_tokens=300)
    outs = run(engine, {0: [("huge", huge), ("short", short)]})
    err = outs["huge"][-1].exception()
    assert err is not None and err.code == "out_of_memory" and "budget is 300" in err.message
    assert tokens(outs["short"]) == reference(loaded, short, sorted(engine.eos_ids))


def test_requests_wait_for_memory_rather_than_fail(loaded: models.LoadedModel) -> None:
    reqs = {f"r{i}": request([user(0)], [noise(1.0, 10 + i)], 8, session=f"s{i}") for i in range(3)}
    n = len(Engine(loaded).build_prompt(reqs["r0"]).ids)
    engine = Engine(loaded, kv_budget_tokens=2 * (n + 8) * 3 // 2)  # two rows at a time
    outs = run(engine, {0: list(reqs.items())})
    for rid, req in reqs.items():
        assert tokens(outs[rid]) == reference(loaded, req, sorted(engine.eos_ids)), rid
    assert outs["r2"][-1].stats is not None and outs["r2"][-1].stats.timings["queue"] > 0


# ---- out of memory ---------------------------------------------------------------------

def _oom_when(monkeypatch: pytest.MonkeyPatch, engine: Engine, fail: Any) -> list[int]:
    """The second decoder layer raises a CUDA-style OOM when `fail(hidden_states, call)` says
    so: the first layer has already extended the cache, so a retry must roll it back."""
    layer = engine._lm.layers[1]
    original, calls = layer.forward, [0]

    def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if fail(hidden_states, calls[0]):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(hidden_states, *args, **kwargs)

    monkeypatch.setattr(layer, "forward", forward)
    return calls


def test_oom_in_decode_frees_history_and_retries(loaded: models.LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(loaded)
    run(engine, {0: [("old", request([user(0)], [noise(0.6, 20)], 4, session="old"))]})
    assert engine.cached_tokens > 0
    reqs = {"a": request([user(0)], [noise(1.0, 21)], 12, session="a"),
            "b": request([user(0, "hi")], [noise(0.7, 22)], 12, session="b")}
    _oom_when(monkeypatch, engine, lambda h, call: call == 6)  # once, mid-stream
    outs = run(engine, {0: list(reqs.items())})
    assert engine.oom_events == 1 and "old" not in engine._sessions  # history freed, step retried
    for rid, req in reqs.items():
        assert outs[rid][-1].error is None
        assert tokens(outs[rid]) == reference(loaded, req, sorted(engine.eos_ids)), rid


def test_oom_that_persists_fails_one_request_not_the_batch(loaded: models.LoadedModel,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(loaded)
    reqs = {f"r{i}": request([user(0)], [noise(0.8, 30 + i)], 10, session=f"s{i}", min_new_tokens=10)
            for i in range(3)}
    _oom_when(monkeypatch, engine, lambda h, call: h.shape[0] >= 3)  # never room for a batch of 3
    outs = run(engine, {0: [("r0", reqs["r0"]), ("r1", reqs["r1"])], 2: [("r2", reqs["r2"])]})
    err = outs["r2"][-1].exception()
    assert err is not None and err.code == "out_of_memory"  # the newest request
    for rid in ("r0", "r1"):
        assert tokens(outs[rid]) == reference(loaded, reqs[rid], sorted(engine.eos_ids)), rid


def test_oom_in_a_prefill_fails_only_that_request(loaded: models.LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(loaded)
    long = request([user(0)], [noise(8.0, 40)], 6, session="long")
    short = request([user(0)], [noise(0.6, 41)], 6, session="short")
    _oom_when(monkeypatch, engine, lambda h, call: h.shape[1] > 100)  # long prompts never fit
    outs = run(engine, {0: [("long", long), ("short", short)]})
    err = outs["long"][-1].exception()
    assert err is not None and err.code == "out_of_memory" and "prefill" in err.message
    assert tokens(outs["short"]) == reference(loaded, short, sorted(engine.eos_ids))
    assert engine.stats()["pending"] == 0 and engine.running == 0


# ---- scheduling ------------------------------------------------------------------------

def record_chunks(engine: Engine, chunks: list[int]) -> None:
    """Every prefill chunk's size, as the engine's forwards run them."""
    original = engine._forward_prefill

    def forward(group: list[tuple[Any, int]]) -> Any:
        chunks.extend(n for _, n in group)
        return original(group)

    engine._forward_prefill = forward  # type: ignore[method-assign]


def test_chunked_prefill_never_stalls_a_running_stream(loaded: models.LoadedModel) -> None:
    engine = Engine(loaded, prefill_chunk_tokens=32)
    stream = request([user(0)], [noise(0.6, 50)], 60, session="stream", min_new_tokens=60)
    long = request([user(0, "and this?")], [noise(12.0, 51)], 8, session="long")
    engine.submit("stream", stream)
    outs: dict[str, list[Output]] = {}
    while not engine.running:  # the stream is decoding
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    chunks: list[int] = []
    record_chunks(engine, chunks)
    engine.submit("long", long)
    steps_with_prefill = 0
    while engine.has_work:
        before = len(chunks)
        step = engine.step()
        for o in step:
            outs.setdefault(o.request_id, []).append(o)
        if not any(o.request_id == "stream" and o.finished for o in step) and engine.running:
            # every step that prefills also decodes one token of the running stream
            assert sum(1 for o in step if o.request_id == "stream") == 1
        steps_with_prefill += len(chunks) > before
    assert max(chunks) <= 32 and steps_with_prefill >= 10  # 300+ prompt tokens in ≤32-token chunks
    assert tokens(outs["long"]) == reference(loaded, long, sorted(engine.eos_ids))
    assert tokens(outs["stream"]) == reference(loaded, stream, sorted(engine.eos_ids))


def test_one_speculative_prefill_per_session(loaded: models.LoadedModel) -> None:
    engine = Engine(loaded)
    audio = noise(1.2, 60)
    first = request([user(0)], [noise(0.8, 61)], 8, session="s", turn="t1")
    newer = request([user(0)], [audio], 8, session="s", turn="t2")
    first.speculative = newer.speculative = True
    run(engine, {0: [("spec1", first)]})
    engine.submit("spec2", newer)  # replaces the prefilled one at once
    assert engine.stats()["prefilled"] == 0
    run(engine, {0: []})
    assert list(engine._prefilled) == ["spec2"]
    final = request([user(0)], [audio], 8, session="s", turn="t2")
    out = run(engine, {0: [("final", final)]})["final"]
    assert out[-1].stats is not None and out[-1].stats.reused_tokens == out[-1].stats.prompt_tokens
    assert tokens(out) == reference(loaded, final, sorted(engine.eos_ids))


def test_commit_takes_over_a_speculative_prefill_in_progress(loaded: models.LoadedModel) -> None:
    engine = Engine(loaded, prefill_chunk_tokens=16)
    audio = noise(3.0, 70)
    spec = request([user(0)], [audio], 8, session="s", turn="t1")
    spec.speculative = True
    chunks: list[int] = []
    record_chunks(engine, chunks)
    engine.submit("spec", spec)
    engine.step()
    engine.step()
    assert engine.stats()["prefilled"] == 0 and engine.stats()["pending"] == 1  # still prefilling
    final = request([user(0)], [audio], 8, session="s", turn="t1")
    out = run(engine, {0: [("final", final)]})
    assert "spec" not in out and sum(chunks) == len(engine.build_prompt(final).ids)  # prefilled once
    assert tokens(out["final"]) == reference(loaded, final, sorted(engine.eos_ids))
