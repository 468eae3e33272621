"""A suite run's figures and its reports: text, JSON, JUnit XML, HTML; and comparing two runs.

Plots are drawn with matplotlib (the standard Python plotting library; its Agg/SVG backends
need no display) as SVG inlined in the HTML, and the audio is inlined as WAV data, so the
report is one self-contained file with no JavaScript.
"""

from __future__ import annotations

import base64
import html
import io
import json
import xml.etree.ElementTree as ET
from typing import Any

import numpy as np

from agent.eval.metrics import percentile
from agent.model.qwen2_audio import to_wav_bytes

REPORT_VERSION = 1


def _accuracy(results: list[dict[str, Any]], check: str, analysis: bool | None = None) -> float | None:
    got = [r["checks"][check]["passed"] for r in results if check in r["checks"]
           and (analysis is None or r["checks"][check].get("analysis") == analysis)]
    return sum(got) / len(got) if got else None


def _latency(values: list[float]) -> dict[str, Any]:
    return {"p50": percentile(values, 50), "p95": percentile(values, 95), "n": len(values)}


def summarise(suite_name: str, results: list[dict[str, Any]], backend: str, model: str) -> dict[str, Any]:
    """The JSON report: figures over all cases, then each case."""
    transcripts = [r["checks"]["transcript"] for r in results if "transcript" in r["checks"]]
    words = sum(t["words"] for t in transcripts)
    errors = sum(t["errors"] for t in transcripts)
    first_token = [t for r in results for t in r["first_token_s"]]
    first_audio = [t for r in results for t in r["first_audio_s"]]
    return {
        "version": REPORT_VERSION, "suite": suite_name, "backend": backend, "model": model,
        "total": len(results), "passed": sum(r["passed"] for r in results),
        "failed": sum(not r["passed"] for r in results),
        "wer": (errors / words if words else None) if transcripts else None,  # over all transcript cases' words
        "tool_call_accuracy": _accuracy(results, "tool_call"),
        "analysis_accuracy": _accuracy(results, "answer", analysis=True),
        "answer_accuracy": _accuracy(results, "answer", analysis=False),
        "turn_accuracy": _accuracy(results, "turns"),
        "latency": {"first_token_s": _latency(first_token), "first_audio_s": _latency(first_audio)},
        "cases": results,
    }


def _fmt(value: float | None, pct: bool = False, ms: bool = False) -> str:
    if value is None:
        return "–"
    if pct:
        return f"{value * 100:.1f}%"
    return f"{value * 1000:.0f} ms" if ms else f"{value:.3f}"


def figure_lines(report: dict[str, Any]) -> list[str]:
    lat = report["latency"]
    return [
        f"cases: {report['passed']}/{report['total']} passed",
        f"WER: {_fmt(report['wer'], pct=True)}   tool-call accuracy: {_fmt(report['tool_call_accuracy'], pct=True)}"
        f"   analysis accuracy: {_fmt(report['analysis_accuracy'], pct=True)}"
        f"   answer accuracy: {_fmt(report['answer_accuracy'], pct=True)}"
        f"   turn accuracy: {_fmt(report['turn_accuracy'], pct=True)}",
        f"time to first token p50/p95: {_fmt(lat['first_token_s']['p50'], ms=True)} / "
        f"{_fmt(lat['first_token_s']['p95'], ms=True)}   time to first audio p50/p95: "
        f"{_fmt(lat['first_audio_s']['p50'], ms=True)} / {_fmt(lat['first_audio_s']['p95'], ms=True)}",
    ]


def text_report(report: dict[str, Any]) -> str:
    lines = [f"suite {report['suite']} ({report['backend']}, {report['model']})"]
    for r in report["cases"]:
        lines.append(f"  {'PASS' if r['passed'] else 'FAIL'}  {r['id']}")
        lines += [f"        {f}" for f in r["failures"]]
    return "\n".join(lines + figure_lines(report))


