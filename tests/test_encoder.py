"""The audio encoder at each clip's real length equals transformers' 30 s-padded path.

Tolerance: the two paths differ only in the order float32 sums are taken (matmuls over
other shapes; masked keys get exactly zero weight), measured ≤ 2e-7 on embeddings of
magnitude ~0.5, so 2e-6 (about 16 ulp at 1.0) leaves a 10× margin. Real mistakes are far
larger: cutting the mel window at the valid frames (no conv context) gives up to 3e-2,
dropping the key mask up to 2e-2, never below 9e-5 on these clips.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agent.inference import encoder, models
from agent.inference.base import GenerationRequest
from agent.inference.engine import Engine
from agent.model.qwen2_audio import audio_token_count, render_prompt
from tests.test_engine import sharpened

torch.set_num_threads(1)

SECONDS = (0.5, 1.0, 2.3, 5.0, 9.99, 17.3, 29.99, 30.0)
ATOL = 2e-6


@pytest.fixture(scope="module")
def loaded() -> models.LoadedModel:
    """tiny-random with sharpened language-model weights: greedy tokens depend on the audio."""
    return sharpened()


def clip(seconds: float, seed: int) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    rng = np.random.RandomState(seed)
    return (0.3 * np.sin(2 * np.pi * 220 * t * (1 + t)) + 0.05 * rng.randn(t.size)).astype(np.float32)


@pytest.mark.parametrize("seconds", SECONDS)
def test_real_length_embeddings_equal_padded(loaded: models.LoadedModel, seconds: float) -> None:
    audio = clip(seconds, int(seconds * 100))
    fe = loaded.processor.feature_extractor
    padded, valid_p, tokens_p = encoder.features(fe, audio, padded=True)
    real, valid_r, tokens_r = encoder.features(fe, audio)
    assert valid_p == valid_r and tokens_p == tokens_r == audio_token_count(audio.size)
    # what the processor hands the model is exactly the padded path's input
    ref = loaded.processor(text=["<|AUDIO|>"], audio=[audio], sampling_rate=16000, return_tensors="pt")
    assert torch.equal(ref["input_features"][0], padded)
    assert real.shape[-1] == encoder.frames_for(audio.size) and (real.shape[-1] >= valid_r + 3 or valid_r > 2990)
    if seconds <= 10:
        assert real.shape[-1] < 0.4 * padded.shape[-1]  # the point: far fewer frames
    # the frames the valid outputs depend on are bit-identical
    assert torch.equal(real[:, : valid_r + 2], padded[:, : valid_r + 2])
    with torch.inference_mode():
        e_pad = encoder.encode(loaded.model, [padded], [valid_p], padded=True)[0]
        e_real = encoder.encode(loaded.model, [real], [valid_r])[0]
    assert e_pad.shape == e_real.shape == (tokens_p, loaded.model.config.text_config.hidden_size)
    torch.testing.assert_close(e_real, e_pad, rtol=0, atol=ATOL)


def test_batched_clips_of_different_lengths(loaded: models.LoadedModel) -> None:
    """Several clips in one encoder call (one request with several new audios) pad to the
    longest and mask per clip (in groups of at most 30 s of frames): each equals its own
    padded-path embedding."""
    fe = loaded.processor.feature_extractor
    audios = [clip(s, i) for i, s in enumerate((0.7, 6.1, 2.0, 25.0, 3.3))]  # 25 s: a group of its own
    with torch.inference_mode():
        real = [encoder.features(fe, a) for a in audios]
        together = encoder.encode(loaded.model, [f for f, _, _ in real], [v for _, v, _ in real])
        for a, got in zip(audios, together, strict=True):
            f, v, _ = encoder.features(fe, a, padded=True)
            torch.testing.assert_close(got, encoder.encode(loaded.model, [f], [v], padded=True)[0], rtol=0, atol=ATOL)


def _greedy(engine: Engine, req: GenerationRequest) -> list[int]:
    engine.submit("r", req)
    ids: list[int] = []
    while engine.has_work:
        for o in engine.step():
            assert o.error is None, o.error
            ids += o.token_ids
    return ids


def test_identical_greedy_tokens_real_length_padded_and_generate(loaded: models.LoadedModel) -> None:
    real, padded = Engine(loaded), Engine(loaded, encoder_padded=True)
    eos = sorted(real.eos_ids)
    for i, seconds in enumerate(SECONDS):
        messages = [{"role": "user", "content": [{"type": "audio", "audio": 0}]}]
        req = GenerationRequest(f"s{i}", "1", messages, [clip(seconds, 7 + i)], 10)
        got_real, got_padded = _greedy(real, req), _greedy(padded, req)
        inputs = loaded.processor(text=[render_prompt(messages)], audio=req.audios, sampling_rate=16000,
                                  return_tensors="pt")
        with torch.inference_mode():
            ref = loaded.model.generate(**inputs, max_new_tokens=10, do_sample=False, eos_token_id=eos)
        expected = ref[0, inputs["input_ids"].shape[1]:].tolist()
        expected = expected[: next((j + 1 for j, t in enumerate(expected) if t in eos), len(expected))]
        assert got_real == got_padded == expected, seconds
