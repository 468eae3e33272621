"""Parity of our Smart Turn feeding (agent/eot) with pipecat-ai 1.14 running the same model its own
way (its Silero VAD analyzer with stop_secs 0.2, LocalSmartTurnAnalyzerV3's buffering, 3 s
fallback: tests/pipecat_reference.py) on the same audio, in the side environment `.venv-pipecat`
(`make pipecat`; `make test` builds it). Skipped only when that environment is absent."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from agent.bench.turns import CHUNK, Utterance, vad_probs
from agent.turns import SilenceBegan, TurnConfig, TurnDetector

ROOT = Path(__file__).resolve().parent.parent
PYTHON = Path(os.environ.get("VOICE_AGENT_PIPECAT_PYTHON", ROOT / ".venv-pipecat" / "bin" / "python"))
SR = 16000

pytestmark = pytest.mark.skipif(not PYTHON.exists(),
                                reason=f"no pipecat side environment at {PYTHON}: `make pipecat` builds it")


def pipecat(samples: np.ndarray, tmp_path: Path) -> list[dict]:
    src, dst = tmp_path / "in.f32", tmp_path / "out.json"
    samples.astype(np.float32).tofile(src)
    subprocess.run([str(PYTHON), str(ROOT / "tests" / "pipecat_reference.py"), str(src), str(dst)], check=True,
                   capture_output=True, timeout=120, env={**os.environ, "LOGURU_LEVEL": "WARNING"})
    return json.loads(dst.read_text())


def our_silences(samples: np.ndarray) -> list[SilenceBegan]:
    """Our feeding: the VAD service's probabilities, the turn state machine, no commit in between."""
    (probs,) = vad_probs([Utterance("x", "", samples, [])])
    det = TurnDetector(TurnConfig(min_silence_s=3.0, min_silence_s_complete=3.0, max_silence_s=3.0))
    return [s for k, p in enumerate(probs) for s in det.feed(samples[k * CHUNK : (k + 1) * CHUNK], float(p))
            if isinstance(s, SilenceBegan)]


def test_our_feeding_matches_pipecats_analyzer_on_the_same_audio(make_speech_fixture, tmp_path) -> None:
    from agent.eot.smart_turn import SmartTurn

    speech = make_speech_fixture([0.5, "turn on the, um", 0.9, "the kitchen light", 3.5], "eot-hesitation-pipecat")
    ref = pipecat(speech.samples, tmp_path)
    calls = [e for e in ref if e["kind"] == "model"]
    ours = our_silences(speech.samples)
    model = SmartTurn()
    assert calls and [e for e in ref if e["kind"] == "commit"][-1]["t"] > speech.segments[-1][1]
    for call in calls:
        # The same model on the segment pipecat gave it (as int16, as its transports deliver it)
        # gives pipecat's probability: features and model agree, only the window is pipecat's own.
        pcm = (np.clip(speech.samples, -1, 1) * 32767).astype(np.int16).astype(np.float32) / 32768
        segment = pcm[call["end"] - call["samples"] : call["end"]]
        p = float(model.predict([segment])[0])
        assert p == pytest.approx(call["p"], abs=0.05), (p, call)
        assert (p > 0.5) == (call["p"] > 0.5) or abs(call["p"] - 0.5) < 0.05
        # Its window ends after the silence its VAD waited for (stop_secs 0.2 + its smoothing),
        # 0.1-0.45 s after our turn state machine saw the silence begin (SilenceBegan).
        began = [s.t for s in ours if s.t <= call["end"] / SR]
        assert began and 0.1 <= call["end"] / SR - began[-1] <= 0.45, (call, began)
    # At the true end of speech, too, its window holds silence after the speech.
    assert 0.1 <= calls[-1]["end"] / SR - speech.segments[-1][1] <= 0.45
