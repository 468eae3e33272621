"""Real test speech with known boundaries: espeak-ng speaks, sox joins it with silence."""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.audio import SAMPLE_RATE, read_file

CACHE = Path(__file__).parent / ".speech-cache"


@dataclass
class Speech:
    path: Path
    samples: np.ndarray  # 16 kHz mono float32
    segments: list[tuple[float, float]]  # (start, end) seconds of each spoken part


def _say(text: str, out: Path) -> None:
    raw = out.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw), text], check=True)
    subprocess.run(["sox", str(raw), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", str(out)], check=True)
    raw.unlink()


def make_speech(parts: list[str | float], name: str | None = None) -> Speech:
    """`parts` alternates text (spoken) and floats (seconds of silence)."""
    CACHE.mkdir(exist_ok=True)
    key = hashlib.sha1(repr(parts).encode()).hexdigest()[:12]
    path = CACHE / f"{name or 'speech'}-{key}.wav"
    pieces: list[np.ndarray] = []
    segments: list[tuple[float, float]] = []
    t = 0.0
    for i, part in enumerate(parts):
        if isinstance(part, str):
            clip = CACHE / f"say-{hashlib.sha1(part.encode()).hexdigest()[:12]}.wav"
            if not clip.exists():
                _say(part, clip)
            audio = read_file(clip)
            # espeak pads its clips with a little silence; trim it so boundaries are exact.
            voiced = np.flatnonzero(np.abs(audio) > 1e-3)
            audio = audio[voiced[0] : voiced[-1] + 1]
            segments.append((t, t + audio.size / SAMPLE_RATE))
        else:
            audio = np.zeros(int(round(part * SAMPLE_RATE)), dtype=np.float32)
        pieces.append(audio)
        t += audio.size / SAMPLE_RATE
    samples = np.concatenate(pieces).astype(np.float32)
    if not path.exists():
        pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
        import wave

        with wave.open(str(path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(SAMPLE_RATE)
            w.writeframes(pcm.tobytes())
    return Speech(path=path, samples=samples, segments=segments)


def two_utterances() -> Speech:
    return make_speech([1.0, "turn on the kitchen light", 1.5, "what is the weather like today", 1.0], "two")
