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
    wire = result.get("like_for_like")
    if result["workload"].get("compare_vllm") and not wire:  # asked for, not measured: not met
        out["ttft_p95_vs_vllm"] = {"value": None, "max": None, "met": False}
    if wire:  # like for like: serve-model's delivered TTFT p95 at the full load no worse than vLLM's
        point = wire["points"][-1]
        ours, theirs = point["serve_model"]["ttft_p95_s"], point["vllm"]["ttft_p95_s"]
        out["ttft_p95_vs_vllm"] = {"value": ours, "max": theirs, "met": ours is not None and theirs is not None
                                   and ours <= theirs}
        if wire.get("threads_equal") is not None:
            out["threads_equal_like_for_like"] = {"value": wire["threads_equal"], "met": wire["threads_equal"] is True}
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


def _range(spread: dict[str, Any] | None, key: str) -> str:
    """A figure's spread over runs: "min–max" (ms, or tokens/s)."""
    fig = (spread or {}).get(key)
    if not fig or (spread or {}).get("runs", 0) < 2:
        return "–"
    if key == "tokens_per_s":
        return f"{fig['min']:.0f}–{fig['max']:.0f}"
    return f"{fig['min'] * 1e3:.0f}–{fig['max'] * 1e3:.0f}"


def _table(rows: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| path | tokens/s (runs) | TTFT p50 | TTFT p95 (runs) | TTFT p99 (runs) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, row in rows.items():
        sp = row.get("spread")
        lines.append(f"| {name} | {_num(row['tokens_per_s'])} ({_range(sp, 'tokens_per_s')}) | {_ms(row['ttft_p50_s'])} | "
                     f"{_ms(row['ttft_p95_s'])} ({_range(sp, 'ttft_p95_s')}) | "
                     f"{_ms(row.get('ttft_p99_s'))} ({_range(sp, 'ttft_p99_s')}) |")
    return lines


def markdown(result: dict[str, Any]) -> str:
    """The README's figures, from one result: pooled over runs, each run's min–max in brackets."""
    w = result["workload"]
    lines = [f"`bench inference` · {w['model']} on {w['device']} · {w['sessions']} sessions × {w['turns']} turns · "
             f"{w.get('repeats', 1)} runs each · torch threads {w['torch_threads']} (worker: {w.get('worker_threads')}, "
             f"threads_equal: {str(result['threads_equal']).lower()}) · seed {w['seed']}", ""]
    wire = result.get("like_for_like")
    if wire:
        lines += [f"**Like for like** ({wire['comparison']}): {wire['wire']}; client {wire['client']}; "
                  f"{wire['checkpoint']}; speculative prefill: {wire['speculative_prefill']}; threads "
                  f"{wire['threads']} (equal: {str(wire['threads_equal']).lower()}).", ""]
        named: dict[str, dict[str, Any]] = {}
        for p in wire["points"]:
            named |= {f"serve-model, {p['sessions']} sessions": p["serve_model"], f"vLLM, {p['sessions']} sessions": p["vllm"]}
        lines += _table(named)
        t = wire["turn20_over_turn1"]
        lines += ["", f"- turn 20 over turn 1: serve-model ×{_num(t['serve_model'], '{:.2f}')}, "
                  f"vLLM ×{_num(t['vllm'], '{:.2f}')}", ""]
        lines += ["**In process** (a separate comparison: no wire, speculative prefill "
                  f"{w['spec_lead_s']} s before each commit):", ""]
    lines += _table(result["rows"])
    runs = result.get("turn20_over_turn1_runs") or {}
    lines += ["", f"- turn 20 over turn 1 (delivered TTFT, 20-turn voice chats, ratio of medians): "
              f"×{_num(result['turn20_over_turn1'], '{:.2f}')}"
              + (f" (per chat {runs['min']:.2f}–{runs['max']:.2f} over {runs['runs']})" if runs else ""),
              f"- audio encoder, 5 s clip: {_num(result['encoder_ms_5s'])} ms at real length, "
              f"{_num(result['encoder_ms_30s'])} ms padded to 30 s"]
    tails = {k: v for k, v in (result.get("tails") or {}).items() if v}
    if tails:
        lines += ["", "Turns at or above TTFT p95 against all turns (medians; engine queue and prefill, the rest "
                  "outside the engine):", "",
                  "| run | turns | TTFT | queue | prefill | outside | prompt / reused tokens | continued speculation |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, t in tails.items():
            for part in ("tail", "all"):
                x = t[part]
                lines.append(f"| {name}, {part} | {x['requests']} | {_ms(x['ttft_s'])} | {_ms(x['queue_s'])} | "
                             f"{_ms(x['prefill_s'])} | {_ms(x['outside_engine_s'])} | {_num(x['prompt_tokens'], '{:.0f}')}"
                             f" / {_num(x['reused_tokens'], '{:.0f}')} | {x['continued_speculation']:.0%} |")
    lines += ["", "| target | value | bound | met |", "| --- | ---: | ---: | --- |"]
    for name, t in result["targets"].items():
        bound = t.get("max", t.get("min", "true"))
        lines.append(f"| {name} | {t['value']} | {bound} | {'yes' if met(t) else '**no**'} |")
    return "\n".join(lines)


def load(path: str | Path) -> dict[str, Any]:
    """A result from a file holding the JSON object, or a whole run's output (its last line)."""
    text = Path(path).read_text().strip()
    try:
        result = json.loads(text)  # a file `--output` wrote
    except json.JSONDecodeError:
        result = json.loads(text.splitlines()[-1])  # a run's output: its last line
    if not isinstance(result, dict) or "workload" not in result:
        raise ValueError(f"{path}: not a `bench inference --json` result")
    return result
