"""Is speech over the agent's voice a backchannel ("yeah", "mm-hm") or an interruption?

Detectors judge the overlapping speech heard so far (`OverlapSpeech`: its audio from the
onset, the VAD's per-chunk probabilities, whether it has stopped, the user's own usual
level). Built in, chosen by `turns.backchannel`:

- `duration` — the old rule: speech lasting `interrupt_min_speech_s` interrupts.
- `commands` (the default) — `features`, plus a keyword spotter that tells short commands
  ("stop", "wait", "hold on") from backchannels (agent/speech/commands.py).
- `features` — cheap acoustic cues (about a millisecond of numpy per 32 ms chunk of
  overlapping speech): an interruption goes on (`backchannel_max_s`), carries content
  (more syllables than `backchannel_max_syllables`: "what time is it" has 4+, "uh-huh" 2),
  or is said louder than the user's own speech (`backchannel_louder_db` over their level in earlier turns).
  Pitch range and voicing are measured and reported (in `speech.backchannel`), not used: on
  the synthetic voices this machine can test with they did not separate the two (espeak's
  prosody is the same for both); a detector trained on recorded speech may use them.

Other detectors come from the `voice_agent.interruption_detectors` entry-point group: a
class (or factory) called with the `BargeInConfig`, with `judge(OverlapSpeech) -> Verdict`.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from agent.speech.overlap import Verdict

ENTRY_POINT_GROUP = "voice_agent.interruption_detectors"
SAMPLE_RATE = 16000
CHUNK = 512  # one VAD probability per 32 ms chunk


@dataclass(frozen=True)
class BargeInConfig:
    """The `turns.*` settings of speech over the agent's voice (see agent.config.TurnSettings)."""

    backchannel: str = "commands"  # the detector: duration | features | commands | an entry point
    pause: bool = True  # pause the voice at once on speech over it, then decide
    interrupt_min_speech_s: float = 0.3  # duration: speech this long interrupts
    backchannel_max_s: float = 0.9  # features: longer speech always interrupts
    backchannel_max_syllables: int = 3  # features: more syllables is content, not a backchannel
    backchannel_louder_db: float = 6.0  # features: this much louder than the user's own speech interrupts
    resume_after_s: float = 0.5  # silence after a backchannel before the voice goes on (as long as a turn's end: shorter pauses are within a sentence)
    echo_playout_s: float = 0.3  # the echo gate stays on this long after the last audible frame
    threshold: float = 0.5  # the VAD probability that counts as speech …
    neg_threshold: float = 0.35  # … and below which it stopped
    # commands: short phrases that cancel the answer, and the backchannels the spotter tells them from
    commands: tuple[str, ...] = ("stop", "wait", "hold on", "no", "cancel", "pause", "be quiet")
    backchannel_words: tuple[str, ...] = ("yeah", "uh huh", "mm hm", "right", "okay", "sure", "i see")
    command_turn: bool = False  # a command alone also becomes a user turn (else: the agent just stops)


@dataclass
class OverlapSpeech:
    audio: np.ndarray  # 16 kHz mono float32 from the speech's onset
    probs: np.ndarray  # VAD probability per 512-sample chunk of `audio`
    ended: bool  # its speech has stopped (trailing silence), else it goes on
    user_level_db: float | None = None  # the user's voiced level in earlier turns (dBFS)
    threshold: float = 0.5
    preroll: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # ~0.2 s before the onset

    @property
    def duration_s(self) -> float:
        """From the onset to the end of its last chunk of speech."""
        speech = np.flatnonzero(self.probs >= self.threshold)
        return float((speech[-1] + 1) * CHUNK / SAMPLE_RATE) if speech.size else 0.0

    def speech_part(self) -> np.ndarray:
        return self.audio[: round(self.duration_s * SAMPLE_RATE)]


class InterruptionDetector(Protocol):
    def judge(self, speech: OverlapSpeech) -> Verdict: ...


# ---- acoustic features (numpy only) ------------------------------------------------------
def _frames(x: np.ndarray, size: int, hop: int) -> np.ndarray:
    if x.size < size:
        return np.zeros((0, size), np.float32)
    n = 1 + (x.size - size) // hop
    return np.lib.stride_tricks.sliding_window_view(x, size)[::hop][:n]


def level_db(x: np.ndarray) -> float:
    """Voiced level (dBFS): the RMS of its 20 ms frames within 30 dB of the loudest."""
    f = _frames(x, 320, 320)
    if not len(f):
        return -100.0
    db = 10 * np.log10((f.astype(np.float64) ** 2).mean(axis=1) + 1e-12)
    loud = db[db >= db.max() - 30]
    return float(10 * np.log10(np.mean(10 ** (loud / 10))))


