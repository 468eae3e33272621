"""The continuous-batching engine against transformers' own `generate` (tiny-random, greedy)."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch

from agent.inference import models
from agent.inference.base import GenerationRequest
from agent.inference.engine import Detokenizer, Engine, Output
from agent.model.qwen2_audio import render_prompt

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def loaded() -> models.LoadedModel:
    return sharpened()


def sharpened() -> models.LoadedModel:
    """tiny-random with its language-model weights scaled ×10.

    Freshly initialised weights (std 0.02) give near-uniform attention: the next token then
    depends almost only on the last one, and a wrong position, mask or cache would go
    unnoticed. Sharpened, the output depends on the whole context (checked: feeding wrong
    position ids makes the batched-vs-generate test fail)."""
    base = models.load(models.TINY_RANDOM)
    model = copy.deepcopy(base.model)
    with torch.no_grad():
        for name, param in model.model.language_model.named_parameters():
            if param.dim() == 2 and "embed" not in name:
                param.mul_(10.0)
        model.model.multi_modal_projector.linear.weight.mul_(10.0)
    return models.LoadedModel("tiny-random-sharp", model, base.processor, base.device)


def noise(seconds: float, seed: int) -> np.ndarray:
    return (np.random.RandomState(seed).randn(int(16000 * seconds)) * 0.1).astype(np.float32)


def user(audio: int | None = None, text: str | None = None) -> dict[str, Any]:
    parts: list[dict[str, Any]] = []
    if audio is not None:
        parts.append({"type": "audio", "audio": audio})
    if text is not None:
        parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


def request(messages: list[dict[str, Any]], audios: list[np.ndarray], max_new_tokens: int = 12,
            session: str = "s", turn: str = "t", **extra: Any) -> GenerationRequest:
    return GenerationRequest(session, turn, messages, audios, max_new_tokens, extra=extra)


def reference(loaded: models.LoadedModel, req: GenerationRequest, eos: list[int]) -> list[int]:
    """Unbatched greedy `model.generate` over the processor's own inputs."""
    p = loaded.processor
    inputs = p(text=[render_prompt(req.messages)], audio=req.audios or None, sampling_rate=16000,
               return_tensors="pt")
    min_new = int(req.extra.get("min_new_tokens", 0))
    with torch.inference_mode():
        out = loaded.model.generate(**inputs, max_new_tokens=req.max_new_tokens, do_sample=False,
                                    eos_token_id=eos, min_new_tokens=min_new or None)
    ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    # generate pads finished rows; keep up to and including the first EOS
    for i, t in enumerate(ids):
        if t in eos and i + 1 > min_new:
            return ids[:i + 1]
    return ids


def run(engine: Engine, submissions: dict[int, list[tuple[str, GenerationRequest]]],
        max_steps: int = 500) -> dict[str, list[Output]]:
    """Step the engine, submitting each batch of requests at its step number."""
    outs: dict[str, list[Output]] = {}
    for n in range(max_steps):
        for rid, req in submissions.get(n, []):
            engine.submit(rid, req)
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
        if n > max(submissions) and not engine.has_work:
            return outs
    raise AssertionError("engine did not finish")


