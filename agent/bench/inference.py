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
real-length encoder, KV reuse of the history). The full pool, its no-KV-reuse ablation and its
equal-batch twin run `--repeats` times, alternating, and every row gives its spread over runs
(`inference_compare`); `tails` says what the slowest turns waited on. `--backend openai
--openai-url URL` sends the same workload to a server instead of the pool; `--compare-vllm` is
the like-for-like comparison (`like_for_like`): `serve-model` and vLLM over the same wire, client,
checkpoint, arrivals and threads, no speculative prefill for either; the in-process pool stays
a separate, labelled comparison (`comparisons`). The exit status is 1 when a target
(`inference_report.TARGETS`) did not hold; `--markdown RESULT.json` prints the tables from a
saved result.
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
        "kv_budget_tokens", "turn20_over_turn1", "turn20_over_turn1_runs", "threads_equal", "comparisons", "rows",
        "equal_batch", "ablations", "tails", "like_for_like", "targets")
IN_PROCESS = ("in_process: the pool in this process's worker, no wire, each turn's speculative prefill "
              "--spec-lead s before its commit")
BASELINE = "in_process baseline: transformers generate in this process, the same commits and pauses"


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
    records: list[dict[str, Any]] = field(default_factory=list)  # per turn: TTFT and the engine's timings

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def row(self) -> dict[str, float | None]:
        return {"tokens_per_s": round(self.tokens_per_s, 1), "ttft_p50_s": rounded(pct(self.ttft, 50)),
                "ttft_p95_s": rounded(pct(self.ttft, 95)), "ttft_p99_s": rounded(pct(self.ttft, 99))}


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
        ttft, timings = arrivals[0] - t0, stats.timings
        result.ttft.append(ttft)
        result.itl.extend(b - a for a, b in zip(arrivals, arrivals[1:], strict=False))
        result.tokens += stats.tokens
        engine = timings.get("ttft")
        result.records.append({"ttft": ttft, "queue": timings.get("queue"), "prefill": timings.get("prefill"),
                               "outside": ttft - engine if engine is not None else None,
                               "prompt_tokens": stats.prompt_tokens, "reused_tokens": stats.reused_tokens,
                               "speculative": "speculative_prefill" in timings})
    return "".join(text)


def _request(sid: str, k: int, messages: list[dict[str, Any]], audios: list[np.ndarray], tokens: int) -> Any:
    from agent.inference.base import GenerationRequest

    return GenerationRequest(sid, f"t{k}", [dict(m) for m in messages], list(audios), tokens,
                             extra={"min_new_tokens": tokens})


async def run_pool(pool: Any, sessions: list[Session], spec_lead: float = 0.0, record: bool = False,
                   forget: bool = False, speculate: bool = True) -> Result:
    """Every session in its own task: silence begins (a speculative prefill unless not
    `speculate`), `spec_lead` s later the turn commits, the answer is read as it streams, a
    pause. `forget`: the backend drops the session's cached history before each turn (the
    KV-reuse ablation)."""
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
                if speculate:
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
    p.add_argument("--compare-vllm", action="store_true", help="like for like: serve-model and vLLM ($VLLM_PYTHON, "
                   "else .venv-vllm) over the same wire, client, checkpoint and threads: like_for_like")
    p.add_argument("--repeats", type=int, default=3, help="runs of each load measurement, alternating; figures "
                   "pooled, with their spread over runs (default %(default)s)")
    p.add_argument("--gpu-share", type=float, default=0.45, help="on a GPU with --compare-vllm: the share of its "
                   "memory for each server, both up at once (default %(default)s)")
    p.add_argument("--output", metavar="FILE.json", help="also write the result to FILE.json (e.g. bench-results/)")
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
        args.repeats = min(args.repeats, 2)
    return args


def _pool(args: argparse.Namespace, **options: Any) -> Any:
    from agent.inference.pool import InferencePool

    return InferencePool(args.model, workers=1, **{"max_batch": max(args.sessions, 1),
                                                   "max_queue": 4 * args.sessions + 8, **options})


async def _warm(backend: Any) -> None:
    await _turn(backend, _request("warm", 0, [{"role": "user", "content": [{"type": "audio", "audio": 0}]}],
                                  [speech_like(1.0, 1)], 4), None)


def _order(names: list[str], r: int) -> list[str]:
    """Run `r`'s order: rotated each run, so no variant always runs first or last."""
    k = r % len(names)
    return names[k:] + names[:k]


