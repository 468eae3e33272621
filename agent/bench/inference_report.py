"""`bench inference`'s targets and its README table, both read from the result JSON.

The table is generated, never typed: `voice-agent bench inference --markdown RESULT.json`
prints it from a saved `--json` line (the last line of a run's output works as is).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# name → (result key path, bound, "max" | "min"); issue 19's targets at 16 sessions.
TARGETS: dict[str, tuple[tuple[str, ...], float, str]] = {
    "turn20_over_turn1": (("turn20_over_turn1",), 1.2, "max"),
    "delivered_ttft_p95_s": (("delivered_ttft_p95_s",), 0.5, "max"),
}


def _get(result: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = result
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def targets(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target with its value and whether it was met (a figure not measured is not met).
    Each also carries `held`, the deprecated name of `met` (same value; results written
    before the rename have only `held`: read them with `met()`)."""
    out: dict[str, dict[str, Any]] = {}
    for name, (path, bound, kind) in TARGETS.items():
        value = _get(result, path)
        out[name] = {"value": value, kind: bound, "met": value is not None and (value <= bound if kind == "max"
                                                                                 else value >= bound)}
    if result.get("threads_equal") is not None:  # null: a server given by URL, its threads its own
        out["threads_equal"] = {"value": result["threads_equal"], "met": result["threads_equal"] is True}
    vs = result.get("vs_vllm")
    if result["workload"].get("compare_vllm") and not vs:  # asked for, not measured: not met
        out["ttft_p95_vs_vllm"] = {"value": None, "max": None, "met": False}
    if vs:  # our delivered TTFT p95 at the full load no worse than vLLM's on the same checkpoint
        point = vs["points"][-1]
        ours, theirs = point["ours"]["ttft_p95_s"], point["vllm"]["ttft_p95_s"]
        out["ttft_p95_vs_vllm"] = {"value": ours, "max": theirs, "met": ours is not None and theirs is not None
                                   and ours <= theirs}
    for target in out.values():
        target["met"] = bool(target["met"])
        target["held"] = target["met"]  # deprecated name of `met`
    return out


def met(target: dict[str, Any]) -> bool:
    """Whether a target of a result was met (results written before the rename: `held`)."""
    return bool(target["met"] if "met" in target else target["held"])


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value * 1e3:.0f} ms"


def _num(value: float | None, fmt: str = "{:.1f}") -> str:
    return "–" if value is None else fmt.format(value)


def markdown(result: dict[str, Any]) -> str:
    """The README's figures, from one result."""
    w = result["workload"]
    lines = [f"`bench inference` · {w['model']} on {w['device']} · {w['sessions']} sessions × {w['turns']} turns · "
             f"torch threads {w['torch_threads']} (worker: {w.get('worker_threads')}, threads_equal: "
             f"{str(result['threads_equal']).lower()}) · seed {w['seed']}", "",
             "| path | tokens/s | TTFT p50 | TTFT p95 |", "| --- | ---: | ---: | ---: |"]
    for name, row in result["rows"].items():
        lines.append(f"| {name} | {_num(row['tokens_per_s'])} | {_ms(row['ttft_p50_s'])} | {_ms(row['ttft_p95_s'])} |")
    lines += ["", f"- turn 20 over turn 1 (delivered TTFT, one 20-turn voice chat): "
              f"×{_num(result['turn20_over_turn1'], '{:.2f}')}",
              f"- audio encoder, 5 s clip: {_num(result['encoder_ms_5s'])} ms at real length, "
              f"{_num(result['encoder_ms_30s'])} ms padded to 30 s"]
    vs = result.get("vs_vllm")
    if vs:
        lines += ["", f"Against {vs['server']} on the same checkpoint, machine and threads ({vs['threads']}):", "",
                  "| sessions | ours tokens/s | vLLM tokens/s | ours TTFT p50 / p95 | vLLM TTFT p50 / p95 |",
                  "| ---: | ---: | ---: | ---: | ---: |"]
        for p in vs["points"]:
            o, v = p["ours"], p["vllm"]
            lines.append(f"| {p['sessions']} | {_num(o['tokens_per_s'])} | {_num(v['tokens_per_s'])} | "
                         f"{_ms(o['ttft_p50_s'])} / {_ms(o['ttft_p95_s'])} | {_ms(v['ttft_p50_s'])} / "
                         f"{_ms(v['ttft_p95_s'])} |")
        lines.append(f"| turn 20 / turn 1 | ×{_num(vs['ours_turn20_over_turn1'], '{:.2f}')} | "
                     f"×{_num(vs['vllm_turn20_over_turn1'], '{:.2f}')} | | |")
    lines += ["", "| target | value | bound | met |", "| --- | ---: | ---: | --- |"]
    for name, t in result["targets"].items():
        bound = t.get("max", t.get("min", "true"))
        lines.append(f"| {name} | {t['value']} | {bound} | {'yes' if met(t) else '**no**'} |")
    return "\n".join(lines)


def load(path: str | Path) -> dict[str, Any]:
    """A result from a file holding the JSON object, or a whole run's output (its last line)."""
    text = Path(path).read_text().strip()
    result = json.loads(text.splitlines()[-1])
    if not isinstance(result, dict) or "workload" not in result:
        raise ValueError(f"{path}: not a `bench inference --json` result")
    return result
