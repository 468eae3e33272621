"""Inference benchmark, measured side by side in one run.

1. N concurrent sessions through the continuous-batching engine vs the same requests one
   after another with plain `model.generate` (all requests arrive at t=0 in both modes):
   aggregate tokens/s and p50/p95 time to first token.
2. A multi-turn session through the engine: time to first token of the last turn over the
   first (history KV reuse), plus the last turn prefilled cold for contrast.

Token counts are fixed (EOS suppressed until max_new_tokens) so every mode does the same work.
`voice-agent bench inference` calls `main(argv)`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np


def _audio(seconds: float, seed: int) -> np.ndarray:
    return (np.random.RandomState(seed).randn(int(16000 * seconds)) * 0.1).astype(np.float32)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _requests(sessions: int, tokens: int, seconds: float) -> list[Any]:
    from agent.inference.base import GenerationRequest

    return [GenerationRequest(f"bench{i}", "1", [{"role": "user", "content": [{"type": "audio", "audio": 0}]}],
                              [_audio(seconds * (0.75 + 0.5 * (i % 3) / 2), i)], tokens,
                              extra={"min_new_tokens": tokens})
            for i in range(sessions)]


def run_sequential(loaded: Any, requests: list[Any]) -> dict[str, Any]:
    """Plain transformers: processor + `generate`, one request after another."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    from agent.model.qwen2_audio import render_prompt

    class FirstToken(BaseStreamer):
        def __init__(self) -> None:
            self.calls, self.at = 0, 0.0

        def put(self, value: Any) -> None:
            self.calls += 1
            if self.calls == 2:  # the first call carries the prompt
                self.at = time.perf_counter()

        def end(self) -> None:
            pass

    ttft, total = [], 0
    t0 = time.perf_counter()
    for r in requests:
        inputs = loaded.processor(text=[render_prompt(r.messages)], audio=r.audios, sampling_rate=16000,
                                  return_tensors="pt").to(loaded.device)
        streamer = FirstToken()
        with torch.inference_mode():
            out = loaded.model.generate(**inputs, max_new_tokens=r.max_new_tokens, min_new_tokens=r.max_new_tokens,
                                        do_sample=False, streamer=streamer)
        ttft.append(streamer.at - t0)
        total += out.shape[1] - inputs["input_ids"].shape[1]
    elapsed = time.perf_counter() - t0
    return {"tokens": total, "seconds": elapsed, "tokens_per_s": total / elapsed, "ttft": ttft}


def run_engine(loaded: Any, requests: list[Any], max_batch: int) -> dict[str, Any]:
    """All requests submitted at once to the continuous-batching engine."""
    from agent.inference.engine import Engine

    engine = Engine(loaded, max_batch=max_batch)
    t0 = time.perf_counter()
    for i, r in enumerate(requests):
        engine.submit(str(i), r)
    stats: dict[str, Any] = {}
    while engine.has_work:
        for o in engine.step():
            if o.error:
                raise RuntimeError(f"request {o.request_id} failed: {o.error}")
            if o.finished:
                stats[o.request_id] = o.stats
    elapsed = time.perf_counter() - t0
    total = sum(s.tokens for s in stats.values())
    return {"tokens": total, "seconds": elapsed, "tokens_per_s": total / elapsed,
            "ttft": [s.timings["ttft"] for s in stats.values()]}