async def service(args: argparse.Namespace, sessions: list[Session], one: list[Session]) -> dict[str, Any]:
    """The service path (pool or server): `--repeats` runs of the full load, alternating with the
    pool without KV reuse (the same worker) and the pool at the static batch (a second worker
    started beside it); the 1-session point; the 20-turn history; then the other ablations."""
    if args.backend == "openai":
        from agent.inference.openai import OpenAIBackend

        server = OpenAIBackend(args.openai_url, max_audios=None)
        await server.start()
        try:
            await _warm(server)
            runs: dict[str, list[Result]] = {"full": [], "one": []}
            for r in range(args.repeats):
                runs["full"].append(await run_pool(server, sessions, args.spec_lead, record=r == 0))
                runs["one"].append(await run_pool(server, one, args.spec_lead))
            hist = await run_history(server, args.history_turns, 8, 2.0, args.history_repeats)
        finally:
            await server.close()
        return {"runs": runs, "history": hist, "kv_budget_tokens": None, "worker_threads": None, "variants": {}}
    pools = {"full": _pool(args)}
    if not args.no_ablations:
        pools["equal_batch"] = _pool(args, max_batch=args.static_batch)
    try:
        for p in pools.values():  # one after the other: two threads importing transformers at once race
            await p.start()
        for p in pools.values():
            await _warm(p)
        names = ["full", "one"] + ([] if args.no_ablations else ["no_kv_reuse", "equal_batch"])
        runs = {name: [] for name in names}
        for r in range(args.repeats):
            for name in _order([k for k in runs if k != "one"], r):
                pool = pools.get(name, pools["full"])
                runs[name].append(await run_pool(pool, sessions, args.spec_lead, record=name == "full" and r == 0,
                                                 forget=name == "no_kv_reuse"))
            runs["one"].append(await run_pool(pools["full"], one, args.spec_lead))
        hist = await run_history(pools["full"], args.history_turns, 8, 2.0, args.history_repeats)
        full = pools["full"]
        out = {"runs": runs, "history": hist, "kv_budget_tokens": full.kv_budget_tokens,
               "worker_threads": full._live_info("torch_threads")}
    finally:
        await asyncio.gather(*(p.close() for p in pools.values()))
    variants: dict[str, list[Result]] = {k: v for k, v in runs.items() if k not in ("full", "one")}
    if not args.no_ablations:  # far apart from the full pool: one run each
        for name, options in (("no_batching", {"max_batch": 1}), ("padded_encoder", {"encoder_padded": True})):
            pool = _pool(args, **options)
            await pool.start()
            try:
                await _warm(pool)
                variants[name] = [await run_pool(pool, sessions, args.spec_lead)]
            finally:
                await pool.close()
    return {**out, "variants": variants}


async def measure_wire(urls: dict[str, str], args: argparse.Namespace, sessions: list[Session],
                       one: list[Session]) -> dict[str, dict[str, Any]]:
    """The same workload through each server (the same client type), runs alternating, with no
    speculative prefill; then each one's 20-turn history."""
    from agent.inference.openai import OpenAIBackend

    backends = {name: OpenAIBackend(url, max_audios=None) for name, url in urls.items()}
    out: dict[str, dict[str, Any]] = {name: {"load": [], "one": [], "history": []} for name in urls}
    try:
        for b in backends.values():
            await b.start()
            await _warm(b)
        for r in range(args.repeats):
            for name in _order(list(backends), r):
                out[name]["load"].append(await run_pool(backends[name], sessions, args.spec_lead, speculate=False))
                out[name]["one"].append(await run_pool(backends[name], one, args.spec_lead, speculate=False))
        for name, b in backends.items():
            out[name]["history"] = await run_history(b, args.history_turns, 8, 2.0, args.history_repeats)
    finally:
        for b in backends.values():
            await b.close()
    return out


def _ratio(hist: list[list[float]]) -> float | None:
    if not hist:
        return None
    return round(statistics.median(r[-1] for r in hist) / statistics.median(r[0] for r in hist), 2)


def model_label(name: str) -> str:
    """A checkpoint directory by its name only: results name no path of the machine that ran them."""
    from pathlib import Path

    return Path(name).name if Path(name).is_dir() else name


def _ratio_runs(hist: list[list[float]]) -> dict[str, float] | None:
    """turn 20 over turn 1 of each history session: median, min, max."""
    ratios = [r[-1] / r[0] for r in hist if r and r[0]]
    if not ratios:
        return None
    return {"median": round(statistics.median(ratios), 2), "min": round(min(ratios), 2),
            "max": round(max(ratios), 2), "runs": len(ratios)}


