"""Voxtral in the engine against its own processor (mistral-common's tokenizer) and `generate`."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from agent.inference import models
from agent.inference.base import GenerationRequest
from agent.inference.engine import Engine
from agent.model import voxtral
from agent.model.qwen2_audio import audio_base64
from tests.test_families import noise, request, run, tokens, user

pytest.importorskip("mistral_common")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vox() -> models.LoadedModel:
    return models.load(models.TINY_VOXTRAL)


@pytest.fixture(scope="module")
def sharp(vox: models.LoadedModel) -> models.LoadedModel:
    model = copy.deepcopy(vox.model)
    with torch.no_grad():
        for name, param in model.model.language_model.named_parameters():
            if param.dim() == 2 and "embed" not in name:
                param.mul_(10.0)
        model.model.multi_modal_projector.linear_2.weight.mul_(10.0)
    return models.LoadedModel("vox-sharp", model, vox.processor, vox.device, None, vox.family)


def official_inputs(loaded: models.LoadedModel, req: GenerationRequest) -> Any:
    """transformers' VoxtralProcessor.apply_chat_template (mistral-common encodes the chat)."""
    from transformers import VoxtralProcessor

    processor = VoxtralProcessor(feature_extractor=loaded.processor.feature_extractor,
                                 tokenizer=loaded.processor.tokenizer)
    conversation = []
    for m in voxtral.fold_system(req.messages):
        content = m["content"]
        if not isinstance(content, str):
            content = [{"type": "audio", "base64": audio_base64(req.audios[p["audio"]])} if p["type"] == "audio" else p
                       for p in content]
        conversation.append({"role": m["role"], "content": content})
    return processor.apply_chat_template(conversation)


def reference(loaded: models.LoadedModel, req: GenerationRequest, eos: list[int]) -> list[int]:
    inputs = official_inputs(loaded, req)
    with torch.inference_mode():
        out = loaded.model.generate(**inputs, max_new_tokens=req.max_new_tokens, do_sample=False, eos_token_id=eos)
    ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    return ids[: next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))]


def test_voxtral_prompts_token_identical(vox: models.LoadedModel) -> None:
    engine = Engine(vox)
    a = [noise(1.0, 1), noise(2.0, 2)]
    for messages in (
        [user(0)],
        [user(0, "Who speaks?")],
        [{"role": "system", "content": "Be brief."}, user(0, "Who?"), {"role": "assistant", "content": "Ann"}, user(1)],
        [user(text="hello"), {"role": "assistant", "content": "hi"}, user(0, "and this?")],
    ):
        used = a[: sum(p.get("type") == "audio" for m in messages if not isinstance(m["content"], str)
                       for p in m["content"])]
        req = request(messages, used)
        prompt = engine.build_prompt(req)
        assert prompt.ids == official_inputs(vox, req)["input_ids"][0].tolist()
        assert all(e - s == 375 for s, e, _ in prompt.spans)  # one 30 s window per clip


def test_voxtral_batched_and_history_match_generate(sharp: models.LoadedModel) -> None:
    engine = Engine(sharp, max_batch=8)
    eos = sorted(engine.eos_ids)
    a1, a2 = noise(1.5, 3), noise(0.7, 4)
    reqs = {
        "a": request([user(0)], [a1], 10, session="a"),
        "b": request([user(0, "Describe it.")], [a2], 8, session="b"),
        "c": request([user(text="hello there")], [], 9, session="c"),
    }
    outs = run(engine, {0: [("a", reqs["a"]), ("b", reqs["b"])], 2: [("c", reqs["c"])]})
    for rid, req in reqs.items():
        assert tokens(outs[rid]) == reference(sharp, req, eos), rid
    # the next turn of session a reuses its cached prompt (up to the answer, given as other text)
    turn2 = request([user(0), {"role": "assistant", "content": "ok"}, user(1, "and now?")], [a1, a2], 8, session="a")
    out2 = run(engine, {0: [("a2", turn2)]})["a2"]
    assert out2[-1].stats is not None and out2[-1].stats.reused_tokens == len(engine.build_prompt(reqs["a"]).ids)
    assert tokens(out2) == reference(sharp, turn2, eos)


def test_voxtral_save_load_and_missing_dependency(tmp_path: Path, vox: models.LoadedModel,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    target = models.save(models.TINY_VOXTRAL, tmp_path / "vox")
    assert (target / "tekken.json").exists() and models.family_of(str(target)) is voxtral.FAMILY
    loaded = models.load(str(target))
    req = request([user(0, "what?")], [noise(1.0, 20)], 5)
    assert tokens(run(Engine(loaded), {0: [("x", req)]})["x"]) == tokens(run(Engine(vox), {0: [("x", req)]})["x"])
    monkeypatch.setitem(sys.modules, "mistral_common", None)  # as if not installed
    with pytest.raises(models.ModelLoadError, match="mistral-common"):
        models.load(str(target))
