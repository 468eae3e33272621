"""`voice-agent bench restart`: how long a conversation waits for its next answer after the
inference worker serving it is killed, with 1 worker and with more.

With one worker the next answer waits for the replacement: process spawn, imports and the
model load. With two or more, the pool routes the conversation to a live worker at once (its
history is prefilled again there): the second worker is the warm standby. Each kill is a
SIGKILL of the worker that holds the conversation; the figure is from the kill to the end of
the next complete answer, turns retried every 50 ms (failed tries counted). JSON written to
`--out` (default bench-results/restart.json). Figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.inference.base import GenerationRequest, InferenceError
from agent.inference.pool import InferencePool


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="voice-agent bench restart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="pool sizes to compare (default: 1 2)")
    p.add_argument("--kills", type=int, default=3, help="kills per pool size (default 3)")
    p.add_argument("--out", default="bench-results/restart.json")
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    return p.parse_args(argv)


def _request(turn: int) -> GenerationRequest:
    audio = (np.random.RandomState(turn).randn(16000) * 0.1).astype(np.float32)
    return GenerationRequest("bench", str(turn), [{"role": "user", "content": [{"type": "audio", "audio": 0}]}],
                             [audio], 8)


async def _answer(pool: InferencePool, turn: int) -> None:
    async for _ in pool.generate(_request(turn)):
        pass


async def _settle(pool: InferencePool, workers: int) -> None:
    for _ in range(6000):
        if pool.healthy and pool.workers_live >= workers:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the pool did not get {workers} live workers back")


async def _one(model: str, workers: int, kills: int) -> dict[str, Any]:
    # no backoff: kills a few seconds apart would otherwise count as a crash loop (1 s, 2 s, …)
    pool = InferencePool(model, workers=workers, restart_backoff_s=(0.0, 0.0))
    await pool.start()
    gaps, failed, turn = [], 0, 0
    try:
        for _ in range(kills):
            await _settle(pool, workers)  # all back before the next kill
            turn += 1
            await _answer(pool, turn)  # the conversation now sits on one worker
            victim = pool._workers[pool._sessions["bench"]].process.pid
            killed = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            while True:
                turn += 1
                try:
                    await _answer(pool, turn)
                    break
                except InferenceError:
                    failed += 1
                    await asyncio.sleep(0.05)
            gaps.append(time.monotonic() - killed)
    finally:
        await pool.close()
    return {"workers": workers, "kills": kills, "next_answer_s": [round(g, 3) for g in gaps],
            "median_s": round(statistics.median(gaps), 3), "failed_tries": failed}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    results = [asyncio.run(_one(args.model, n, args.kills)) for n in args.workers]
    report = {"benchmark": "restart", "model": args.model, "cpus": os.cpu_count(), "results": results}
    for r in results:
        print(f"{r['workers']} worker(s): next answer {r['median_s']:.2f} s after a kill (median of {r['kills']}; "
              f"{r['failed_tries']} failed tries)", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report))
    return 0
