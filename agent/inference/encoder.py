"""Qwen2-Audio's audio encoder at each clip's real length instead of the 30 s pad.

transformers pads every clip to 3000 mel frames (30 s) and its `Qwen2AudioEncoder.forward`
refuses any other length, although the model masks every position past the clip's valid
frames (keys ≥ the clip's length after the stride-2 conv get -inf). A 2 s turn thus pays for
1500 encoder positions instead of 100. Here the same layers run over the valid frames only:

- features: the waveform is zero-padded only to `frames(n)` mel frames (valid frames + 3,
  rounded up to `STRIDE`), not 30 s. Whisper's STFT frame t reads samples
  [160 t - 200, 160 t + 200): every frame that the valid encoder outputs depend on (< L + 2)
  then sees exactly the samples, zeros included, of the 30 s-padded extraction, and the
  global max used for log-mel clamping is the same (the extra padded frames are silence).
- encoder: conv1 (k3) → conv2 (k3, stride 2) → + positions [:T] → layers with the model's own
  bidirectional key mask → avg-pool 2 → layer norm, as `Qwen2AudioEncoder.forward` does. Output
  j < the clip's token count depends on conv2 outputs < its valid length, which depend on mel
  frames < L + 2, all identical to the padded path; masked keys contribute exactly 0 there.

So the result equals the padded path up to float rounding (different matmul shapes sum in
another order); tests/test_encoder.py checks embeddings and greedy tokens on 0.5–30 s clips.
`padded=True` keeps transformers' own padded call, for comparison.

Other families (`family.encoder`): Qwen2.5-Omni's encoder takes each clip's valid frames
natively (windowed attention over 2 s chunks), so the same short features go to its own
`get_audio_features`; Voxtral's encoder is trained on whole 30 s windows only, so its clips are
always extracted padded to 30 s (375 tokens each) and go through `get_audio_features` as is.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from agent.inference.base import AudioRef
from agent.inference.prompts import RequestError
from agent.model.qwen2_audio import HOP, MAX_MEL_FRAMES, SAMPLE_RATE, encoder_tokens, mel_frames

STRIDE = 8  # mel frames per step of the length rounding: 2 (conv) × 2 (pool) × 2 (even encoder length)


def frames_for(n_samples: int, padded: bool = False) -> int:
    """Mel frames to extract for a clip: its valid frames + 3 of zero context, rounded up."""
    if padded:
        return MAX_MEL_FRAMES
    need = mel_frames(n_samples) + 3
    return min(MAX_MEL_FRAMES, -(-need // STRIDE) * STRIDE)


def features(feature_extractor: Any, audio: np.ndarray, padded: bool = False) -> tuple[torch.Tensor, int, int]:
    """(log-mel [128, frames], valid frames, audio tokens) for one clip of ≤ 30 s."""
    frames = frames_for(audio.size, padded)
    fe = feature_extractor([audio], sampling_rate=SAMPLE_RATE, return_attention_mask=True,
                           padding="max_length", max_length=frames * HOP, truncation=True,
                           return_tensors="pt")
    valid = int(fe["attention_mask"][0].sum())
    return fe["input_features"][0], valid, encoder_tokens(valid)


class FeatureCache:
    """(log-mel, valid frames) per clip digest, least recently used out beyond `limit` bytes:
    a commit after its speculative prefill, or a history re-prefilled, extracts nothing again."""

    def __init__(self, feature_extractor: Any, padded: bool, limit: int) -> None:
        self.feature_extractor, self.padded, self.limit = feature_extractor, padded, limit
        self._items: OrderedDict[str, tuple[torch.Tensor, int]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, audio: np.ndarray | AudioRef, digest: str) -> tuple[torch.Tensor, int]:
        hit = self._items.get(digest)
        if hit is not None:
            self._items.move_to_end(digest)
            return hit
        if isinstance(audio, AudioRef):  # sent by reference, and the history it was in is gone
            raise RequestError(f"audio {digest} is no longer cached: send its samples", code="audio_missing")
        feats, valid, _ = features(self.feature_extractor, audio, self.padded)
        hit = self._items[digest] = (feats, valid)
        self.bytes += feats.nbytes
        while self.bytes > self.limit and self._items:
            _, (old, _) = self._items.popitem(last=False)
            self.bytes -= old.nbytes
        return hit


def encode(model: Any, feats: list[torch.Tensor], valid: list[int], padded: bool = False,
           encoder: str = "real-length") -> list[torch.Tensor]:
    """Audio embeddings (already projected to the LM's width), one [tokens, hidden] per clip.

    Clips go through in groups of at most 30 s of padded frames per call: re-encoding a long
    history at once would otherwise allocate attention for every clip together (the worker's
    peak memory, and what the KV budget's activation reserve was measured on)."""
    out: list[torch.Tensor] = []
    start = 0
    while start < len(feats):
        end, width = start, 0
        while end < len(feats) and (end == start or (end + 1 - start) * max(width, feats[end].shape[-1]) <= MAX_MEL_FRAMES):
            width = max(width, feats[end].shape[-1])
            end += 1
        group = _encode_group if encoder == "real-length" else _encode_family
        out += group(model, feats[start:end], valid[start:end], padded)
        start = end
    return out


def _encode_family(model: Any, feats: list[torch.Tensor], valid: list[int], padded: bool) -> list[torch.Tensor]:
    """Through the model's own `get_audio_features`: Qwen2.5-Omni's thinker (valid frames,
    selected by the feature mask) or Voxtral (whole 30 s windows, 375 tokens each)."""
    device = next(model.parameters()).device
    dtype = model.get_input_embeddings().weight.dtype
    width = max(f.shape[-1] for f in feats)
    batch = torch.stack([torch.nn.functional.pad(f, (0, width - f.shape[-1])) for f in feats]).to(device, dtype)
    if getattr(model.config, "model_type", "") == "voxtral":
        embeds = model.get_audio_features(batch).pooler_output
        return list(embeds.reshape(len(feats), -1, embeds.shape[-1]).unbind(0))
    mask = (torch.arange(width)[None] < torch.tensor(valid)[:, None]).long().to(device)
    embeds = model.get_audio_features(batch, feature_attention_mask=mask).last_hidden_state
    return list(embeds.split([encoder_tokens(v) for v in valid]))


def _encode_group(model: Any, feats: list[torch.Tensor], valid: list[int], padded: bool) -> list[torch.Tensor]:
    tower = model.model.audio_tower
    device, dtype = tower.conv1.weight.device, tower.conv1.weight.dtype
    width = max(f.shape[-1] for f in feats)
    batch = torch.stack([torch.nn.functional.pad(f, (0, width - f.shape[-1])) for f in feats]).to(device, dtype)
    lengths = torch.tensor(valid, device=device)
    conv_len, tokens = tower._get_feat_extract_output_lengths(lengths)
    if padded:
        hidden = _padded(model, batch, conv_len)
    else:
        hidden = _real_length(tower, batch, conv_len)
    projected = model.model.multi_modal_projector(hidden)
    return [projected[i, : int(n)] for i, n in enumerate(tokens)]


def _key_mask(config: Any, x: torch.Tensor, conv_len: torch.Tensor) -> Any:
    """The model's own encoder mask: keys at or past each clip's conv length are masked."""
    from transformers.masking_utils import create_bidirectional_mask

    keep = (torch.arange(x.shape[1], device=x.device)[None] < conv_len[:, None]).long()
    return create_bidirectional_mask(config=config, inputs_embeds=x, attention_mask=keep)


def _padded(model: Any, batch: torch.Tensor, conv_len: torch.Tensor) -> torch.Tensor:
    """transformers' own call, as `Qwen2AudioModel.forward` makes it (3000 frames)."""
    tower = model.model.audio_tower
    dummy = torch.zeros(batch.shape[0], (batch.shape[-1] - 2) // 2 + 1, 1, dtype=batch.dtype, device=batch.device)
    return tower(batch, attention_mask=_key_mask(tower.config, dummy, conv_len)).last_hidden_state


def _real_length(tower: Any, batch: torch.Tensor, conv_len: torch.Tensor) -> torch.Tensor:
    """`Qwen2AudioEncoder.forward` minus its fixed-length check, positions sliced to length."""
    gelu = torch.nn.functional.gelu
    x = gelu(tower.conv2(gelu(tower.conv1(batch)))).permute(0, 2, 1)
    x = x + tower.embed_positions.weight[: x.shape[1]]
    mask = _key_mask(tower.config, x, conv_len)
    for layer in tower.layers:
        x = layer(x, mask)
    x = tower.avg_pooler(x.permute(0, 2, 1)).permute(0, 2, 1)
    return tower.layer_norm(x)
