"""`bench inference --quick --json` runs the whole benchmark small and ends with its JSON keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from agent.bench.inference import KEYS


def test_bench_inference_quick_json_last_line() -> None:
    out = subprocess.run([sys.executable, "-m", "agent.bench.inference", "--quick", "--json"], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert tuple(result) == KEYS  # exactly these keys, in this order, whatever the options
    assert all(result[k] is not None for k in KEYS), result  # quick still measures everything
    assert result["workload"]["sessions"] == 4 and result["workload"]["quick"] is True
    assert result["workload"]["tokens"] > 0 and result["kv_budget_tokens"] > 0
    assert result["encoder_ms_5s"] > 0 and result["encoder_ms_30s"] > 0
    assert result["delivered_ttft_p50_s"] <= result["delivered_ttft_p95_s"]
    assert any(line.startswith("  sequential generate") for line in lines)
    # no baselines: their fields are null, never missing
    out = subprocess.run([sys.executable, "-m", "agent.bench.inference", "--quick", "--no-baselines",
                          "--history-turns", "2", "--json"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    bare = json.loads(out.stdout.strip().splitlines()[-1])
    assert tuple(bare) == KEYS and bare["speedup_vs_sequential"] is None and bare["speedup_vs_static_batch"] is None
