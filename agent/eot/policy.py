"""The end-of-turn policy: Smart Turn's verdict combined with what the voice itself tells.

When silence begins, the session asks the process's end-of-turn model for P(complete) on the
turn so far (`agent.eot.EndOfTurnService`); the turn state machine turns that into how long
the silence must last (`agent.turns`: complete → `min_silence_s_complete`, unsure → the fixed
`min_silence_s`, incomplete → `max_silence_s`). This model (`smart-turn-prosody`, the default)
answers with one logistic combination, calibrated on real speech (`voice-agent bench turns
--calibrate`, on the calibration half of `agent.bench.corpus`), of:

- Smart Turn's P(complete) (as a logit) on its window: the turn so far, up to where the silence
  began. pipecat's window also holds the 0.1-0.35 s of silence its VAD waited for; on the
  calibration half the model separates finished from unfinished better without it (ROC AUC 0.80
  against 0.71 with 0.2 s of the recording's background appended), so `PAD_S` is 0;
- pitch movement at the end: the median pitch of the last voiced 0.3 s against the turn's
  (semitones; a statement falls, a list or a "followed by" stays up);
- final lengthening: the last voiced stretch's length against the turn's median stretch;
- energy at the end: the last voiced 0.2 s against the turn's median voiced level (dB);
- how long the speaker has talked (log seconds): one or two words rarely make a whole request.

Everything here is a pure function of the audio; the features read only the last `TAIL_S`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from agent.model.qwen2_audio import SAMPLE_RATE

PAD_S = 0.0  # background appended to Smart Turn's window: none (chosen on the corpus: bench turns --calibrate)
TAIL_S = 4.0  # the features look at the last 4 s
FRAME = 640  # 40 ms pitch frames …
HOP = 160  # … every 10 ms
F0_MIN, F0_MAX = 60.0, 400.0


@dataclass(frozen=True)
class Features:
    p_model: float  # Smart Turn's P(complete)
    talk_s: float  # length of the turn so far (s)
    pitch_end_st: float  # semitones, end against the turn's median (0 when unvoiced)
    lengthening: float  # last voiced stretch / median voiced stretch (1 when too few)
    energy_end_db: float  # last voiced 0.2 s against the turn's median voiced level

    def vector(self, used: tuple[str, ...] | None = None) -> np.ndarray:
        p = min(max(self.p_model, 1e-4), 1 - 1e-4)
        values = dict(zip(NAMES, (math.log(p / (1 - p)), math.log(max(self.talk_s, 0.1)), self.pitch_end_st,
                                  math.log(max(self.lengthening, 0.1)), self.energy_end_db), strict=True))
        return np.array([values[n] for n in (USED if used is None else used)], np.float64)


NAMES = ("smart_turn_logit", "log_talk_s", "pitch_end_st", "log_lengthening", "energy_end_db")
# The features the policy uses. Talk length and the final level are computed and reported by the
# calibration but left out: on the corpus they mostly tell its construction (an unfinished case is
# the first half of a sentence, cut where the aligner ends a word), and with them the policy took
# espeak's quiet "um" for a finished turn (docs/turn-taking.md).
USED = ("smart_turn_logit", "pitch_end_st", "log_lengthening")
# Logistic weights over Features.vector() (bias first), fitted by `bench turns --calibrate`
# on the corpus's calibration half (1017 silences: 543 at a finished turn's end, 474 inside).
WEIGHTS = (-2.4553, 0.3711, -0.8044, 0.5147)


def room_tone(audio: np.ndarray, seconds: float) -> np.ndarray:
    """`seconds` of the recording's own background: its quietest 0.1 s, repeated (a pause filled
    with digital silence would be a cue no live microphone gives)."""
    n, win = round(seconds * SAMPLE_RATE), SAMPLE_RATE // 10
    if n <= 0 or audio.size < win:
        return np.zeros(max(n, 0), np.float32)
    hops = np.arange(0, audio.size - win + 1, win // 2)
    energy = [float(np.square(audio[h : h + win]).sum()) for h in hops]
    quiet = audio[hops[int(np.argmin(energy))] :][:win]
    return np.tile(quiet, n // win + 1)[:n].astype(np.float32)



def window(audio: np.ndarray, pad_s: float = PAD_S) -> np.ndarray:
    """Smart Turn's input: the turn so far and `pad_s` of its own background after it (the silence
    pipecat's window holds once its VAD has waited; the model tells digital silence from room tone)."""
    audio = np.asarray(audio, np.float32).reshape(-1)
    return np.concatenate([audio, room_tone(audio[-2 * SAMPLE_RATE :], pad_s)]) if pad_s > 0 else audio


