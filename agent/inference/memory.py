"""How many tokens of KV cache one worker may hold, from the device's memory and the model.

CUDA (as vLLM's `gpu_memory_utilization`): the worker may use `utilization` of the device's
total memory (a fraction ≤ 1) or that many bytes (> 1). What is already in use after loading
(weights, CUDA context, other processes) and the peak activations of one engine step
(measured by a profiling run) come off; the rest holds KV at
layers × KV heads × head dim × 2 (keys, values) × dtype size per token.

Several workers on one device (`share` > 1): each plans for its part, `limit / share`, less
what it holds itself (`own`: its weights), and never more than its part of what is free.

CPU: `tokens` (the `kv_budget_tokens` setting) or 1 GiB worth (vLLM's CPU backend reserves
4 GiB), capped at half the memory available at start. Either way an explicit `tokens` setting caps the result; a budget derived from
memory that cannot hold one full 30 s turn fails the start with the figures.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

GIB = 1024**3
CPU_DEFAULT_BYTES = 1 * GIB
CPU_MEMORY_SHARE = 0.5  # of the RAM available at start
MIN_TOKENS = 1024  # one 30 s clip (750 audio tokens) plus prompt and answer
CUDA_HEADROOM = 256 * 1024**2  # allocator fragmentation, cuBLAS workspaces


class KVBudgetError(Exception):
    """The model leaves no room for a KV cache on this device; the message gives the figures."""


@dataclass(frozen=True)
class KVBudget:
    tokens: int
    bytes_per_token: int
    device: str

    @property
    def bytes(self) -> int:
        return self.tokens * self.bytes_per_token

    def describe(self) -> str:
        return f"kv budget: {self.tokens} tokens ({self.bytes / GIB:.2f} GiB) on {self.device}"


def bytes_per_token(text_config: Any, dtype_size: int) -> int:
    """KV bytes per token of the language model: layers × KV heads × head dim × 2 × dtype."""
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return int(text_config.num_hidden_layers * kv_heads * head_dim * 2 * dtype_size)


def plan(*, per_token: int, device: str, free: int, total: int, utilization: float = 0.9,
         reserve: int = 0, tokens: int | None = None, share: int = 1, own: int | None = None) -> KVBudget:
    """The budget from memory figures (bytes): `free`/`total` of the device (CUDA) or of RAM
    (CPU, `free` = available), `reserve` = peak activations of a step; `share` workers use the
    device, this one holding `own` bytes (its weights). Pure, for tests."""
    share = max(1, share)
    if not device.startswith("cuda"):
        allowed = int(free * CPU_MEMORY_SHARE) // share // per_token
        want = tokens if tokens is not None else CPU_DEFAULT_BYTES // per_token
        if allowed < min(want, MIN_TOKENS):
            raise KVBudgetError(f"no room for a KV cache on {device}: {free / GIB:.2f} GiB of RAM available, "
                                f"{CPU_MEMORY_SHARE:.0%} of it holds {allowed} tokens at {per_token} bytes "
                                f"each; at least {MIN_TOKENS} are needed")
        if tokens is None and allowed < want:
            log.warning("kv budget: %d tokens fit in %.0f%% of the %.2f GiB of RAM available (wanted %d)",
                        allowed, CPU_MEMORY_SHARE * 100, free / GIB, want)
        return KVBudget(min(want, allowed), per_token, device)
    limit = int(utilization * total) if utilization <= 1 else int(utilization)
    used = total - free  # weights, CUDA context, other processes
    room = limit - used - reserve - CUDA_HEADROOM
    if share > 1:  # its part: each worker computes this from the same device
        used = own if own is not None else used // share
        limit //= share
        room = min(limit - used, free // share) - reserve - CUDA_HEADROOM
    fit = max(room, 0) // per_token
    if fit < MIN_TOKENS:
        raise KVBudgetError(
            f"no room for a KV cache on {device}: of {total / GIB:.2f} GiB, {limit / GIB:.2f} GiB may be used "
            f"(gpu_memory_utilization={utilization:g}); {used / GIB:.2f} GiB are in use after loading the model "
            f"(weights, CUDA context, other processes) and a step's activations need {reserve / GIB:.2f} GiB "
            f"+ {CUDA_HEADROOM / GIB:.2f} GiB headroom, leaving {max(room, 0) / GIB:.2f} GiB = {fit} tokens at "
            f"{per_token / 1024**2:.2f} MiB each; at least {MIN_TOKENS} tokens are needed. Raise "
            f"gpu_memory_utilization, free the GPU, or use a GPU with more memory")
    if tokens is not None and tokens > fit:
        log.warning("kv_budget_tokens=%d does not fit on %s: using %d", tokens, device, fit)
    return KVBudget(fit if tokens is None else min(tokens, fit), per_token, device)


def device_memory(device: str) -> tuple[int, int]:
    """(free, total) bytes: the CUDA device's, or RAM available/total on the CPU."""
    if device.startswith("cuda"):
        import torch

        free, total = torch.cuda.mem_get_info(torch.device(device))
        return int(free), int(total)
    import os

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:  # MemAvailable counts reclaimable page cache, as `free` does
        with open("/proc/meminfo") as f:
            info = {k: v for k, _, v in (line.partition(":") for line in f)}
        return int(info["MemAvailable"].split()[0]) * 1024, total
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), total


def profile_step(model: Any, feature_extractor: Any, lm: Any, cache_kw: str, chunk: int, device: Any) -> int:
    """Peak activation bytes of one engine step (a 30 s clip through the encoder, then a full
    prefill chunk after 2k tokens of history), measured on the CUDA device."""
    import numpy as np
    import torch
    from transformers import DynamicCache

    from agent.inference import encoder

    torch.cuda.synchronize(device)
    try:
        with torch.inference_mode():
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            feats, valid, _ = encoder.features(feature_extractor, np.zeros(480000, np.float32))
            encoder.encode(model, [feats], [valid])
            enc_peak = torch.cuda.max_memory_allocated(device) - base
            cfg = model.config.text_config
            heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
            dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            layers, past = cfg.num_hidden_layers, 2048

            def zeros(t: int) -> torch.Tensor:
                return torch.zeros(1, heads, t, dim, dtype=model.dtype, device=device)

            cache = DynamicCache(ddp_cache_data=[(zeros(past), zeros(past)) for _ in range(layers)])
            base = torch.cuda.memory_allocated(device)  # the history is KV, not activations
            torch.cuda.reset_peak_memory_stats(device)
            grown = 2 * layers * zeros(chunk).nbytes  # what the chunk adds to the cache
            ids = torch.zeros(1, chunk, dtype=torch.long, device=device)
            res = lm(inputs_embeds=lm.get_input_embeddings()(ids),
                     attention_mask=torch.ones(1, past + chunk, dtype=torch.long, device=device),
                     position_ids=torch.arange(past, past + chunk, device=device)[None],
                     use_cache=True, **{cache_kw: cache})
            model.lm_head(res.last_hidden_state[:, -1])
            lm_peak = torch.cuda.max_memory_allocated(device) - base - grown
            del res, cache
        return max(0, enc_peak, lm_peak)
    finally:
        torch.cuda.empty_cache()
