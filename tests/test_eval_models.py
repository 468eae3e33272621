"""`voice-agent eval SUITE --model A --model B`: one suite on several models, side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from agent.eval.models_report import figure, models_html, models_text
from tests.test_eval import voice_agent


def report(model: str, passed: bool, wer: float, p50: float) -> dict[str, object]:
    case = {"id": "light", "passed": passed, "failures": [] if passed else ["no turn"], "answers": ["ok"],
            "tool_calls": [{"name": "light_on", "arguments": {}}]}
    return {"suite": "s", "model": model, "total": 1, "passed": int(passed), "failed": int(not passed), "wer": wer,
            "tool_call_accuracy": 1.0 if passed else 0.0, "analysis_accuracy": None, "answer_accuracy": None,
            "turn_accuracy": 1.0, "latency": {"first_token_s": {"p50": p50, "p95": p50, "n": 1},
                                              "first_audio_s": {"p50": None, "p95": None, "n": 0}},
            "cases": [case]}


def test_side_by_side_tables() -> None:
    a, b = report("A", True, 0.1, 0.2), report("B", False, 0.3, 0.1)
    assert figure(a, "pass_rate") == 1.0 and figure(b, "latency.first_token_s.p50") == 0.1
    text = models_text([a, b])
    assert "WER (analysis mode)" in text and "10.0%" in text and "30.0%" in text
    assert text.splitlines()[-1].split()[1:] == ["PASS", "FAIL"]
    page = models_html([a, b])
    # the best figure of each row is marked (a tie is not): A's pass rate, WER and tool calls, B's latency
    assert page.count("<td class=pass>") == 5 and "light_on" in page and page.count('class="case"') == 1


@pytest.mark.slow
def test_eval_two_families_side_by_side(tmp_path: Path) -> None:
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump({"name": "two", "cases": [
        {"id": "light", "speak": [0.5, "turn on the kitchen light", 1.0], "expect": {"turns": 1}}]}))
    proc = voice_agent("eval", str(path), "--model", "tiny-random-qwen2.5-omni", "--model", "tiny-random-voxtral",
                       "--max-new-tokens", "4", "--json", "--html", str(tmp_path / "r.html"), timeout=400)
    assert proc.returncode == 0, proc.stderr
    reports = json.loads(proc.stdout)["models"]
    assert [r["model_arg"] for r in reports] == ["tiny-random-qwen2.5-omni", "tiny-random-voxtral"]
    assert all(r["passed"] == 1 and r["latency"]["first_token_s"]["n"] == 1 for r in reports)
    page = (tmp_path / "r.html").read_text()
    assert "Qwen2.5-Omni (thinker)" in page and "Voxtral" in page and "<audio" in page
