"""Model families: the format chosen from `model_type`, Qwen2-Audio unchanged, and Qwen2.5-Omni's
thinker in the engine against its own processor and transformers' `generate` (tiny, greedy)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from agent.inference import models
from agent.inference.base import GenerationRequest
from agent.inference.engine import Engine, Output
from agent.model import family as families
from agent.model import qwen2_5_omni, qwen2_audio, voxtral
from tests.test_engine import noise, user

torch.set_num_threads(1)


def request(messages: list[dict[str, Any]], audios: list[np.ndarray], max_new_tokens: int = 10,
            session: str = "s", turn: str = "t") -> GenerationRequest:
    return GenerationRequest(session, turn, messages, audios, max_new_tokens)


def run(engine: Engine, submissions: dict[int, list[tuple[str, GenerationRequest]]]) -> dict[str, list[Output]]:
    outs: dict[str, list[Output]] = {}
    for n in range(400):
        for rid, req in submissions.get(n, []):
            engine.submit(rid, req)
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
        if n > max(submissions) and not engine.has_work:
            return outs
    raise AssertionError("engine did not finish")


def tokens(outs: list[Output]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


CONVERSATIONS: list[list[dict[str, Any]]] = [
    [user(0)],
    [user(0, "What is the speaker's emotion?")],
    [{"role": "system", "content": "Be brief."}, user(0), {"role": "assistant", "content": "ok"}, user(1, "and this?")],
    [user(text="hello"), {"role": "assistant", "content": "hi"}, user(0), {"role": "assistant", "content": "a dog"},
     user(1), user(text="two clips <b>")],
]


# ---- the registry ------------------------------------------------------------------------------
def test_family_from_model_type_and_qwen2_audio_unchanged() -> None:
    assert families.for_model_type(None) is qwen2_audio.FAMILY
    assert families.for_model_type("qwen2_audio") is qwen2_audio.FAMILY
    assert families.for_model_type("qwen2_5_omni") is families.for_model_type("qwen2_5_omni_thinker") is qwen2_5_omni.FAMILY
    assert families.for_model_type("voxtral") is voxtral.FAMILY
    with pytest.raises(families.UnknownFamily):
        families.for_model_type("bert")
    # Qwen2-Audio's family is its module's own functions: prompts byte-identical to before
    fam = qwen2_audio.FAMILY
    assert fam.render_prompt is qwen2_audio.render_prompt and fam.audio_token_count is qwen2_audio.audio_token_count
    for messages in CONVERSATIONS:
        assert fam.special_re.findall(qwen2_audio.render_prompt(messages)) == \
            qwen2_audio.SPECIAL_RE.findall(qwen2_audio.render_prompt(messages))
    assert [f.name for f in families.all_families()] == list(families.NAMES)
    assert families.by_tiny_name("tiny-random") is fam
    for f in families.all_families():  # metadata people choose by
        assert f.checkpoints and f.licence and set(f.modes) <= {"chat", "analysis"} and f.max_clip_samples == 480000


def test_voxtral_format() -> None:
    text = voxtral.render_prompt([{"role": "system", "content": "Be brief."}, user(0, "Who speaks?"),
                                  {"role": "assistant", "content": "Ann"}, user(1)])
    # beside audio, the system text opens the first user turn (mistral-common refuses it otherwise)
    assert text == ("<s>[INST]Be brief.\n\n[BEGIN_AUDIO][AUDIO]Who speaks?[/INST]"
                    "Ann</s>[INST][BEGIN_AUDIO][AUDIO][/INST]")
    assert voxtral.render_prompt([{"role": "system", "content": "Be brief."}, user(text="hi")]) == \
        "<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST]hi[/INST]"
    assert [voxtral.audio_token_count(n) for n in (1, 480000, 480001)] == [375, 375, 750]


# ---- Qwen2.5-Omni -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def omni() -> models.LoadedModel:
    return models.load(models.TINY_OMNI)


@pytest.fixture(scope="module")
def sharp(omni: models.LoadedModel) -> models.LoadedModel:
    """Language-model weights ×10 (see tests/test_engine.py: the output then depends on the
    whole context, so a wrong position, mask or cache shows)."""
    model = copy.deepcopy(omni.model)
    with torch.no_grad():
        for name, param in model.model.language_model.named_parameters():
            if param.dim() == 2 and "embed" not in name:
                param.mul_(10.0)
        model.model.audio_tower.proj.weight.mul_(10.0)
    return models.LoadedModel("omni-sharp", model, omni.processor, omni.device, None, omni.family)


def omni_processor(loaded: models.LoadedModel) -> Any:
    """transformers' own `Qwen2_5OmniProcessor` for text + audio. Its image and video
    processors need torchvision, which audio never touches: built without them."""
    from transformers import Qwen2_5OmniProcessor

    tok = loaded.processor.tokenizer
    p = object.__new__(Qwen2_5OmniProcessor)
    p.tokenizer, p.feature_extractor = tok, loaded.processor.feature_extractor
    p.image_processor = p.video_processor = None
    p.chat_template = tok.chat_template
    names = {"image": "<|IMAGE|>", "audio": "<|AUDIO|>", "video": "<|VIDEO|>"}
    for kind, token in names.items():
        setattr(p, f"{kind}_token", token)
        setattr(p, f"{kind}_token_id", tok.convert_tokens_to_ids(token))
    p.vision_bos_token, p.vision_eos_token = "<|vision_bos|>", "<|vision_eos|>"
    p.audio_bos_token, p.audio_eos_token = "<|audio_bos|>", "<|audio_eos|>"
    return p


def reference(loaded: models.LoadedModel, req: GenerationRequest, eos: list[int]) -> list[int]:
    """Greedy `generate` of the thinker over the official template and processor's inputs."""
    text = loaded.processor.tokenizer.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
    inputs = omni_processor(loaded)(text=[text], audio=req.audios or None, return_tensors="pt")
    with torch.inference_mode():
        out = loaded.model.generate(**inputs, max_new_tokens=req.max_new_tokens, do_sample=False, eos_token_id=eos)
    ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    return ids[: next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))]


