"""`voice-agent bench soak` runs end to end (a real `serve` subprocess, aiortc peers) and ends
with one JSON object carrying the figures the issue asks for (no thresholds asserted here:
the benchmark reports them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_soak_json_last_line() -> None:
    out = subprocess.run([sys.executable, "-m", "agent.cli", "bench", "soak", "--cycles", "5", "--concurrency", "2",
                          "--flood-peers", "1", "--flood-seconds", "2", "--flood-rounds", "1", "--json"],
                         capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    r = json.loads(lines[-1])
    assert r["benchmark"] == "soak" and r["cycles"] == 5 and r["warmup_cycles"] >= 1
    for key in ("rss_growth_mb", "fd_growth", "thread_growth", "task_growth", "failures"):
        assert isinstance(r[key], (int, float)), key
    assert sum(r["outcomes"].values()) == 5 and r["failures"] == 5 - r["outcomes"].get("answered", 0)
    assert r["outcomes"].get("answered", 0) >= 1  # real turns were answered over WebRTC
    base = r["baseline"]
    assert base["processes"] >= 2 and base["workers_rss_mb"] > 0  # the inference worker is counted
    assert base["rss_mb"] >= base["server_rss_mb"] + base["workers_rss_mb"] - 0.2 and base["tasks"] > 0
    assert base["sessions"] == 0 and r["end"]["sessions"] == 0  # measured with every session closed
    assert len(r["flood"]["rounds"]) == 1 and r["flood"]["outcomes"] == {"flooded": 1}
    assert r["timeline"] and r["timeline"][-1]["cycles"] == 5
    assert any(line.startswith("growth: RSS") for line in lines)
