"""`bench inference --quick --json`: the whole benchmark small; its figures are sane, its exit
status says whether its targets were met, and the README table comes from its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.bench.inference import KEYS
from agent.bench.inference_report import markdown, met

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def bench(*args: str) -> tuple[int, list[str], dict]:
    out = subprocess.run([sys.executable, "-m", "agent.bench.inference", "--quick", "--json", *args],
                         capture_output=True, text=True, timeout=600, env=ENV)
    assert out.returncode in (0, 1), out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    return out.returncode, lines, json.loads(lines[-1])


def sane_row(row: dict) -> None:
    assert row["tokens_per_s"] > 0 and 0 < row["ttft_p50_s"] <= row["ttft_p95_s"] < 60, row


@pytest.mark.timeout(900)  # the pool four times (ablations) and both baselines, on a shared machine
def test_bench_inference_quick_figures_are_sane_and_the_exit_status_is_the_targets(tmp_path: Path) -> None:
    rc, lines, result = bench()
    assert tuple(result) == KEYS  # exactly these keys, in this order, whatever the options
    w = result["workload"]
    assert w["sessions"] == 4 and w["quick"] is True and w["spec_lead_s"] > 0  # speculative prefill in the workload
    assert 4 * w["requests"] <= w["tokens"] <= 10 * w["requests"]  # answers of 4–10 tokens, each exactly its length
    assert result["threads_equal"] is True and w["worker_threads"] == w["torch_threads"] == 1
    assert result["kv_budget_tokens"] > 0
    assert 0 < result["encoder_ms_5s"] < result["encoder_ms_30s"]  # the real-length encoder is the cheaper
    assert 0 < result["delivered_ttft_p50_s"] <= result["delivered_ttft_p95_s"]
    assert 0 < result["itl_p50_s"] <= result["itl_p95_s"] and result["turn20_over_turn1"] > 0
    assert result["speedup_vs_sequential"] > 0 and result["speedup_vs_static_batch"] > 0
    assert len(result["rows"]) == 8  # pool, 2 baselines, equal batch, 3 ablations, the pool again (drift)
    for row in result["rows"].values():
        sane_row(row)
    assert result["equal_batch"]["batch"] == 4 and result["equal_batch"]["speedup"] > 0
    assert set(result["ablations"]) == {"no_batching", "padded_encoder", "no_kv_reuse"}
    assert all(a["speedup_from_it"] > 0 for a in result["ablations"].values())
    assert result["vs_vllm"] is None  # not asked for
    targets = result["targets"]
    assert set(targets) == {"turn20_over_turn1", "delivered_ttft_p95_s", "threads_equal"}
    assert rc == (0 if all(t["met"] for t in targets.values()) else 1)
    assert targets["turn20_over_turn1"]["met"] == (result["turn20_over_turn1"] <= 1.2)
    assert all(t["held"] == t["met"] for t in targets.values())  # the deprecated name, same value
    # the README table is generated from the JSON, the same as the run printed
    saved = tmp_path / "result.json"
    saved.write_text(lines[-1])
    table = subprocess.run([sys.executable, "-m", "agent.bench.inference", "--markdown", str(saved)],
                           capture_output=True, text=True, timeout=60, env=ENV)
    assert table.returncode == 0 and table.stdout.strip() == markdown(result)
    assert f"| pool (delivered) | {result['tokens_per_s']:.1f} |" in table.stdout
    assert table.stdout.strip() in "\n".join(lines)


def test_bench_inference_without_baselines_or_ablations_keeps_every_key() -> None:
    _, _, bare = bench("--no-baselines", "--no-ablations", "--history-turns", "2")
    assert tuple(bare) == KEYS and bare["speedup_vs_sequential"] is None and bare["speedup_vs_static_batch"] is None
    assert bare["equal_batch"] is None and bare["ablations"] is None and list(bare["rows"]) == ["pool (delivered)"]
    sane_row(bare["rows"]["pool (delivered)"])


def test_results_saved_before_the_rename_still_read() -> None:
    assert met({"value": 1.0, "max": 2.0, "held": True}) and not met({"value": 3.0, "max": 2.0, "held": False})
    assert met({"value": 1.0, "max": 2.0, "met": True, "held": True})
    saved = json.loads((Path(__file__).parent.parent / "bench-results" / "inference-16-sessions.json").read_text())
    table = markdown(saved)
    assert "| target | value | bound | met |" in table and "| threads_equal | True | true | yes |" in table
