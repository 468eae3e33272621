"""Synthetic speech for benchmarks and tests: espeak-ng, 16 kHz mono float32, boundaries exact.

The one place that runs espeak-ng to make input speech (the agent's own voice is the `espeak`
TTS engine, agent/speech). espeak-ng writes a 22.05 kHz WAV and sox resamples it to 16 kHz
16-bit, as the tests always made their speech (the same samples but for sox's ±1 LSB dither,
which differs from run to run); the silence espeak pads its clips with is trimmed, so the bounds
of an utterance are where its speech is. Needs the Debian packages espeak-ng and sox (`make setup`
installs both). espeak's flat prosody fools audio models: judge turn-taking on recordings of real
people.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

RATE = 16000
VOICE, SPEED = "en-us", 150  # espeak-ng's -v and -s (words per minute)
VOICED = 1e-3  # |sample| above this is speech: espeak's padding is digital silence


def available() -> bool:
    return shutil.which("espeak-ng") is not None and shutil.which("sox") is not None


def espeak(text: str, *, voice: str = VOICE, speed: int = SPEED, cache: Path | None = None,
           trim: bool = True) -> np.ndarray:
    """`text` spoken by espeak-ng: 16 kHz mono float32. With `cache`, espeak's WAV is kept there
    (keyed by voice, speed and text) and not made again. `trim`: without espeak's padding."""
    from agent.audio import read_file

    key = hashlib.sha1(f"sox|{voice}|{speed}|{text}".encode()).hexdigest()[:12]
    with tempfile.TemporaryDirectory() as tmp:
        wav = (cache or Path(tmp)) / f"espeak-{key}.wav"
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
        if not wav.exists():
            raw, part = Path(tmp) / "raw.wav", wav.with_suffix(".part.wav")
            subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(raw), text], check=True,
                           capture_output=True)
            subprocess.run(["sox", str(raw), "-r", str(RATE), "-c", "1", "-b", "16", str(part)], check=True,
                           capture_output=True)
            part.replace(wav)  # whole or not at all: a concurrent reader never sees half a file
        audio = read_file(wav).astype(np.float32)
    if trim:
        voiced = np.flatnonzero(np.abs(audio) > VOICED)
        if voiced.size:
            audio = audio[voiced[0] : voiced[-1] + 1]
    return audio


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(round(seconds * RATE)), np.float32)


def utterance(parts: Sequence[str | float], *, voice: str = VOICE, speed: int = SPEED,
              cache: Path | None = None) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """`parts` alternate text (spoken, trimmed) and floats (seconds of silence): the samples and
    the (start, end) seconds of each spoken part."""
    pieces: list[np.ndarray] = []
    spoken: list[tuple[float, float]] = []
    t = 0.0
    for part in parts:
        clip = espeak(part, voice=voice, speed=speed, cache=cache) if isinstance(part, str) else silence(part)
        if isinstance(part, str):
            spoken.append((t, t + clip.size / RATE))
        pieces.append(clip)
        t += clip.size / RATE
    samples = np.concatenate(pieces).astype(np.float32) if pieces else silence(0)
    return samples, spoken


def write_wav(path: Path, samples: np.ndarray, rate: int = RATE) -> Path:
    """16-bit mono PCM WAV."""
    from agent.model.qwen2_audio import to_wav_bytes

    path.write_bytes(to_wav_bytes(samples, rate))
    return path