# ---- JUnit ---------------------------------------------------------------------------------
def junit_xml(report: dict[str, Any]) -> bytes:
    """One <testsuite>, one <testcase> per case, a <failure> with the reasons (what CI systems read)."""
    total_time = sum(r["wall_s"] for r in report["cases"])
    root = ET.Element("testsuites", name="voice-agent eval", tests=str(report["total"]),
                      failures=str(report["failed"]), time=f"{total_time:.3f}")
    suite = ET.SubElement(root, "testsuite", name=report["suite"], tests=str(report["total"]),
                          failures=str(report["failed"]), errors="0", skipped="0", time=f"{total_time:.3f}")
    props = ET.SubElement(suite, "properties")
    for key in ("backend", "model", "wer", "tool_call_accuracy", "analysis_accuracy", "turn_accuracy"):
        ET.SubElement(props, "property", name=key, value=str(report[key]))
    for r in report["cases"]:
        case = ET.SubElement(suite, "testcase", classname=report["suite"], name=r["id"], time=f"{r['wall_s']:.3f}")
        if not r["passed"]:
            failure = ET.SubElement(case, "failure", message=r["failures"][0], type="expectation")
            failure.text = "\n".join(r["failures"])
        ET.SubElement(case, "system-out").text = json.dumps({"answers": r["answers"], "tool_calls": r["tool_calls"],
                                                              "turns": r["turns"]}, ensure_ascii=False)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


# ---- HTML ----------------------------------------------------------------------------------
def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and doctype: inlined in HTML


def latency_plots(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(title, inline SVG): latency per case, and the distribution over all turns."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    cases = report["cases"]
    names = [r["id"] for r in cases]
    plots = []
    fig = Figure(figsize=(8, 0.35 * len(cases) + 1.4))
    ax = fig.subplots()
    y = np.arange(len(cases))
    token = [max(r["first_token_s"], default=0) * 1000 for r in cases]
    audio = [max(r["first_audio_s"], default=0) * 1000 for r in cases]
    ax.barh(y - 0.2, token, height=0.4, label="first token (slowest turn)", color="#4c78a8")
    if any(audio):
        ax.barh(y + 0.2, audio, height=0.4, label="first audio (slowest turn)", color="#f58518")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("ms after the turn's commit")
    ax.legend(loc="lower right", fontsize="small")
    plots.append(("Latency per case", _svg(fig)))

    fig = Figure(figsize=(8, 3))
    ax = fig.subplots()
    for key, label, color in (("first_token_s", "first token", "#4c78a8"), ("first_audio_s", "first audio", "#f58518")):
        values = sorted(t * 1000 for r in cases for t in r[key])
        if values:
            ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=label, color=color)
            for q, style in ((50, ":"), (95, "--")):
                ax.axvline(float(np.percentile(values, q)), color=color, linestyle=style, linewidth=1)
    ax.set_xlabel("ms after the turn's commit (dotted: p50, dashed: p95)")
    ax.set_ylabel("share of turns")
    ax.set_ylim(0, 1.05)
    if ax.get_legend_handles_labels()[0]:  # no answered turn: nothing to label
        ax.legend(loc="lower right", fontsize="small")
    plots.append(("Latency over all turns", _svg(fig)))
    return plots


_CSS = """body{font:14px system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;width:100%}
td,th{border:1px solid #ddd;padding:6px;vertical-align:top;text-align:left}th{background:#f4f4f4}
.pass{color:#1a7f37;font-weight:600}.fail{color:#cf222e;font-weight:600}.figs span{margin-right:2em}
.plot{margin:1em 0}.plot svg{max-width:100%;height:auto}ul{margin:0;padding-left:1.2em}code{font-size:12px}"""


