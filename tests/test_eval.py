"""`voice-agent eval`: the shipped smoke suite offline, failing cases, bad suites, reports, --compare."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.eval import metrics
from agent.eval.suite import AnswerExpect, SuiteError, load_suite

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "examples" / "eval" / "smoke.yaml"


def voice_agent(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The smoke suite once, every report written (the tests below read them)."""
    out = tmp_path_factory.mktemp("eval")
    proc = voice_agent("eval", str(SMOKE), "--backend", "scripted", "--json", "--junit", str(out / "junit.xml"),
                       "--html", str(out / "report.html"))
    return {"proc": proc, "dir": out}


def test_smoke_suite_passes_with_sane_figures(smoke_run: dict[str, Any]) -> None:
    proc = smoke_run["proc"]
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert {"cases", "passed", "wer", "tool_call_accuracy", "latency"} <= report.keys()
    assert report["passed"] == report["total"] == len(report["cases"]) == 4
    # kitchen_light's scripted transcription is one word off (5 words), time_in_paris exact (6):
    # WER over all words is 1/11, after Whisper's normaliser made "Paris?" and "paris" equal.
    assert report["wer"] == pytest.approx(1 / 11)
    assert report["tool_call_accuracy"] == 1.0 and report["analysis_accuracy"] == 1.0
    assert report["turn_accuracy"] == 1.0
    for kind in ("first_token_s", "first_audio_s"):
        lat = report["latency"][kind]
        assert lat["n"] == 5  # five answered turns (two_turns has two), each spoken by espeak
        assert 0 < lat["p50"] <= lat["p95"]
    cases = {c["id"]: c for c in report["cases"]}
    assert cases["kitchen_light"]["tool_calls"] == [{"name": "set_light", "arguments": {"room": "kitchen", "on": True}}]
    assert len(cases["two_turns"]["turns"]) == 2
    assert cases["emotion"]["answers"] == ["Happy."]
    assert "4/4 passed" in proc.stderr  # the summary goes to stderr when the JSON takes stdout


def test_junit_names_every_case(smoke_run: dict[str, Any]) -> None:
    root = ET.parse(smoke_run["dir"] / "junit.xml").getroot()
    suite = root.find("testsuite")
    assert suite is not None and suite.get("tests") == "4" and suite.get("failures") == "0"
    assert [c.get("name") for c in suite.iter("testcase")] == ["kitchen_light", "time_in_paris", "two_turns", "emotion"]


def _suite_copy(tmp_path: Path, edit: Any) -> Path:
    data = yaml.safe_load(SMOKE.read_text())
    data["agent"] = str(ROOT / "examples" / "custom_tools.py") + ":agent"
    data["config"] = {}  # text only: quicker
    data["defaults"].pop("latency")
    edit(data)
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_wrong_expectation_fails_naming_the_case(tmp_path: Path, smoke_run: dict[str, Any]) -> None:
    def edit(data: dict[str, Any]) -> None:
        data["cases"][1]["expect"]["tool_call"]["arguments"]["timezone"] = "Asia/Tokyo"
        data["cases"] = data["cases"][:2]

    proc = voice_agent("eval", str(_suite_copy(tmp_path, edit)), "--backend", "scripted", "--json")
    assert proc.returncode == 1, proc.stderr
    (tmp_path / "b.json").write_text(proc.stdout)
    assert "FAIL  time_in_paris" in proc.stderr and "PASS  kitchen_light" in proc.stderr
    assert "time_in_paris: no tool call current_time({'timezone': 'Asia/Tokyo'})" in proc.stderr
    assert "1 of 2 cases failed" in proc.stderr

    # --compare: the smoke run (A) against this one (B) says what broke and what changed.
    a = tmp_path / "a.json"
    a.write_text(smoke_run["proc"].stdout)
    diff = voice_agent("eval", "--compare", str(a), str(tmp_path / "b.json"), "--json")
    assert diff.returncode == 1  # a case that passed in A fails in B
    result = json.loads(diff.stdout)
    assert [c["id"] for c in result["broken_cases"]] == ["time_in_paris"]
    assert [w["figure"] for w in result["worse"]][:1] == ["tool_call_accuracy"]
    assert result["only_in_a"] == ["emotion", "two_turns"]
    assert "broken: time_in_paris" in diff.stderr
    same = voice_agent("eval", "--compare", str(a), str(a))
    assert same.returncode == 0 and "no change" in same.stdout


