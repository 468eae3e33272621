"""What the wire costs: the same sessions through the in-process pool and through
`voice-agent serve-model` (a separate process, our `openai` backend over a Unix socket or
TCP), one after the other in one run.

The workload is `agent.bench.inference`'s (seeded: N sessions, turns of speech-like audio
with their history, answers of a set length with EOS suppressed — `min_tokens` on the
wire — so both paths generate the same tokens). Reported per path: delivered TTFT p50/p95
(commit → first delta in the caller), inter-token time and tokens/s; then the served path
over the in-process one, and the CPU each process spent per generated token (from
/proc: the caller, the model server, the inference workers) — less noisy than wall time on
a shared machine. `voice-agent bench model_server [--json]`; exit 1 when the served path's
tokens/s fall below `--min-ratio` of the in-process pool's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from agent.bench.inference import Result, _request, _turn, pct, rounded, run_pool, speech_like, workload
from agent.bench.soak import _proc_tree

KEYS = ("workload", "in_process", "served", "ttft_p50_added_s", "tokens_per_s_ratio", "target_met",
        "target_held")  # target_held: deprecated name of target_met (same value)
CPU = ("caller", "server", "workers")  # seconds of CPU per part, summed over runs


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process, all its threads (0 once it has ended)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def snapshot(caller: int, server: int | None) -> dict[str, float]:
    """CPU so far of the caller, the server process (if any) and the inference workers."""
    root = server if server is not None else caller
    workers = [pid for pid in _proc_tree(root) if pid != root]
    return {"caller": cpu_s(caller), "server": cpu_s(server) if server is not None else 0.0,
            "workers": sum(cpu_s(pid) for pid in workers)}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="voice-agent bench model_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-random", help="model of both paths (default %(default)s)")
    p.add_argument("--sessions", type=int, default=8, help="concurrent sessions (default %(default)s)")
    p.add_argument("--turns", type=int, default=3, help="turns per session (default %(default)s)")
    p.add_argument("--audio", type=float, nargs=2, default=(1.0, 4.0), metavar=("MIN", "MAX"),
                   help="seconds of audio per turn (default 1 4)")
    p.add_argument("--answer", type=int, nargs=2, default=(16, 48), metavar=("MIN", "MAX"),
                   help="answer tokens per turn (default 16 48)")
    p.add_argument("--think", type=float, nargs=2, default=(0.1, 0.3), metavar=("MIN", "MAX"),
                   help="pause after an answer, seconds (default 0.1 0.3)")
    p.add_argument("--spread", type=float, default=0.5, help="sessions start within this many seconds (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default %(default)s)")
    p.add_argument("--listen", default=None, help="serve-model's address: unix:///PATH or tcp://127.0.0.1:PORT "
                   "(default: a Unix socket in a temporary directory)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each path, alternating, pooled "
                   "(default %(default)s)")
    p.add_argument("--min-ratio", type=float, default=0.8,
                   help="target: served tokens/s at least this share of in-process (default %(default)s)")
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    return p.parse_args(argv)


def pool(total: Result, run: Result) -> None:
    total.ttft += run.ttft
    total.itl += run.itl
    total.tokens += run.tokens
    total.seconds += run.seconds


def summary(r: Result, cpu: dict[str, float]) -> dict[str, Any]:
    per_token = {part: round(1e3 * cpu[part] / r.tokens, 3) if r.tokens else None for part in CPU}
    engine = cpu["engine_ttft_sum"] / cpu["engine_ttft_count"] if cpu.get("engine_ttft_count") else None
    return {"delivered_ttft_p50_s": rounded(pct(r.ttft, 50)), "delivered_ttft_p95_s": rounded(pct(r.ttft, 95)),
            "itl_p50_s": rounded(pct(r.itl, 50), 5), "tokens_per_s": round(r.tokens_per_s, 1), "tokens": r.tokens,
            "wall_s": round(r.seconds, 2), "cpu_ms_per_token": per_token,
            "cpu_ms_per_token_total": round(1e3 * sum(cpu[p] for p in CPU) / r.tokens, 3) if r.tokens else None,
            # served only: the mean TTFT inside the engine, against the mean the caller saw
            "ttft_mean_s": rounded(sum(r.ttft) / len(r.ttft)) if r.ttft else None,
            "engine_ttft_mean_s": rounded(engine)}


async def warm(backend: Any) -> None:
    await _turn(backend, _request("warm", 0, [{"role": "user", "content": [{"type": "audio", "audio": 0}]}],
                                  [speech_like(1.0, 1)], 4), None)


async def in_process(args: argparse.Namespace, cpu: dict[str, float]) -> Result:
    from agent.inference.pool import InferencePool

    pool = InferencePool(args.model, workers=1, max_batch=args.sessions, max_queue=4 * args.sessions + 8)
    await pool.start()
    try:
        await warm(pool)
        before = snapshot(os.getpid(), None)
        result = await run_pool(pool, workload(args))
        after = snapshot(os.getpid(), None)
        for part in CPU:
            cpu[part] += after[part] - before[part]
        return result
    finally:
        await pool.close()


def _reachable(listen: str) -> bool:
    if listen.startswith("unix://"):
        target: Any = listen[len("unix://"):]
        family = socket.AF_UNIX
    else:
        host, port = listen[len("tcp://"):].rsplit(":", 1)
        target, family = (host, int(port)), socket.AF_INET
    with socket.socket(family) as s:
        try:
            s.connect(target)
            return True
        except OSError:
            return False


async def engine_ttft(backend: Any) -> tuple[float, float]:
    """(sum, count) of the server's engine-side TTFT (submit → first token in the worker)."""
    from prometheus_client.parser import text_string_to_metric_families

    async with backend._http.get(backend.base_url.removesuffix("/v1") + "/metrics") as response:
        text = await response.text()
    found = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
             if s.name.startswith("voice_agent_model_request_phase_seconds") and s.labels.get("phase") == "ttft"}
    return (found.get("voice_agent_model_request_phase_seconds_sum", 0.0),
            found.get("voice_agent_model_request_phase_seconds_count", 0.0))


