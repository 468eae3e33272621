"""`voice-agent bench tts` runs end to end and ends with one JSON object (figures are not asserted)."""

from __future__ import annotations

import json
import shutil

import pytest

from agent.cli import main


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_bench_tts_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "tts", "--engines", "espeak", "--repeats", "1", "--delta-ms", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    espeak = result["engines"]["espeak"]
    assert result["benchmark"] == "tts" and espeak["sample_rate"] == 22050
    for key in ("first_audio_instant_p50_ms", "first_audio_streamed_p95_ms", "first_audio_whole_answer_p50_ms",
                "cpu_rtf", "streams_per_core"):
        assert espeak[key] > 0
    assert "espeak_chunking_speedup" in result
