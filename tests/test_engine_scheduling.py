"""The engine's priorities: committed work, preemptive answers, speculative prefills, the
sessions' cached history they share, and the KV store they run in (tiny-random, greedy)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from agent.inference import memory, models
from agent.inference.base import GenerationRequest
from agent.inference.engine import Engine, Output
from tests.test_engine import noise, reference, request, run, sharpened, tokens, user

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def loaded() -> models.LoadedModel:
    return sharpened()


def second_turn(engine: Engine, session: str = "s") -> tuple[GenerationRequest, int]:
    """Turn 1 of a session answered and cached; turn 2's request and the history's size."""
    a1 = noise(2.0, 1)
    turn1 = request([user(0)], [a1], 12, session=session, turn="1", min_new_tokens=12)
    out = run(engine, {0: [(f"{session}-1", turn1)]})[f"{session}-1"]
    msgs = [user(0), {"role": "assistant", "content": "".join(o.text for o in out)}, user(1)]
    return request(msgs, [a1, noise(1.0, 2)], 6, session=session, turn="2"), engine.cached_tokens


def speculative(req: GenerationRequest, **changes: Any) -> GenerationRequest:
    spec = GenerationRequest(req.session_id, req.turn_id, req.messages, list(req.audios), req.max_new_tokens,
                             speculative=True, extra=dict(req.extra))
    for k, v in changes.items():
        setattr(spec, k, v)
    return spec


def test_history_survives_a_dropped_or_replaced_speculation(loaded: models.LoadedModel) -> None:
    """Regression: a speculative prefill used to take the session's history and lose it when
    dropped; the committed turn then re-prefilled everything (reused 0 of 124 tokens)."""
    for how in ("none", "dropped-prefilled", "dropped-mid-prefill", "replaced"):
        engine = Engine(loaded, prefill_chunk_tokens=16 if how == "dropped-mid-prefill" else 512)
        turn2, history = second_turn(engine)
        assert history > 100
        if how == "dropped-prefilled":
            run(engine, {0: [("spec", speculative(turn2))]})
            assert engine.stats()["prefilled"] == 1
            engine.drop_turn("s", "2")
        elif how == "dropped-mid-prefill":
            engine.submit("spec", speculative(turn2))
            engine.step()
            engine.step()
            assert engine.stats()["pending"] == 1 and engine.stats()["prefilled"] == 0  # chunks of it ran, not all
            engine.drop_turn("s", "2")
        elif how == "replaced":  # speech resumed: a newer speculation, then a different commit
            run(engine, {0: [("spec", speculative(turn2))]})
            run(engine, {0: [("spec2", speculative(turn2, audios=[turn2.audios[0], noise(1.5, 3)]))]})
            turn2 = request(turn2.messages, [turn2.audios[0], noise(1.2, 4)], 6, session="s", turn="2")
        out = run(engine, {0: [("t2", turn2)]})["t2"]
        assert out[-1].error is None and out[-1].stats is not None
        assert out[-1].stats.reused_tokens >= history - 1, how  # all of it (its last token is re-fed)


def test_preemptive_answers_wait_below_committed_work(loaded: models.LoadedModel) -> None:
    engine = Engine(loaded, max_batch=1)
    pre = request([user(0)], [noise(1.0, 10)], 6, session="p", turn="1", min_new_tokens=6)
    pre.preemptive = True
    committed = request([user(0)], [noise(1.0, 11)], 6, session="c", turn="1", min_new_tokens=6)
    order: list[str] = []
    engine.submit("pre", pre)
    engine.submit("c", committed)  # submitted after it, admitted before it
    outs: dict[str, list[Output]] = {}
    while engine.has_work:
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
            if o.token_ids and o.request_id not in order:
                order.append(o.request_id)
    assert order == ["c", "pre"]
    for rid, req in (("pre", pre), ("c", committed)):
        assert tokens(outs[rid]) == reference(loaded, req, sorted(engine.eos_ids)), rid


def test_a_decoding_preemptive_answer_is_parked_for_committed_work(loaded: models.LoadedModel) -> None:
    engine = Engine(loaded, max_batch=1)
    pre = request([user(0)], [noise(1.0, 12)], 14, session="p", turn="1", min_new_tokens=14)
    pre.preemptive = True
    committed = request([user(0, "hi")], [noise(0.8, 13)], 5, session="c", turn="1", min_new_tokens=5)
    outs = run(engine, {0: [("pre", pre)], 4: [("c", committed)]})
    # the committed answer ran to its end while the preemptive one waited, then it resumed
    first_c, last_c = _order.index("c"), len(_order) - 1 - _order[::-1].index("c")
    assert _order.index("pre") < first_c and "pre" not in _order[first_c:last_c] and "pre" in _order[last_c:]
    assert tokens(outs["pre"]) == reference(loaded, pre, sorted(engine.eos_ids))  # resumed exactly
    assert tokens(outs["c"]) == reference(loaded, committed, sorted(engine.eos_ids))


_order: list[str] = []  # request ids of the outputs with tokens, in the order emitted


@pytest.fixture(autouse=True)
def _record_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every output's request id in the order the engine emitted it (for `_timeline`)."""
    _order.clear()
    original = Engine.step

    def step(self: Engine) -> list[Output]:
        outs = original(self)
        _order.extend(o.request_id for o in outs if o.token_ids)
        return outs

    monkeypatch.setattr(Engine, "step", step)


