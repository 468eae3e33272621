"""Real test speech with known boundaries: espeak-ng speaks (agent/bench/speech.py, the helper the
benchmarks use too), joined with silence and saved as a WAV file."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.bench.speech import utterance, write_wav

CACHE = Path(__file__).parent / ".speech-cache"


@dataclass
class Speech:
    path: Path
    samples: np.ndarray  # 16 kHz mono float32
    segments: list[tuple[float, float]]  # (start, end) seconds of each spoken part


def make_speech(parts: list[str | float], name: str | None = None) -> Speech:
    """`parts` alternates text (spoken) and floats (seconds of silence)."""
    samples, segments = utterance(parts, cache=CACHE)
    key = hashlib.sha1(repr(parts).encode()).hexdigest()[:12]
    path = CACHE / f"{name or 'speech'}-{key}.wav"
    if not path.exists():
        write_wav(path.with_suffix(".part.wav"), samples).replace(path)
    return Speech(path=path, samples=samples, segments=segments)


def two_utterances() -> Speech:
    return make_speech([1.0, "turn on the kitchen light", 1.5, "what is the weather like today", 1.0], "two")