def test_bad_suites_name_the_case_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"cases": [
        {"id": "ok", "speak": ["hello"]},
        {"id": "typo", "speak": ["hello"], "expect": {"answr": {"contains": "x"}}},
        {"id": "regex", "speak": ["hello"], "expect": {"answer": {"regex": "("}}},
        {"id": "nothing", "expect": {"turns": 1}},
        {"id": "missing", "audio": "nope.wav"},
    ]}))
    with pytest.raises(SuiteError) as err:
        load_suite(path)
    text = str(err.value)
    assert "case 'typo', key `expect.answr`: unknown key" in text
    assert "case 'regex', key `expect.answer.regex`: not a regular expression" in text
    assert "case 'nothing'" in text and "`audio`" in text
    proc = voice_agent("eval", str(path))
    assert proc.returncode == 2 and "case 'typo'" in proc.stderr  # before anything starts

    path.write_text(yaml.safe_dump({"cases": [{"id": "missing", "audio": "nope.wav"}]}))
    with pytest.raises(SuiteError, match=r"case 'missing', key `audio`: nope.wav: no such file"):
        load_suite(path)


def test_wer_and_answer_matching() -> None:
    assert metrics.word_errors("Turn on the colour TV, Mr. Smith.", "turn on the color tv mister smith") == (0, 7)
    assert metrics.word_errors("a b c d", "a x c") == (2, 4)
    emotion = AnswerExpect(one_of=["happy", "sad", "neutral"], label="sad")
    assert metrics.answer_problem(emotion, "The speaker sounds sad.") is None
    assert "says 'happy'" in (metrics.answer_problem(emotion, "Happy!") or "")
    assert "2 of the labels" in (metrics.answer_problem(emotion, "sad, or maybe happy") or "")
    assert metrics.answer_problem(AnswerExpect(one_of=["sad", "happy"]), "unhappy") is not None  # whole words
    assert metrics.answer_problem(AnswerExpect(contains=["light", "on"]), "The light is on") is None


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                    reason="needs /usr/bin/chromium and chromedriver")
async def test_html_report_in_chromium(smoke_run: dict[str, Any], tmp_path: Path) -> None:
    """The report opens in a real headless Chromium: the table, one playable audio clip per
    case, and the latency plots drawn (SVG with size and bars)."""
    from tests.test_browser import chromium

    report = smoke_run["dir"] / "report.html"
    driver = await asyncio.to_thread(chromium, Path("/dev/null"), tmp_path / "profile")

    def look() -> dict[str, Any]:
        driver.get(report.as_uri())
        return driver.execute_async_script("""
            const done = arguments[arguments.length - 1];
            const audios = [...document.querySelectorAll("tr.case audio")];
            Promise.all(audios.map(a => a.readyState >= 1 ? null :
                new Promise(r => { a.onloadedmetadata = r; a.onerror = r; a.load(); }))).then(() => done({
              rows: document.querySelectorAll("tr.case").length,
              passes: document.querySelectorAll("tr.case td.pass").length,
              durations: audios.map(a => a.duration),
              plots: [...document.querySelectorAll(".plot svg")].map(s => {
                const r = s.getBoundingClientRect();
                return {w: r.width, h: r.height, shapes: s.querySelectorAll("path").length};
              }),
              text: document.body.innerText,
            }));
        """)

    try:
        seen = await asyncio.to_thread(look)
    finally:
        await asyncio.to_thread(driver.quit)
    assert seen["rows"] == 4 and seen["passes"] == 4
    assert len(seen["durations"]) == 4 and all(d > 1.0 for d in seen["durations"])  # decoded WAVs, seconds long
    assert len(seen["plots"]) == 2
    assert all(p["w"] > 200 and p["h"] > 100 and p["shapes"] > 5 for p in seen["plots"])
    assert "tool-call accuracy: 100.0%" in seen["text"]