def test_promote_lifts_a_preemptive_answer_and_one_per_session(loaded: models.LoadedModel) -> None:
    engine = Engine(loaded, max_batch=1)
    blocker = request([user(0)], [noise(0.8, 20)], 6, session="b", turn="1", min_new_tokens=6)
    older = request([user(0)], [noise(1.0, 21)], 6, session="p", turn="1")
    older.preemptive = True
    newer = request([user(0)], [noise(1.1, 22)], 6, session="p", turn="2", min_new_tokens=6)
    newer.preemptive = True
    other = request([user(0)], [noise(0.9, 23)], 6, session="q", turn="1", min_new_tokens=6)
    other.preemptive = True
    engine.submit("blocker", blocker)
    engine.step()  # the batch is full
    engine.submit("older", older)
    engine.submit("newer", newer)  # replaces the older answer of the same session
    engine.submit("other", other)
    engine.submit("c", request([user(0)], [noise(0.7, 24)], 4, session="c", turn="1", min_new_tokens=4))
    engine.promote("p", "2")  # its turn committed: ahead of the later committed one
    outs = run(engine, {0: []})
    assert outs["older"][-1].error is not None and outs["older"][-1].error[0] == "cancelled"
    order = [r for r in _order if r != "blocker"]
    assert order.index("newer") < order.index("c") < order.index("other")
    assert tokens(outs["newer"]) == reference(loaded, newer, sorted(engine.eos_ids))