def test_omni_prompts_token_identical(omni: models.LoadedModel) -> None:
    tok = omni.processor.tokenizer
    assert tok.chat_template == qwen2_5_omni.CHAT_TEMPLATE
    engine = Engine(omni)
    processor = omni_processor(omni)
    audios = [noise(1.3, 1), noise(0.7, 2)]
    for messages in CONVERSATIONS:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert qwen2_5_omni.render_prompt(messages) == text
        used = audios[: sum(p.get("type") == "audio" for m in messages if not isinstance(m["content"], str)
                            for p in m["content"])]
        expected = processor(text=[text], audio=used or None, return_tensors="pt")["input_ids"][0].tolist()
        assert engine.build_prompt(request(messages, used)).ids == expected


def test_omni_batched_matches_generate(sharp: models.LoadedModel) -> None:
    engine = Engine(sharp, max_batch=8)
    eos = sorted(engine.eos_ids)
    reqs = {
        "a": request([user(0)], [noise(2.0, 3)], 12, session="a"),
        "b": request([user(0, "Describe the sound.")], [noise(0.5, 4)], 9, session="b"),
        "c": request([user(text="hello there")], [], 10, session="c"),
        "d": request([user(0), {"role": "assistant", "content": "ok"}, user(1, "and this?")],
                     [noise(1.0, 5), noise(3.0, 6)], 11, session="d"),
    }
    outs = run(engine, {0: [("a", reqs["a"]), ("b", reqs["b"])], 2: [("c", reqs["c"]), ("d", reqs["d"])]})
    for rid, req in reqs.items():
        assert tokens(outs[rid]) == reference(sharp, req, eos), rid
        assert outs[rid][-1].error is None


def test_omni_history_reuse_preemptive_and_oom(sharp: models.LoadedModel) -> None:
    engine = Engine(sharp)
    eos = sorted(engine.eos_ids)
    a1, a2 = noise(1.2, 10), noise(0.8, 11)
    turn1 = request([user(0)], [a1], 8, session="s", turn="1")
    run(engine, {0: [("t1", turn1), ("z", request([user(0)], [noise(0.5, 13)], 4, session="z"))]})
    # answers given back as text that is not what the model generated: the cache is reused up
    # to that answer, so the result must equal a cold prefill of the same prompt exactly
    turn2 = request([user(0), {"role": "assistant", "content": "ok"}, user(1, "and now?")], [a1, a2], 8,
                    session="s", turn="2")
    # a preemptive answer of turn 2, promoted when the turn commits
    turn2.preemptive = True
    engine.submit("t2", turn2)
    engine.promote("s", "2")
    # the device runs out once in the encoder: another session's cached history is freed and
    # the step retried
    encode, calls = engine._encode_audio, []

    def encode_once_out_of_memory(*args: Any, **kwargs: Any) -> int:  # the real encoder call site
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return encode(*args, **kwargs)

    engine._encode_audio = encode_once_out_of_memory  # type: ignore[method-assign]
    out2 = run(engine, {0: []})["t2"]
    assert out2[-1].error is None and engine.oom_events == 1 and "z" not in engine._sessions
    cold = run(Engine(sharp), {0: [("c", turn2)]})["c"]
    assert tokens(out2) == tokens(cold) == reference(sharp, turn2, eos)
    assert out2[-1].stats is not None and out2[-1].stats.reused_tokens == len(engine.build_prompt(turn1).ids)
    # history reuse on a third turn
    turn3 = request([*turn2.messages, {"role": "assistant", "content": "fine"}, user(2)],
                    [a1, a2, noise(0.6, 12)], 6, session="s", turn="3")
    out3 = run(engine, {0: [("t3", turn3)]})["t3"]
    stats = out3[-1].stats
    assert stats is not None and stats.reused_tokens == len(engine.build_prompt(turn2).ids)
    assert tokens(out3) == reference(sharp, turn3, eos)


def test_omni_save_and_load_directory(tmp_path: Path, omni: models.LoadedModel) -> None:
    target = models.save(models.TINY_OMNI, tmp_path / "omni")
    config = json.loads((target / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_omni" and not config["enable_audio_output"]
    assert models.family_of(str(target)) is qwen2_5_omni.FAMILY
    loaded = models.load(str(target))
    assert loaded.family is qwen2_5_omni.FAMILY and type(loaded.model).__name__ == "Qwen2_5OmniThinkerForConditionalGeneration"
    req = request([user(0, "what?")], [noise(1.0, 20)], 6)
    assert tokens(run(Engine(loaded), {0: [("x", req)]})["x"]) == tokens(run(Engine(omni), {0: [("x", req)]})["x"])
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(models.ModelLoadError, match="not a Qwen2-Audio model"):
        models.load(str(tmp_path / "bert"))


def test_docs_hold_the_families_table() -> None:
    docs = Path(__file__).resolve().parent.parent / "docs" / "models.md"
    assert families.markdown_table() in docs.read_text()