def run_history(loaded: Any, turns: int, tokens: int, seconds: float, repeats: int) -> dict[str, Any]:
    """A `turns`-turn voice chat per session; median over `repeats` sessions per turn."""
    from agent.inference.base import GenerationRequest
    from agent.inference.engine import Engine

    engine = Engine(loaded, max_batch=4)

    def one(session: str, messages: list[dict[str, Any]], audios: list[np.ndarray], turn: int) -> tuple[str, Any]:
        engine.submit(session, GenerationRequest(session, str(turn), messages, audios, tokens,
                                                 extra={"min_new_tokens": tokens}))
        text, stats = "", None
        while engine.has_work:
            for o in engine.step():
                text += o.text
                stats = o.stats if o.finished else stats
        return text, stats

    one("warmup", [{"role": "user", "content": [{"type": "audio", "audio": 0}]}], [_audio(seconds, 999)], 0)
    per_turn: list[list[float]] = [[] for _ in range(turns)]
    reused: list[int] = []
    cold: list[float] = []
    for rep in range(repeats):
        session = f"hist{rep}"
        messages: list[dict[str, Any]] = []
        audios: list[np.ndarray] = []
        for turn in range(turns):
            audios.append(_audio(seconds, 1000 * rep + turn))
            messages.append({"role": "user", "content": [{"type": "audio", "audio": turn}]})
            answer, stats = one(session, messages, audios, turn)
            per_turn[turn].append(stats.timings["ttft"])
            messages.append({"role": "assistant", "content": answer})
        reused.append(stats.reused_tokens)
        prompt_tokens = stats.prompt_tokens
        # the same last turn with no cached history: a full prefill
        _, cold_stats = one(f"cold{rep}", messages[:-1], audios, turns)
        cold.append(cold_stats.timings["ttft"])
    med = [statistics.median(t) for t in per_turn]
    return {"ttft_by_turn": med, "turn1": med[0], "last": med[-1], "last_cold": statistics.median(cold),
            "reused_tokens": statistics.median(reused), "prompt_tokens": prompt_tokens}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voice-agent bench inference", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256, help="new tokens per request (EOS ignored)")
    parser.add_argument("--audio-seconds", type=float, default=2.0)
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--turn-tokens", type=int, default=24, help="new tokens per turn of the history test")
    parser.add_argument("--repeats", type=int, default=5, help="history sessions to take the median over")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = parser.parse_args(argv)

    import torch

    from agent.inference import models

    torch.set_num_threads(args.threads)
    loaded = models.load(args.model)
    requests = _requests(args.sessions, args.tokens, args.audio_seconds)
    # warm both paths (allocator, kernels) on a short request
    warm = _requests(1, 4, 1.0)
    run_sequential(loaded, warm)
    run_engine(loaded, warm, 1)

    seq = run_sequential(loaded, requests)
    bat = run_engine(loaded, requests, max_batch=args.sessions)
    if seq["tokens"] != bat["tokens"]:
        raise RuntimeError(f"token counts differ: sequential {seq['tokens']}, batched {bat['tokens']}")
    hist = run_history(loaded, args.turns, args.turn_tokens, args.audio_seconds, args.repeats)

    result = {
        "model": loaded.name, "device": loaded.device, "sessions": args.sessions, "tokens": args.tokens,
        "batched_tokens_per_s": round(bat["tokens_per_s"], 1),
        "sequential_tokens_per_s": round(seq["tokens_per_s"], 1),
        "speedup_vs_sequential": round(bat["tokens_per_s"] / seq["tokens_per_s"], 2),
        "batched_ttft_p50_s": round(_percentile(bat["ttft"], 50), 4),
        "batched_ttft_p95_s": round(_percentile(bat["ttft"], 95), 4),
        "sequential_ttft_p50_s": round(_percentile(seq["ttft"], 50), 4),
        "sequential_ttft_p95_s": round(_percentile(seq["ttft"], 95), 4),
        "turns": args.turns,
        "turn1_ttft_s": round(hist["turn1"], 4),
        "turn20_ttft_s": round(hist["last"], 4),
        "turn20_cold_ttft_s": round(hist["last_cold"], 4),
        "turn20_over_turn1": round(hist["last"] / hist["turn1"], 2),
        "turn20_reused_tokens": hist["reused_tokens"],
        "turn20_prompt_tokens": hist["prompt_tokens"],
    }
    print(f"inference benchmark · model {loaded.name} on {loaded.device} · torch threads {args.threads}")
    print(f"{args.sessions} sessions × {args.tokens} tokens, all arriving at once")
    print(f"  {'':28}{'batched engine':>16}{'sequential generate':>22}{'ratio':>8}")
    print(f"  {'tokens/s':28}{bat['tokens_per_s']:>16.1f}{seq['tokens_per_s']:>22.1f}"
          f"{result['speedup_vs_sequential']:>8.2f}")
    for q in (50, 95):
        b, s = _percentile(bat["ttft"], q), _percentile(seq["ttft"], q)
        print(f"  {f'time to first token p{q} (ms)':28}{b * 1e3:>16.1f}{s * 1e3:>22.1f}{s / b:>8.2f}")
    print(f"{args.turns}-turn voice chat, {args.audio_seconds:g} s audio per turn (median of {args.repeats})")
    print(f"  time to first token turn 1      {hist['turn1'] * 1e3:8.1f} ms")
    print(f"  turn {args.turns}, history reused        {hist['last'] * 1e3:8.1f} ms   "
          f"(×{result['turn20_over_turn1']:.2f} of turn 1; {hist['reused_tokens']:.0f} of "
          f"{hist['prompt_tokens']} prompt tokens reused)")
    print(f"  turn {args.turns}, cold full prefill     {hist['last_cold'] * 1e3:8.1f} ms")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