def test_preemptive_and_speculative_work_never_evict_other_sessions(loaded: models.LoadedModel) -> None:
    probe = Engine(loaded)
    x = request([user(0)], [noise(1.0, 30)], 5, session="x")
    n = len(probe.build_prompt(x).ids)
    engine = Engine(loaded, kv_budget_tokens=(n + 5) * 3 // 2 + 10)  # x's history or one request
    run(engine, {0: [("x", x)]})
    cached = engine.cached_tokens
    pre = request([user(0)], [noise(1.0, 31)], 5, session="y", turn="1")
    pre.preemptive = True
    spec = speculative(request([user(0)], [noise(1.0, 32)], 5, session="z", turn="1"))
    engine.submit("pre", pre)
    engine.submit("spec", spec)
    for _ in range(5):
        engine.step()
    assert engine.cached_tokens == cached and list(engine._sessions) == ["x"]  # x keeps its history
    assert engine.stats()["pending"] == 2  # they wait
    engine.promote("y", "1")  # committed now: it may evict
    engine.drop_turn("z", "1")  # its turn never committed
    outs = run(engine, {0: []})
    assert list(engine._sessions) == ["y"] and outs["pre"][-1].error is None


def test_speculative_prefills_count_against_max_batch(loaded: models.LoadedModel) -> None:
    engine = Engine(loaded, max_batch=2, prefill_chunk_tokens=8)
    for i in range(3):
        engine.submit(f"spec{i}", speculative(request([user(0)], [noise(1.0, 40 + i)], 4, session=f"s{i}")))
    engine.step()
    assert len(engine._prefilling) == 2 and engine.stats()["pending"] == 3  # two rows; the third waits


def test_a_step_writes_in_place(loaded: models.LoadedModel) -> None:
    """Decoding appends nothing: the store is allocated once, each step writes one token per row."""
    engine = Engine(loaded)
    reqs = {f"r{i}": request([user(0)], [noise(1.0 + i / 3, 50 + i)], 20, session=f"s{i}", min_new_tokens=20)
            for i in range(3)}
    for rid, req in reqs.items():
        engine.submit(rid, req)
    while engine.running < 3:
        engine.step()
    ptrs = [t.data_ptr() for t in engine._store.k]
    lengths = list(engine._store.lengths)
    for _ in range(5):
        engine.step()
    assert [t.data_ptr() for t in engine._store.k] == ptrs
    assert engine._store.lengths == [n + 5 for n in lengths]


def test_the_store_keeps_its_capacity_between_turns_unless_history_needs_the_room(loaded: models.LoadedModel) -> None:
    """A conversation's next turn reuses the store (no allocation and no zeroing of its width
    per turn); an empty store is given back before any session's history is evicted."""
    engine = Engine(loaded)
    first = request([user(0)], [noise(2.0, 90)], 8, session="a", turn="1")
    run(engine, {0: [("a1", first)]})
    ptrs = [t.data_ptr() for t in engine._store.k]
    assert ptrs and engine._store.lengths == []  # empty, capacity kept
    shorter = request([user(0)], [noise(1.0, 91)], 8, session="b", turn="1")
    out = run(engine, {0: [("b1", shorter)]})["b1"]
    assert [t.data_ptr() for t in engine._store.k] == ptrs  # the next turn allocated nothing
    assert tokens(out) == reference(loaded, shorter, sorted(engine.eos_ids))  # stale rows hide nothing wrong

    probe = Engine(loaded)
    n = len(probe.build_prompt(first).ids)
    # room for one request (its row, n + 8, and a growth copy of one of two layers), and for a's
    # history (n + 7) alone, not for that history beside the empty store
    tight = Engine(loaded, kv_budget_tokens=n + 7 + (n + 8) // 2 + 8)
    run(tight, {0: [("a1", first)]})
    assert list(tight._sessions) == ["a"] and not tight._store.k  # the store went, the history stayed


def test_prefills_of_one_step_share_a_forward(loaded: models.LoadedModel) -> None:
    engine = Engine(loaded)
    groups: list[int] = []
    original = engine._forward_prefill
    engine._forward_prefill = lambda group: (groups.append(len(group)), original(group))[1]  # type: ignore[method-assign]
    reqs = {f"r{i}": request([user(0)], [noise(1.0 + i / 5, 60 + i)], 6, session=f"s{i}") for i in range(3)}
    outs = run(engine, {0: list(reqs.items())})
    assert groups == [3]
    for rid, req in reqs.items():
        assert tokens(outs[rid]) == reference(loaded, req, sorted(engine.eos_ids)), rid


def test_a_reprefilled_history_encodes_its_audio_chunk_by_chunk(loaded: models.LoadedModel,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.inference import encoder

    engine = Engine(loaded, prefill_chunk_tokens=64)
    clips = [noise(1.5, 70 + i) for i in range(4)]  # ~37 audio tokens each
    msgs: list[dict[str, Any]] = []
    for i in range(4):
        msgs += [user(i), {"role": "assistant", "content": "ok"}]
    req = request(msgs[:-1], clips, 6, session="cold")
    per_step: list[int] = []
    original = encoder.encode
    monkeypatch.setattr(encoder, "encode", lambda model, feats, *a: (per_step.append(len(feats)), original(model, feats, *a))[1])
    out = run(engine, {0: [("r", req)]})["r"]
    assert max(per_step) == 1 and len(per_step) == 4  # one clip per step, not all four at once
    assert tokens(out) == reference(loaded, req, sorted(engine.eos_ids))


def test_workers_on_one_gpu_divide_its_memory() -> None:
    cfg = models._config(models.build_processor(), "7b").text_config
    per_token = memory.bytes_per_token(cfg, 2)
    total, weights = int(139.8 * memory.GIB), int(16.8e9)

    def budget(share: int, loaded: int) -> int:  # `loaded`: workers whose weights are in memory
        return memory.plan(per_token=per_token, device="cuda:0", free=total - loaded * weights, total=total,
                           reserve=memory.GIB, share=share, own=weights).tokens

    alone = budget(1, 1)
    two = [budget(2, 1), budget(2, 2)]  # the first sees the second's weights not yet loaded
    assert sum(two) * per_token + 2 * weights <= 0.9 * total
    assert all(b > alone // 3 for b in two)


def test_a_wide_store_gives_capacity_back_before_history_is_evicted(loaded: models.LoadedModel) -> None:
    import dataclasses

    engine = Engine(loaded)
    long = request([user(0)], [noise(8.0, 80)], 2, session="long")
    streams = {f"s{i}": request([user(0)], [noise(0.6, 81 + i)], 30, session=f"s{i}", min_new_tokens=30)
               for i in range(2)}
    outs: dict[str, list[Output]] = {}
    for rid, req in [("long", long), *streams.items()]:
        engine.submit(rid, req)
    while "long" not in engine._sessions or engine.running < 2:  # the long turn is over, the streams go on
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    wide = engine._store.shape
    assert engine.running == 2 and wide[1] > 200
    kept = engine.cached_tokens
    # a budget the wide store would exceed with the long session's history beside it
    engine.budget = dataclasses.replace(engine.budget, tokens=kept + wide[0] * wide[1] // 2)
    engine._trim_sessions()
    assert "long" in engine._sessions and engine._store.shape[1] < wide[1] // 2
    for rid, more in run(engine, {0: []}).items():
        outs.setdefault(rid, []).extend(more)
    for rid, req in streams.items():
        assert tokens(outs[rid]) == reference(loaded, req, sorted(engine.eos_ids)), rid
