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
from agent.eot import policy
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
    commits = [e for e in ref if e["kind"] == "commit"]
    ours = our_silences(speech.samples)
    model = SmartTurn()
    # Both see the same two pauses: after "um" and at the end; pipecat commits only at the end.
    assert len(calls) == len(ours) == 2, (ref, ours)
    assert len(commits) == 1 and commits[0]["t"] > speech.segments[1][1]
    for call, silence in zip(calls, ours, strict=True):
        # The same model on pipecat's own segment gives pipecat's probability: features and
        # model are the same, only the window differs.
        end = round(call["t"] * SR)
        segment = speech.samples[end - round(call["segment_s"] * SR) : end]
        assert float(model.predict([segment])[0]) == pytest.approx(call["p"], abs=2e-3)
        # pipecat's window ends after the silence its VAD waited for (stop_secs 0.2 + its
        # smoothing), 0.2-0.4 s after ours starts the silence.
        assert 0.2 <= call["t"] - silence.t <= 0.4
        # Our window (the turn so far + PAD_S of silence) gives the same verdict.
        ours_p = float(model.predict([policy.window(silence.audio)])[0])
        assert (ours_p >= 0.5) == (call["p"] >= 0.5), (ours_p, call["p"])
