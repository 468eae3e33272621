"""One suite on several models, side by side (`voice-agent eval SUITE --model A --model B`):
a figures table (pass rate, WER in analysis mode, tool-call and analysis accuracy, latency),
then each case's result and answer per model, as text and as one self-contained HTML page."""

from __future__ import annotations

import base64
import html
from typing import Any

import numpy as np

from agent.eval.report import _CSS, _fmt
from agent.model.qwen2_audio import to_wav_bytes

# (label, how to read it from a report, kind): kind "pct", "ms" or "ratio"
ROWS: list[tuple[str, str, str]] = [
    ("cases passed", "pass_rate", "pct"),
    ("WER (analysis mode)", "wer", "pct"),
    ("tool-call accuracy", "tool_call_accuracy", "pct"),
    ("analysis accuracy", "analysis_accuracy", "pct"),
    ("answer accuracy (chat)", "answer_accuracy", "pct"),
    ("turn accuracy", "turn_accuracy", "pct"),
    ("first token p50", "latency.first_token_s.p50", "ms"),
    ("first token p95", "latency.first_token_s.p95", "ms"),
    ("first audio p50", "latency.first_audio_s.p50", "ms"),
]


def figure(report: dict[str, Any], key: str) -> float | None:
    if key == "pass_rate":
        return report["passed"] / report["total"] if report["total"] else None
    value: Any = report
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return float(value) if isinstance(value, int | float) else None


def family_title(model: str | None) -> str:
    """The model's family (from its checkpoint's model_type), or "" when it cannot be read here."""
    if not model:
        return ""
    try:
        from agent.inference import models

        if model == models.RANDOM_7B:
            return "Qwen2-Audio"
        return models.family_of(models.source_dir(model), model).title
    except Exception:
        return ""


def _name(report: dict[str, Any]) -> str:
    return str(report.get("model_arg") or report["model"])


def models_text(reports: list[dict[str, Any]]) -> str:
    names = [_name(r) for r in reports]
    width = max(len(label) for label, _, _ in ROWS) + 2
    cols = [max(len(n), 10) + 2 for n in names]
    lines = [f"suite {reports[0]['suite']} on {len(reports)} models",
             " " * width + "".join(n.ljust(c) for n, c in zip(names, cols, strict=True))]
    for label, key, kind in ROWS:
        cells = [_fmt(figure(r, key), pct=kind == "pct", ms=kind == "ms") for r in reports]
        lines.append(label.ljust(width) + "".join(v.ljust(c) for v, c in zip(cells, cols, strict=True)))
    ids = [c["id"] for c in reports[0]["cases"]]
    by_model = [{c["id"]: c for c in r["cases"]} for r in reports]
    for case in ids:
        cells = [("PASS" if m[case]["passed"] else "FAIL") if case in m else "–" for m in by_model]
        lines.append(f"  {case}".ljust(width) + "".join(v.ljust(c) for v, c in zip(cells, cols, strict=True)))
    return "\n".join(lines)


def _best(values: list[float | None], higher: bool) -> int | None:
    known = [(v, i) for i, v in enumerate(values) if v is not None]
    if len(known) < 2:
        return None
    best = (max(known) if higher else min(known))[0]
    winners = [i for v, i in known if v == best]
    return winners[0] if len(winners) == 1 else None  # a tie marks nothing


def models_html(reports: list[dict[str, Any]], audios: dict[str, np.ndarray] | None = None) -> str:
    e = html.escape
    names = [_name(r) for r in reports]
    head = "".join(f"<th>{e(n)}<br><small>{e(family_title(n))}</small></th>" for n in names)
    rows = []
    for label, key, kind in ROWS:
        values = [figure(r, key) for r in reports]
        best = _best(values, higher=kind == "pct" and key != "wer")
        cells = "".join(f'<td{" class=pass" if i == best else ""}>{_fmt(v, pct=kind == "pct", ms=kind == "ms")}</td>'
                        for i, v in enumerate(values))
        rows.append(f"<tr class=figure><th>{e(label)}</th>{cells}</tr>")
    by_model = [{c["id"]: c for c in r["cases"]} for r in reports]
    cases = []
    for case in [c["id"] for c in reports[0]["cases"]]:
        clip = (audios or {}).get(case)
        player = ""
        if clip is not None:
            data = base64.b64encode(to_wav_bytes(clip)).decode()
            player = f'<br><audio controls preload="metadata" src="data:audio/wav;base64,{data}"></audio>'
        columns: list[str] = []
        for m in by_model:
            r = m.get(case)
            if r is None:
                columns.append("<td>–</td>")
                continue
            verdict = f'<span class="{"pass" if r["passed"] else "fail"}">{"pass" if r["passed"] else "FAIL"}</span>'
            why = "".join(f"<li>{e(f)}</li>" for f in r["failures"])
            calls = "<br>".join(f"<code>{e(c['name'])}</code>" for c in r["tool_calls"])
            answer = e(" / ".join(a.strip() for a in r["answers"]))
            columns.append(f"<td>{verdict}{'<ul>' + why + '</ul>' if why else ''}<br>{answer}"
                         f"{'<br>' + calls if calls else ''}</td>")
        cases.append(f'<tr class="case" id="case-{e(case)}"><td>{e(case)}{player}</td>{"".join(columns)}</tr>')
    title = f"{reports[0]['suite']}: {' vs '.join(names)}"
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{e(title)} — voice-agent eval</title>"
            f"<style>{_CSS}</style></head><body><h1>{e(reports[0]['suite'])}</h1>"
            f"<p>{len(reports)} models, the same cases (best figure in green)</p>"
            f"<table><thead><tr><th></th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
            f"<h2>Cases</h2><table><thead><tr><th>case</th>{head}</tr></thead><tbody>{''.join(cases)}</tbody>"
            "</table></body></html>")