def tokens(outs: list[Output]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def eos_ids(engine: Engine) -> list[int]:
    return sorted(engine.eos_ids)


def test_prompt_expansion_matches_processor(loaded: models.LoadedModel) -> None:
    engine = Engine(loaded)
    audios = [noise(1.3, 1), noise(0.7, 2)]
    msgs = [user(0, "What is this?"), {"role": "assistant", "content": "a dog"}, user(1)]
    req = request(msgs, audios)
    expected = loaded.processor(text=[render_prompt(msgs)], audio=audios, sampling_rate=16000,
                                return_tensors="pt")["input_ids"][0].tolist()
    prompt = engine.build_prompt(req)
    assert prompt.ids == expected
    assert [e - s for s, e, _ in prompt.spans] == [32, 17]  # about 25 tokens per second of audio


def test_batched_matches_generate(loaded: models.LoadedModel) -> None:
    engine = Engine(loaded, max_batch=8)
    reqs = {
        "a": request([user(0)], [noise(2.0, 3)], 14),
        "b": request([user(0, "Describe the sound.")], [noise(0.5, 4)], 9),
        "c": request([user(text="hello there, how are you doing?")], [], 16),
        "d": request([user(0), {"role": "assistant", "content": "ok"}, user(1, "and this?")],
                     [noise(1.0, 5), noise(3.0, 6)], 11),
        "e": request([user(0)], [noise(1.5, 7)], 20, min_new_tokens=20),
    }
    # requests join the running batch at different steps
    outs = run(engine, {0: [("a", reqs["a"]), ("b", reqs["b"])], 3: [("c", reqs["c"])],
                        5: [("d", reqs["d"]), ("e", reqs["e"])]})
    eos = eos_ids(engine)
    for rid, req in reqs.items():
        got = tokens(outs[rid])
        assert got == reference(loaded, req, eos), rid
        assert outs[rid][-1].finished and outs[rid][-1].error is None
        stats = outs[rid][-1].stats
        assert stats is not None and stats.tokens == len(got)
        assert {"queue", "prefill", "ttft", "total"} <= set(stats.timings)
    assert len(tokens(outs["e"])) == 20
    assert engine.running == 0


def test_cancel_frees_slot_at_once(loaded: models.LoadedModel) -> None:
    engine = Engine(loaded)
    a = request([user(0)], [noise(1.0, 8)], 30, min_new_tokens=30, session="a")
    b = request([user(0, "hi")], [noise(0.6, 9)], 30, min_new_tokens=30, session="b")
    engine.submit("a", a)
    engine.submit("b", b)
    outs: dict[str, list[Output]] = {}
    for _ in range(4):
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    assert engine.running == 2
    engine.cancel("a")
    assert engine.running == 1  # the slot is free before the next step
    step = engine.step()
    cancelled = [o for o in step if o.request_id == "a"]
    assert len(cancelled) == 1 and cancelled[0].finished and cancelled[0].error
    assert cancelled[0].error[0] == "cancelled" and not cancelled[0].token_ids
    for o in step:
        outs.setdefault(o.request_id, []).append(o)
    rest = run(engine, {0: []})
    full_b = tokens(outs["b"]) + tokens(rest["b"])
    assert full_b == reference(loaded, b, eos_ids(engine))  # the survivor is unharmed


def spliced_reference(loaded: models.LoadedModel, turn1: GenerationRequest, answer_ids: list[int],
                      turn2: GenerationRequest, eos: list[int]) -> list[int]:
    """Greedy `generate` over turn 2's prompt with the first answer as the ids the model
    generated (not its text re-tokenized), built from the processor's own inputs."""
    p = loaded.processor
    first = p(text=[render_prompt(turn1.messages)], audio=turn1.audios, sampling_rate=16000,
              return_tensors="pt")["input_ids"][0].tolist()
    inputs = p(text=[render_prompt(turn2.messages)], audio=turn2.audios, sampling_rate=16000, return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    text = p.tokenizer(turn2.messages[1]["content"], add_special_tokens=False)["input_ids"]
    assert ids[:len(first)] == first and ids[len(first):len(first) + len(text)] == text
    spliced = torch.tensor([first + answer_ids + ids[len(first) + len(text):]])
    with torch.inference_mode():
        out = loaded.model.generate(input_ids=spliced, attention_mask=torch.ones_like(spliced),
                                    input_features=inputs["input_features"],
                                    feature_attention_mask=inputs["feature_attention_mask"],
                                    max_new_tokens=turn2.max_new_tokens, do_sample=False, eos_token_id=eos)
    new = out[0, spliced.shape[1]:].tolist()
    return new[: next((i + 1 for i, t in enumerate(new) if t in eos), len(new))]


def test_second_turn_reuses_history(loaded: models.LoadedModel) -> None:
    engine = Engine(loaded)
    eos = eos_ids(engine)
    a1, a2 = noise(1.2, 10), noise(0.8, 11)
    turn1 = request([user(0)], [a1], 10, session="s1", turn="1")
    out1 = run(engine, {0: [("t1", turn1)]})["t1"]
    answer = "".join(o.text for o in out1)
    generated = [t for t in tokens(out1) if t not in eos]
    # random weights answer with bytes that are not UTF-8: the text does not re-tokenize to
    # the generated ids, which is what the engine must cope with
    assert loaded.processor.tokenizer(answer, add_special_tokens=False)["input_ids"] != generated
    msgs2 = [user(0), {"role": "assistant", "content": answer}, user(1, "and now?")]
    turn2 = request(msgs2, [a1, a2], 12, session="s1", turn="2")
    out2 = run(engine, {0: [("t2", turn2)]})["t2"]
    stats = out2[-1].stats
    first_prompt = len(engine.build_prompt(turn1).ids)
    # the whole history is reused: the first prompt and the answer as generated (all of it
    # but the last token, which was never fed back)
    assert stats is not None and stats.reused_tokens >= first_prompt + len(generated) - 1
    assert stats.prompt_tokens > stats.reused_tokens
    assert tokens(out2) == spliced_reference(loaded, turn1, generated, turn2, eos)

    cold = Engine(loaded)  # no history: the text as given, token for token what generate sees
    cold_out = run(cold, {0: [("t2", turn2)]})["t2"]
    assert cold_out[-1].stats is not None and cold_out[-1].stats.reused_tokens == 0
    assert tokens(cold_out) == reference(loaded, turn2, eos)

    # the same history with a different first audio must not reuse past that audio
    changed = request(msgs2, [noise(1.2, 99), a2], 12, session="s1", turn="3")
    out3 = run(engine, {0: [("t3", changed)]})["t3"]
    first_audio = engine.build_prompt(changed).spans[0][0]
    assert out3[-1].stats is not None and 0 < out3[-1].stats.reused_tokens <= first_audio
    assert tokens(out3) == spliced_reference(loaded, turn1, generated, changed, eos)


def test_cache_budget_evicts_lru(loaded: models.LoadedModel) -> None:
    x = request([user(0)], [noise(1.0, 12)], 5, session="x")
    n = len(Engine(loaded).build_prompt(x).ids)
    # room for one running request (its row + one layer of re-pack copy, tiny-random has 2
    # layers) and a little more: not for a second session's history beside it
    budget = (n + 5) * 3 // 2 + 10
    engine = Engine(loaded, kv_budget_tokens=budget)
    run(engine, {0: [("x", x)]})
    assert engine.cached_tokens == n + 4  # prompt + answer, all but the last token
    out = run(engine, {0: [("y", request([user(0)], [noise(1.0, 13)], 5, session="y"))]})
    assert out["y"][-1].error is None
    assert set(engine._sessions) == {"y"} and engine.cached_tokens <= budget
    engine.forget("y")
    assert engine.cached_tokens == 0


def test_speculative_prefill_then_commit(loaded: models.LoadedModel) -> None:
    engine = Engine(loaded)
    audio = noise(1.4, 14)
    final = request([user(0)], [audio], 12, session="sp", turn="7")
    spec = request([user(0)], [audio], 12, session="sp", turn="7")
    spec.speculative = True
    done = run(engine, {0: [("spec", spec)]})["spec"]
    assert len(done) == 1 and done[0].finished and done[0].error is None and not done[0].token_ids
    assert engine.stats()["prefilled"] == 1 and engine.running == 0  # prefilled, not decoding
    out = run(engine, {0: [("final", final)]})["final"]
    assert engine.stats()["prefilled"] == 0
    assert out[-1].stats is not None and out[-1].stats.reused_tokens == out[-1].stats.prompt_tokens
    plain = run(Engine(loaded), {0: [("p", final)]})["p"]
    assert tokens(out) == tokens(plain)

    # a speculation that does not match the final prompt is discarded, not reused
    run(engine, {0: [("spec2", request([user(0)], [noise(1.0, 15)], 12, session="q", turn="1",
                                       ))]})
    spec3 = request([user(0)], [noise(1.0, 16)], 12, session="q2", turn="1")
    spec3.speculative = True
    run(engine, {0: [("spec3", spec3)]})
    engine.drop_turn("q2", "1")
    assert engine.stats()["prefilled"] == 0


def test_bad_requests_leave_engine_working(loaded: models.LoadedModel) -> None:
    engine = Engine(loaded)
    good = request([user(0)], [noise(1.0, 17)], 8, session="g")
    outs = run(engine, {0: [("empty-audio", request([user(0)], [np.zeros(0, np.float32)], session="e")),
                            ("empty-turn", request([user(text="  ")], [], session="e2")),
                            ("no-audio", request([user(3)], [], session="e3")),
                            ("zero", request([user(text="hi")], [], 0, session="e4")),
                            ("good", good)]})
    for rid in ("empty-audio", "empty-turn", "no-audio", "zero"):
        assert len(outs[rid]) == 1 and outs[rid][0].finished, rid
        err = outs[rid][0].exception()
        assert err is not None and err.code == "bad_request" and err.message, rid
    assert "empty" in outs["empty-audio"][0].error[1]  # type: ignore[index]
    assert tokens(outs["good"]) == reference(loaded, good, eos_ids(engine))


def test_detokenizer_never_splits_characters(loaded: models.LoadedModel) -> None:
    tok = loaded.processor.tokenizer
    text = "héllo wörld — 世界 🎧!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # byte-level: multi-byte characters span several tokens
    detok = Detokenizer(tok)
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_history_with_generated_special_tokens(loaded: models.LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """An answer that holds <|AUDIO|> (dropped from its text) is spliced back as generated; the
    audio embeddings still go only where the audio clips are."""
    engine = Engine(loaded)
    eos = eos_ids(engine)
    audio_id = engine.audio_token_id
    original = engine._suppress_eos

    def second_token_is_audio(logits: torch.Tensor, seqs: list[Any]) -> torch.Tensor:
        logits = original(logits, seqs)
        for i, seq in enumerate(seqs):
            if len(seq.generated) == 1:
                logits[i, audio_id] = 1e9
        return logits

    monkeypatch.setattr(engine, "_suppress_eos", second_token_is_audio)
    turn1 = request([user(0)], [noise(1.0, 80)], 8, session="x", turn="1")
    out1 = run(engine, {0: [("t1", turn1)]})["t1"]
    generated = [t for t in tokens(out1) if t not in eos]
    assert generated[1] == audio_id
    monkeypatch.undo()
    msgs2 = [user(0), {"role": "assistant", "content": "".join(o.text for o in out1)}, user(1)]
    out2 = run(engine, {0: [("t2", request(msgs2, [turn1.audios[0], noise(0.7, 81)], 6, session="x"))]})["t2"]
    stats = out2[-1].stats
    assert out2[-1].error is None and stats is not None
    assert stats.reused_tokens >= len(engine.build_prompt(turn1).ids) + len(generated) - 1