@pytest.mark.slow
def test_eval_on_the_local_pool(tmp_path: Path) -> None:
    """The same command on the real inference pool (tiny-random: gibberish words, real prompts,
    batching and timings): two cases at once, the transcription pass in analysis mode."""
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump({"name": "pool", "cases": [
        {"id": "light", "speak": [0.5, "turn on the kitchen light", 1.0],
         "expect": {"turns": 1, "transcript": {"text": "turn on the kitchen light", "max_wer": 1000}}},
        {"id": "two", "speak": [0.5, "hello there", 1.5, "goodbye", 1.0], "expect": {"turns": 2}},
    ]}))
    proc = voice_agent("eval", str(path), "--model", "tiny-random", "--max-new-tokens", "6", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["backend"] == "transformers" and "tiny-random" in report["model"]
    assert report["passed"] == 2 and report["turn_accuracy"] == 1.0
    assert report["wer"] >= 0 and report["tool_call_accuracy"] is None  # no tool expectation, no figure
    assert report["latency"]["first_token_s"]["n"] == 3 and report["latency"]["first_audio_s"]["n"] == 0


def test_recorded_files_joined_into_one_session(tmp_path: Path) -> None:
    """`audio:` with two files: one session, `gap_s` of silence between them, two turns."""
    from tests.speech import make_speech

    first = make_speech([0.3, "turn on the kitchen light", 0.3], "eval-a")
    second = make_speech([0.3, "and the hall light", 0.5], "eval-b")
    path = tmp_path / "files.yaml"
    path.write_text(yaml.safe_dump({"name": "files", "gap_s": 1.2, "cases": [
        {"id": "both", "audio": [str(first.path), str(second.path)],
         # The speech of each file, shifted by what comes before it; a turn starts 0.25 s early (pre-roll).
         "expect": {"turns": [[s - 0.25 + offset, e + offset] for (s, e), offset in
                              ((first.segments[0], 0.0), (second.segments[0], first.samples.size / 16000 + 1.2))],
                    "answer": {"contains": ["kitchen", "hall"]}},
         "scripted": {"turns": ["The kitchen light is on.", "The hall light is on too."]}}]}))
    proc = voice_agent("eval", str(path), "--backend", "scripted", "--json")
    assert proc.returncode == 0, proc.stderr
    (case,) = json.loads(proc.stdout)["cases"]
    assert case["answers"] == ["The kitchen light is on.", "The hall light is on too."]
    assert len(case["turns"]) == 2


async def test_eval_on_the_openai_backend(tmp_path: Path) -> None:
    """`--backend openai` (what vLLM serves): the transcription pass sends the audio with the
    transcription instruction as text (analysis mode); the chat pass sends audio only."""
    from agent.cli import main
    from agent.eval.suite import TRANSCRIBE
    from tests.fake_openai import FakeOpenAI

    path = tmp_path / "openai.yaml"
    path.write_text(yaml.safe_dump({"name": "vllm", "concurrency": 1, "cases": [
        {"id": "light", "speak": [0.5, "turn on the kitchen light", 1.0],
         "expect": {"transcript": "Turn on the kitchen light.", "answer": {"contains": "kitchen"}}}]}))
    async with FakeOpenAI(pieces=("turn on the ", "kitchen light")) as server:
        code = await asyncio.to_thread(main, ["eval", str(path), "--backend", "openai", "--openai-url", server.url])
        texts = [[part.get("text") for m in body["messages"] if m["role"] == "user" and isinstance(m["content"], list)
                  for part in m["content"] if part["type"] == "text"] for body in server.requests]
        clips = [len(a) for a in server.audios]
    assert code == 0
    assert texts == [[], [TRANSCRIBE]] and clips == [1, 1]