def html_report(report: dict[str, Any], audios: dict[str, np.ndarray] | None = None) -> str:
    """One self-contained page: figures, a table of cases with their audio, latency plots."""
    e = html.escape
    rows = []
    for r in report["cases"]:
        clip = (audios or {}).get(r["id"])
        player = ""
        if clip is not None:
            data = base64.b64encode(to_wav_bytes(clip)).decode()
            player = f'<audio controls preload="metadata" src="data:audio/wav;base64,{data}"></audio>'
        t = r["checks"].get("transcript")
        transcript = (f"WER {t['wer'] * 100:.1f}%<br><code>{e(t['hypothesis'])}</code><br>expected "
                      f"<code>{e(t['reference'])}</code>") if t else ""
        calls = "<br>".join(f"<code>{e(c['name'])}({e(json.dumps(c['arguments'], ensure_ascii=False))})</code>"
                            for c in r["tool_calls"])
        failures = "".join(f"<li>{e(f)}</li>" for f in r["failures"])
        latency = ", ".join(f"{t * 1000:.0f}" for t in r["first_token_s"])
        rows.append(
            f'<tr class="case" id="case-{e(r["id"])}"><td>{e(r["id"])}</td>'
            f'<td class="{"pass" if r["passed"] else "fail"}">{"pass" if r["passed"] else "FAIL"}'
            f'{"<ul>" + failures + "</ul>" if failures else ""}</td><td>{player}</td>'
            f'<td>{e(" / ".join(a.strip() for a in r["answers"]))}</td><td>{calls}</td><td>{transcript}</td>'
            f'<td>{len(r["turns"])}</td><td>{latency}</td></tr>')
    figures = "<br>".join(" · ".join(e(part) for part in line.split("   ")) for line in figure_lines(report))
    plots = "".join(f'<div class="plot"><h3>{e(title)}</h3>{svg}</div>' for title, svg in latency_plots(report))
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{e(report['suite'])} — voice-agent eval"
            f"</title><style>{_CSS}</style></head><body><h1>{e(report['suite'])}</h1>"
            f"<p>backend {e(report['backend'])}, model {e(report['model'])}</p><p class=figs>{figures}</p>"
            "<table><thead><tr><th>case</th><th>result</th><th>audio</th><th>answer</th><th>tool calls</th>"
            "<th>transcript</th><th>turns</th><th>first token (ms)</th></tr></thead><tbody>"
            f"{''.join(rows)}</tbody></table>{plots}</body></html>")


# ---- compare -------------------------------------------------------------------------------
# Figure, whether more is better.
FIGURES = [("wer", False), ("tool_call_accuracy", True), ("analysis_accuracy", True), ("answer_accuracy", True),
           ("turn_accuracy", True)]


LATENCY_TOLERANCE = 0.10


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """What got better or worse from run `a` to run `b`."""
    better, worse, same = [], [], []
    pairs: list[tuple[str, float | None, float | None, bool]] = [(k, a.get(k), b.get(k), up) for k, up in FIGURES]
    for kind in ("first_token_s", "first_audio_s"):
        for q in ("p50", "p95"):
            pairs.append((f"latency.{kind}.{q}", a["latency"][kind][q], b["latency"][kind][q], False))
    for name, old, new, up in pairs:
        if old is None or new is None:
            continue
        entry = {"figure": name, "a": old, "b": new, "change": new - old}
        # Latency is noisy: within LATENCY_TOLERANCE of A it counts as unchanged.
        tolerance = LATENCY_TOLERANCE * abs(old) if name.startswith("latency") else 1e-9
        if abs(new - old) <= tolerance:
            same.append(entry)
        elif (new > old) == up:
            better.append(entry)
        else:
            worse.append(entry)
    ca = {r["id"]: r for r in a["cases"]}
    cb = {r["id"]: r for r in b["cases"]}
    fixed = [i for i in cb if i in ca and cb[i]["passed"] and not ca[i]["passed"]]
    broke = [{"id": i, "failures": cb[i]["failures"]} for i in cb if i in ca and ca[i]["passed"] and not cb[i]["passed"]]
    return {"a": {"passed": a["passed"], "total": a["total"]}, "b": {"passed": b["passed"], "total": b["total"]},
            "better": better, "worse": worse, "unchanged": same, "fixed_cases": fixed, "broken_cases": broke,
            "only_in_a": sorted(set(ca) - set(cb)), "only_in_b": sorted(set(cb) - set(ca))}


def compare_text(diff: dict[str, Any]) -> str:
    def show(name: str, v: float) -> str:
        return f"{v * 1000:.0f} ms" if name.startswith("latency") else f"{v:.3f}"

    lines = [f"cases passed: {diff['a']['passed']}/{diff['a']['total']} → {diff['b']['passed']}/{diff['b']['total']}"]
    for title, key in (("better", "better"), ("worse", "worse")):
        for d in diff[key]:
            lines.append(f"  {title}: {d['figure']} {show(d['figure'], d['a'])} → {show(d['figure'], d['b'])}")
    lines += [f"  fixed: {i}" for i in diff["fixed_cases"]]
    lines += [f"  broken: {d['id']}: {'; '.join(d['failures'])}" for d in diff["broken_cases"]]
    if diff["only_in_a"] or diff["only_in_b"]:
        lines.append(f"  cases only in A: {diff['only_in_a'] or '–'}; only in B: {diff['only_in_b'] or '–'}")
    if not diff["better"] and not diff["worse"] and not diff["fixed_cases"] and not diff["broken_cases"]:
        lines.append("  no change")
    return "\n".join(lines)