def main(argv: list[str] | None = None) -> int:
    import os

    args = parse(argv)
    from agent.bench import inference_compare as compare
    from agent.bench import inference_report

    if args.markdown:
        print(inference_report.markdown(inference_report.load(args.markdown)))
        return 0
    # Every side gets the same threads: this process (the baselines), the pool's spawned worker
    # (it reads OMP_NUM_THREADS at import), serve-model's worker, vLLM's engine (its cores bound).
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    from agent.inference import models

    torch.set_num_threads(args.threads)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    sessions = workload(args)
    one = workload(argparse.Namespace(**{**vars(args), "sessions": 1}))
    served = asyncio.run(service(args, sessions, one))
    runs: dict[str, list[Result]] = served["runs"]
    load = compare.merge(runs["full"])
    hist: list[list[float]] = served["history"]
    variants: dict[str, list[Result]] = served["variants"]
    wire = None
    if args.compare_vllm:
        try:
            wire = compare.like_for_like(args, sessions, one)
        except Exception as exc:  # our figures still print; like_for_like stays null
            print(f"bench inference: like-for-like comparison failed: {type(exc).__name__}: {str(exc)[:300]}",
                  file=sys.stderr)
    loaded = models.load(args.model)
    enc_real, enc_padded, feat_ms = encoder_ms(loaded, 3 if args.quick else 7)
    seq = static = None
    if not args.no_baselines:
        _generate(loaded, [sessions[0].requests[0]])  # warm
        seq = run_closed_loop(loaded, sessions, 1, 0.0, args.spec_lead)
        static = run_closed_loop(loaded, sessions, args.static_batch, args.static_wait, args.spec_lead)
        assert seq.tokens == static.tokens == runs["full"][0].tokens, (seq.tokens, static.tokens, load.tokens)

    name = "server (delivered)" if args.backend == "openai" else "pool (delivered)"
    rows = {name: compare.row(runs["full"], IN_PROCESS if args.backend != "openai" else "server given by URL")}
    if seq and static:
        rows |= {"sequential generate": {**seq.row(), "comparison": BASELINE},
                 f"static batches of {args.static_batch}": {**static.row(), "comparison": BASELINE}}
    labels = {"equal_batch": f"pool, max_batch {args.static_batch}", "no_batching": "pool, no batching (max_batch 1)",
              "padded_encoder": "pool, encoder padded to 30 s", "no_kv_reuse": "pool, no KV reuse (history re-prefilled)"}
    rows |= {labels[k]: compare.row(v, IN_PROCESS) for k, v in variants.items()}
    worker_threads = served["worker_threads"]
    tps = {k: compare.merge(v).tokens_per_s for k, v in variants.items()}
    result: dict[str, Any] = {
        "workload": {"model": model_label(loaded.name), "device": loaded.device, "backend": args.backend, "sessions": args.sessions,
                     "turns": args.turns, "requests": sum(len(s.requests) for s in sessions),
                     "tokens": runs["full"][0].tokens, "audio_s": list(args.audio), "answer_tokens": list(args.answer),
                     "think_s": list(args.think), "spread_s": args.spread, "spec_lead_s": args.spec_lead,
                     "seed": args.seed, "static_batch": args.static_batch, "static_wait_s": args.static_wait,
                     "torch_threads": args.threads, "worker_threads": worker_threads, "quick": args.quick,
                     "repeats": args.repeats, "history_repeats": args.history_repeats,
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
        "turn20_over_turn1_runs": _ratio_runs(hist),
        # the server's threads are its own when it was given (--backend openai): not ours to check
        "threads_equal": worker_threads == args.threads if args.backend == "transformers" else None,
        "comparisons": {"in_process": IN_PROCESS + ": the top-level figures, `rows`, `equal_batch`, `ablations`, "
                        "`tails`; the baselines run in this process too",
                        "like_for_like": "serve-model against vLLM: `like_for_like` (null unless --compare-vllm)"},
        "rows": rows,
        "equal_batch": {"batch": args.static_batch, "pool_tokens_per_s": rows[labels["equal_batch"]]["tokens_per_s"],
                        "static_tokens_per_s": static.row()["tokens_per_s"],
                        "speedup": round(tps["equal_batch"] / static.tokens_per_s, 2)}
        if static and "equal_batch" in variants else None,
        # what each lever buys: the full pool's tokens/s over the pool with that lever off
        "ablations": {k: {"tokens_per_s_off": rows[labels[k]]["tokens_per_s"], "ttft_p95_s_off": rows[labels[k]]["ttft_p95_s"],
                          "speedup_from_it": round(load.tokens_per_s / tps[k], 2) if tps[k] else None}
                      for k in variants if k != "equal_batch"} or None,
        # what the slowest turns (≥ p95) waited on, against all turns: the odd figures' evidence
        "tails": {k: compare.tail(compare.merge(v)) for k, v in (("full", runs["full"]), *variants.items())
                  if k in ("full", "no_kv_reuse", "equal_batch")},
        "like_for_like": wire,
        "targets": {},
    }
    result["targets"] = inference_report.targets(result)
    assert tuple(result) == KEYS
    print(inference_report.markdown(result))
    print(f"pool inter-token time p50 {1e3 * (pct(load.itl, 50) or 0):.1f} ms, p95 {1e3 * (pct(load.itl, 95) or 0):.1f} ms;"
          f" features {feat_ms:.1f} ms; kv budget {result['kv_budget_tokens']} tokens")
    if args.json:
        print(json.dumps(result))
    if args.output:
        from pathlib import Path

        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if all(t["met"] for t in result["targets"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