async def served(args: argparse.Namespace, listen: str, cpu: dict[str, float]) -> Result:
    from agent.inference.openai import OpenAIBackend

    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", "serve-model", "--model", args.model, "--listen", listen, "--workers", "1",
        "--max-batch", str(args.sessions), "--max-queue", str(4 * args.sessions + 8))
    try:
        async with asyncio.timeout(600):
            while not _reachable(listen):
                if server.returncode is not None:
                    raise RuntimeError(f"serve-model exited with {server.returncode}")
                await asyncio.sleep(0.2)
        url = listen if listen.startswith("unix://") else f"http://{listen[len('tcp://'):]}/v1"
        backend = OpenAIBackend(url, args.model)
        await backend.start()
        try:
            await warm(backend)
            before = snapshot(os.getpid(), server.pid)
            engine_before = await engine_ttft(backend)
            result = await run_pool(backend, workload(args))
            after = snapshot(os.getpid(), server.pid)
            engine_after = await engine_ttft(backend)
            for part in CPU:
                cpu[part] += after[part] - before[part]
            cpu["engine_ttft_sum"] += engine_after[0] - engine_before[0]
            cpu["engine_ttft_count"] += engine_after[1] - engine_before[1]
            return result
        finally:
            await backend.close()
    finally:
        if server.returncode is None:
            server.terminate()
        await server.wait()


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the workers of both paths alike
    local, wire = Result(), Result()
    local_cpu, wire_cpu = dict.fromkeys(CPU, 0.0), dict.fromkeys((*CPU, "engine_ttft_sum", "engine_ttft_count"), 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        listen = args.listen or f"unix://{Path(tmp) / 'model.sock'}"
        transport = listen.split("://")[0]
        for _ in range(args.repeats):  # alternating, so drift in the machine's load hits both
            pool(local, asyncio.run(in_process(args, local_cpu)))
            pool(wire, asyncio.run(served(args, listen, wire_cpu)))
    a, b = summary(local, local_cpu), summary(wire, wire_cpu)
    ratio = round(wire.tokens_per_s / local.tokens_per_s, 3) if local.tokens_per_s else None
    added = (pct(wire.ttft, 50) or 0) - (pct(local.ttft, 50) or 0)
    result = {"workload": {"model": args.model, "sessions": args.sessions, "turns": args.turns,
                           "audio_s": list(args.audio), "answer_tokens": list(args.answer), "seed": args.seed,
                           "repeats": args.repeats, "transport": transport},
              "in_process": a, "served": b, "ttft_p50_added_s": round(added, 4), "tokens_per_s_ratio": ratio,
              "target_met": ratio is not None and ratio >= args.min_ratio}
    result["target_held"] = result["target_met"]  # deprecated name
    assert tuple(result) == KEYS
    print(f"model server benchmark · {args.model} · {args.sessions} sessions × {args.turns} turns · "
          f"serve-model over {transport} · {args.repeats} runs of each, pooled")
    print(f"  {'':14}{'tokens/s':>10}{'TTFT p50':>10}{'TTFT p95':>10}{'ITL p50':>10}{'tokens':>8}"
          f"   CPU ms/token: caller, server, workers")
    for name, r in (("in-process", a), ("serve-model", b)):
        c = r["cpu_ms_per_token"]
        print(f"  {name:14}{r['tokens_per_s']:>10.1f}{r['delivered_ttft_p50_s'] or 0:>10.3f}"
              f"{r['delivered_ttft_p95_s'] or 0:>10.3f}{1e3 * (r['itl_p50_s'] or 0):>8.1f}ms{r['tokens']:>8}"
              f"   {c['caller']:.2f}, {c['server']:.2f}, {c['workers']:.2f}")
    print(f"  served/in-process tokens/s ×{ratio}; TTFT p50 {added * 1e3:+.1f} ms over the wire; served TTFT mean "
          f"{1e3 * (b['ttft_mean_s'] or 0):.1f} ms at the caller, {1e3 * (b['engine_ttft_mean_s'] or 0):.1f} ms in the engine")
    if args.json:
        print(json.dumps(result))
    return 0 if result["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