def pitch_track(audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(f0 in Hz or 0 where unvoiced, frame RMS) every 10 ms: normalised autocorrelation."""
    if audio.size < FRAME:
        return np.zeros(0), np.zeros(0)
    n = 1 + (audio.size - FRAME) // HOP
    idx = np.arange(FRAME)[None, :] + HOP * np.arange(n)[:, None]
    frames = audio[idx].astype(np.float64)
    frames -= frames.mean(axis=1, keepdims=True)
    rms = np.sqrt((frames**2).mean(axis=1))
    spec = np.fft.rfft(frames * np.hanning(FRAME), 2 * FRAME, axis=1)
    ac = np.fft.irfft(np.abs(spec) ** 2, axis=1)[:, :FRAME]
    lo, hi = int(SAMPLE_RATE / F0_MAX), int(SAMPLE_RATE / F0_MIN)
    norm = ac[:, lo:hi] / np.maximum(ac[:, :1], 1e-12)
    lag = norm.argmax(axis=1)
    peak = norm[np.arange(n), lag]
    loud = rms > max(1e-4, 0.05 * float(np.percentile(rms, 95)))
    f0 = np.where((peak > 0.45) & loud, SAMPLE_RATE / (lag + lo), 0.0)
    return f0, rms


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))


def features(audio: np.ndarray, p_model: float) -> Features:
    """The prosodic features of the turn so far (16 kHz) with the model's P(complete)."""
    audio = np.asarray(audio, np.float32).reshape(-1)
    talk_s = audio.size / SAMPLE_RATE
    f0, rms = pitch_track(audio[-int(TAIL_S * SAMPLE_RATE):])
    voiced = f0 > 0
    if voiced.sum() < 10:
        return Features(p_model, talk_s, 0.0, 1.0, 0.0)
    semis = 12 * np.log2(f0[voiced] / np.median(f0[voiced]))
    last = np.flatnonzero(voiced)
    end = last[last >= last[-1] - 30]  # voiced frames of the last 0.3 s of voice
    pitch_end = float(np.median(12 * np.log2(f0[end] / np.median(f0[voiced])))) if end.size else 0.0
    del semis
    runs = [b - a for a, b in _runs(voiced) if b - a >= 3]
    lengthening = runs[-1] / float(np.median(runs)) if len(runs) >= 3 else 1.0
    level = 20 * np.log10(np.maximum(rms, 1e-6))
    tail = level[last[last >= last[-1] - 20]]
    energy_end = float(np.median(tail) - np.median(level[voiced]))
    return Features(p_model, talk_s, pitch_end, lengthening, energy_end)


def combine(f: Features, weights: tuple[float, ...] = WEIGHTS) -> float:
    """P(complete) of the policy: a logistic function of the features."""
    z = weights[0] + float(np.dot(weights[1:], f.vector()))
    return 1.0 / (1.0 + math.exp(-max(min(z, 40.0), -40.0)))


class SmartTurnProsody:
    """`EndOfTurnModel` (`smart-turn-prosody`): Smart Turn on its padded window + the voice's cues."""

    name = "smart-turn-prosody"

    def __init__(self, threads: int = 1) -> None:
        from agent.eot.smart_turn import SmartTurn

        self.smart_turn = SmartTurn(threads)

    def predict(self, clips: list[np.ndarray]) -> np.ndarray:
        if not clips:
            return np.zeros(0, np.float32)
        probs = self.smart_turn.predict([window(c) for c in clips])
        return np.array([combine(features(c, float(p))) for c, p in zip(clips, probs, strict=True)], np.float32)
