"""Prefill inputs: a request's audio encoded as its chunks reach it, and one step's chunks of
several requests batched into one padded input."""

from __future__ import annotations

import time
from typing import Any

import torch

from agent.inference import encoder
from agent.inference.prompts import RequestError
from agent.inference.sequence import Seq


def encode_audio(seq: Seq, features: encoder.FeatureCache, model: Any, padded: bool, budget: int, first: bool,
                 kind: str = "real-length") -> int:
    """Encode the clips the next chunk reaches while this step's prefill `budget` allows (at
    least one clip when nothing ran yet this step, `first`): a re-prefilled history's audio is
    spread over steps like its tokens. Returns the work done, in audio tokens."""
    assert seq.embeds is not None
    todo: list[tuple[Any, tuple[int, int, str]]] = []
    cost = 0
    for audio, span in seq.todo:
        size = span[1] - span[0]
        if span[0] - seq.base >= seq.done + budget - cost:  # this step's chunk stops before it
            break
        if cost + size > budget and not (first and not todo):
            break
        todo.append((audio, span))
        cost += size
    if not todo:
        return 0
    t0 = time.perf_counter()
    feats = [features.get(a, span[2]) for a, span in todo]
    clips = encoder.encode(model, [f for f, _ in feats], [v for _, v in feats], padded, kind)
    # the spans, not the ids: a spliced answer may hold a generated <|AUDIO|> token, which was
    # fed as a token then and stays one
    for clip, (_, (start, stop, _)) in zip(clips, todo, strict=True):
        if clip.shape[0] != stop - start:
            raise RequestError(f"{stop - start} audio tokens but {clip.shape[0]} audio embeddings")
        seq.embeds[0, start - seq.base:stop - seq.base] = clip.to(seq.embeds.dtype)
    del seq.todo[:len(todo)]
    seq.stats.timings["encoder"] = seq.stats.timings.get("encoder", 0.0) + time.perf_counter() - t0
    return cost


def chunk_inputs(group: list[tuple[Seq, int]]) -> torch.Tensor:
    """[len(group), longest chunk, hidden]: each request's next chunk, right-padded."""
    width = max(n for _, n in group)
    parts = []
    for seq, n in group:
        assert seq.embeds is not None
        part = seq.embeds[:, seq.done:seq.done + n]
        parts.append(torch.nn.functional.pad(part, (0, 0, 0, width - n)) if n < width else part)
    return torch.cat(parts) if len(parts) > 1 else parts[0]