def syllables(x: np.ndarray, dip_db: float = 4.0) -> int:
    """Syllable nuclei: peaks of the smoothed energy envelope, separated by a dip of `dip_db`."""
    f = _frames(x, 320, 160)  # 20 ms every 10 ms
    if len(f) < 3:
        return 0
    db = 10 * np.log10((f.astype(np.float64) ** 2).mean(axis=1) + 1e-12)
    env = np.convolve(db, np.ones(5) / 5, mode="same")
    floor = env.max() - 25
    kept: list[int] = []
    for j in range(1, env.size - 1):
        if not (env[j] >= env[j - 1] and env[j] > env[j + 1] and env[j] > floor):
            continue
        if kept and min(env[kept[-1]], env[j]) - env[kept[-1] : j + 1].min() < dip_db:
            if env[j] > env[kept[-1]]:
                kept[-1] = j  # the same nucleus: keep its higher peak
            continue
        kept.append(j)
    return len(kept)


def pitch(x: np.ndarray) -> tuple[float, float]:
    """(pitch range in semitones p10–p90, share of loud frames that are voiced), by autocorrelation."""
    f = _frames(x, 640, 320)  # 40 ms every 20 ms
    if not len(f):
        return 0.0, 0.0
    f = f.astype(np.float64)
    db = 10 * np.log10((f**2).mean(axis=1) + 1e-12)
    loud = f[db >= db.max() - 20]
    loud = loud - loud.mean(axis=1, keepdims=True)
    lo, hi = SAMPLE_RATE // 400, SAMPLE_RATE // 70
    spec = np.fft.rfft(loud, 2 * loud.shape[1], axis=1)  # all frames' autocorrelations at once
    ac = np.fft.irfft(spec * np.conj(spec), axis=1)[:, : loud.shape[1]]
    energy = ac[:, 0]
    lags = lo + np.argmax(ac[:, lo:hi], axis=1)
    peak = ac[np.arange(len(ac)), lags]
    ok = (energy > 0) & (peak >= 0.5 * np.where(energy > 0, energy, 1.0))
    f0 = list(SAMPLE_RATE / lags[ok])
    voiced = len(f0) / max(len(loud), 1)
    if len(f0) < 3:
        return 0.0, voiced
    p10, p90 = np.percentile(f0, [10, 90])
    return float(12 * np.log2(p90 / p10)), voiced


@dataclass
class Features:
    duration_s: float
    syllables: int
    level_db: float
    vs_user_db: float | None  # level over the user's own (None: no earlier turn to compare)
    reasons: list[str] = field(default_factory=list)  # what made it an interruption

    def as_dict(self) -> dict[str, Any]:
        out = {"duration_s": round(self.duration_s, 3), "syllables": self.syllables,
               "level_db": round(self.level_db, 1)}
        if self.vs_user_db is not None:
            out["vs_user_db"] = round(self.vs_user_db, 1)
        return out


def measure(speech: OverlapSpeech) -> Features:
    """What the decision uses: about a millisecond per call (pitch, reported only, costs more:
    `pitch()` runs once per backchannel, for its event)."""
    part = speech.speech_part()
    level = level_db(part)
    vs_user = None if speech.user_level_db is None else level - speech.user_level_db
    return Features(speech.duration_s, syllables(part), level, vs_user)


# ---- detectors ----------------------------------------------------------------------------
class DurationDetector:
    """Speech lasting `interrupt_min_speech_s` interrupts; shorter speech is a backchannel."""

    def __init__(self, config: BargeInConfig) -> None:
        self.min_s = config.interrupt_min_speech_s

    def judge(self, speech: OverlapSpeech) -> Verdict:
        if speech.duration_s >= self.min_s:
            return Verdict.INTERRUPTION
        return Verdict.BACKCHANNEL if speech.ended else Verdict.UNDECIDED


class FeatureDetector:
    """Duration, content (syllables) and level relative to the user's own speech (module doc)."""

    def __init__(self, config: BargeInConfig) -> None:
        self.config = config
        self.last: Features | None = None  # the features of the latest judgement (for the event)

    def judge(self, speech: OverlapSpeech) -> Verdict:
        c, feats = self.config, measure(speech)
        self.last = feats
        if feats.duration_s > c.backchannel_max_s:
            feats.reasons.append("long")
        if feats.syllables > c.backchannel_max_syllables:
            feats.reasons.append("content")
        if feats.vs_user_db is not None and feats.vs_user_db >= c.backchannel_louder_db:
            feats.reasons.append("loud")
        if feats.reasons:
            return Verdict.INTERRUPTION
        return Verdict.BACKCHANNEL if speech.ended else Verdict.UNDECIDED


def available_detectors() -> list[str]:
    return sorted({"duration", "features", "commands"} | {ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)})


def load_detector(config: BargeInConfig) -> InterruptionDetector:
    """The configured detector (built-ins are also registered as entry points; found here
    without them, so a source checkout that was never installed works)."""
    name = config.backchannel
    builtin: dict[str, Any] = {"duration": DurationDetector, "features": FeatureDetector}
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    if name == "commands":
        from agent.speech.commands import CommandDetector

        builtin["commands"] = CommandDetector
    if name in eps:
        factory = eps[name].load()
    elif name in builtin:
        factory = builtin[name]
    else:
        raise ValueError(f"unknown interruption detector {name!r}; available: {', '.join(available_detectors())}")
    detector = factory(config)
    if not callable(getattr(detector, "judge", None)):
        raise ValueError(f"interruption detector {name!r} has no judge(speech) method")
    return detector
