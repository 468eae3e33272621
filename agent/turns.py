"""Turn detection: a pure state machine over (32 ms chunk, speech probability) pairs.

No asyncio and no clock: time is the count of samples fed, so it runs the same live and
from files and tests need no sleeps. The session maps its signals to events.

    idle ──p≥on──▶ onset ──speech ≥ min_speech──▶ speech ──p<off──▶ trailing ──silence ≥ min_silence──▶ commit
                     │ p<off: a blip, back to idle     ▲                 │
                     └─────────────────────────────────┴── p≥on: resumed ┘

Adaptive endpointing: an end-of-turn model's verdict on the silence (`set_verdict`, given by
the session after SilenceBegan) changes the silence that commits: complete → after
`min_silence_s_complete`, incomplete ("turn on the, um") → after `max_silence_s`; without a
verdict (model off or failed), or one between `incomplete_threshold` and
`complete_threshold` (unsure), the fixed `min_silence_s` holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum

import numpy as np

from agent.model.qwen2_audio import SAMPLE_RATE


@dataclass(frozen=True)
class TurnConfig:
    threshold: float = 0.5  # speech starts at p ≥ threshold …
    neg_threshold: float = 0.35  # … and stops at p < neg_threshold (hysteresis)
    pre_roll_s: float = 0.25  # audio kept before the onset (onsets are detected late)
    min_speech_s: float = 0.15  # shorter bursts (clicks, coughs) are no speech
    min_silence_s: float = 0.5  # silence that ends a turn
    max_turn_s: float = 30.0  # Qwen2-Audio's clip limit: longer speech is split
    min_silence_s_complete: float = 0.2  # silence that ends a turn the end-of-turn model calls complete
    max_silence_s: float = 2.0  # … and one it calls incomplete
    complete_threshold: float = 0.5  # P(complete) at or above which the model's verdict is "complete"
    incomplete_threshold: float = 0.5  # … and below which "incomplete"; between the two: the fixed rule

    def __post_init__(self) -> None:
        if not 0.0 < self.neg_threshold <= self.threshold < 1.0:
            raise ValueError("need 0 < neg_threshold <= threshold < 1")
        if not 0.0 < self.min_silence_s_complete <= self.min_silence_s <= self.max_silence_s:
            raise ValueError("need 0 < min_silence_s_complete <= min_silence_s <= max_silence_s")
        if not 0.0 < self.incomplete_threshold <= self.complete_threshold < 1.0:
            raise ValueError("need 0 < incomplete_threshold <= complete_threshold < 1")
        if self.max_turn_s <= self.min_speech_s or self.max_turn_s > 30.0:
            raise ValueError("max_turn_s must be in (min_speech_s, 30]")


@dataclass(frozen=True)
class SpeechStarted:
    t: float


@dataclass(frozen=True)
class SilenceBegan:
    """Speech may have ended: `audio` is the turn if it commits now (speculative start)."""

    t: float
    start: float
    audio: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class SpeechResumed:
    """Speech went on after SilenceBegan: a speculative start must be dropped."""

    t: float


@dataclass(frozen=True)
class SpeechStopped:
    t: float


@dataclass(frozen=True)
class TurnCommitted:
    start: float
    end: float
    audio: np.ndarray = field(repr=False)  # exactly the samples of [start, end)
    split: bool = False  # cut at max_turn_s while speech goes on


Signal = SpeechStarted | SilenceBegan | SpeechResumed | SpeechStopped | TurnCommitted


class _State(Enum):
    IDLE = "idle"
    ONSET = "onset"
    SPEECH = "speech"
    TRAILING = "trailing"


class TurnDetector:
    def __init__(self, config: TurnConfig | None = None) -> None:
        self._configure(config or TurnConfig())
        self._state = _State.IDLE
        self._pos = 0  # samples fed so far
        self._history: list[np.ndarray] = []  # idle: recent chunks for pre-roll; else the turn
        self._history_len = 0
        self._turn_start = 0  # sample index of the turn's first kept sample
        self._onset = 0  # sample index where speech was first seen
        self._silence_start = 0
        self._verdict: bool | None = None  # the end-of-turn model on this silence (None: fixed rule)

    def _configure(self, config: TurnConfig) -> None:
        self.config = config
        self._pre_roll = int(config.pre_roll_s * SAMPLE_RATE)
        self._min_speech = int(config.min_speech_s * SAMPLE_RATE)
        self._min_silence = int(config.min_silence_s * SAMPLE_RATE)
        self._max_turn = int(config.max_turn_s * SAMPLE_RATE)
        self._min_silence_complete = int(config.min_silence_s_complete * SAMPLE_RATE)
        self._max_silence = int(config.max_silence_s * SAMPLE_RATE)

    def reconfigure(self, **changes: float) -> None:
        """Change settings mid-stream (e.g. min_silence_s from a session.update)."""
        self._configure(replace(self.config, **changes))

    def set_verdict(self, t: float, p_complete: float | None) -> None:
        """The end-of-turn model's P(complete) on the silence that began at `t` (SilenceBegan.t);
        None: it failed (the fixed rule decides). A verdict on an earlier silence is ignored."""
        if self._state is _State.TRAILING and round(t * SAMPLE_RATE) == self._silence_start:
            c = self.config
            if p_complete is None or c.incomplete_threshold <= p_complete < c.complete_threshold:
                self._verdict = None  # failed, or unsure: the fixed rule
            else:
                self._verdict = p_complete >= c.complete_threshold

    def _silence_needed(self) -> int:
        if self._verdict is None:
            return self._min_silence
        return self._min_silence_complete if self._verdict else self._max_silence

    @property
    def silence_s(self) -> float:
        """Seconds of the silence in progress (0 outside one)."""
        return (self._pos - self._silence_start) / SAMPLE_RATE if self._state is _State.TRAILING else 0.0

    @property
    def in_speech(self) -> bool:
        return self._state in (_State.SPEECH, _State.TRAILING)

    def feed(self, chunk: np.ndarray, prob: float) -> list[Signal]:
        """Feed one chunk of audio and its speech probability."""
        c = self.config
        start, self._pos = self._pos, self._pos + chunk.size
        out: list[Signal] = []
        self._history.append(chunk)
        self._history_len += chunk.size
        state = self._state
        if state is _State.IDLE:
            if prob >= c.threshold:
                self._state, self._onset = _State.ONSET, start
                self._turn_start = max(0, start - self._pre_roll)
            self._trim_pre_roll()
        elif state is _State.ONSET:
            if prob < c.neg_threshold:
                self._state = _State.IDLE
                self._trim_pre_roll()
            elif self._pos - self._onset >= self._min_speech:
                self._state = _State.SPEECH
                out.append(SpeechStarted(self._onset / SAMPLE_RATE))
        elif state is _State.SPEECH:
            if prob < c.neg_threshold:
                self._state, self._silence_start, self._verdict = _State.TRAILING, start, None
                out.append(SilenceBegan(start / SAMPLE_RATE, self._turn_start / SAMPLE_RATE,
                                        self._audio(self._turn_start, start)))
        elif state is _State.TRAILING:
            if prob >= c.threshold:
                self._state = _State.SPEECH
                out.append(SpeechResumed(start / SAMPLE_RATE))
            elif self._pos - self._silence_start >= self._silence_needed():
                out += self._commit(self._silence_start, split=False)
        if self.in_speech and self._pos - self._turn_start >= self._max_turn:
            out += self._commit(self._turn_start + self._max_turn, split=True)
        return out

    def flush(self) -> list[Signal]:
        """End of stream: a turn in progress commits (trailing silence excluded)."""
        if not self.in_speech:
            return []
        end = self._silence_start if self._state is _State.TRAILING else self._pos
        return self._commit(end, split=False)

    def _commit(self, end: int, split: bool) -> list[Signal]:
        audio = self._audio(self._turn_start, end)
        committed = TurnCommitted(self._turn_start / SAMPLE_RATE, end / SAMPLE_RATE, audio, split)
        rest = self._audio(end, self._pos)
        self._history, self._history_len = [rest], rest.size
        if split and self._state is _State.SPEECH:
            # Speech goes on: the next turn starts right here, no pre-roll needed.
            self._turn_start = end
            return [committed]
        if split:  # cut during trailing silence: what follows is silence, not a new turn
            self._state = _State.IDLE
            return [SpeechStopped(self._silence_start / SAMPLE_RATE), committed]
        self._state = _State.IDLE
        self._trim_pre_roll()
        return [SpeechStopped(end / SAMPLE_RATE), committed]

    def _audio(self, start: int, end: int) -> np.ndarray:
        """Samples [start, end) out of the kept history (which ends at self._pos)."""
        buf = np.concatenate(self._history) if len(self._history) != 1 else self._history[0]
        self._history = [buf]
        first = self._pos - buf.size
        return buf[start - first : end - first].copy()

    def _trim_pre_roll(self) -> None:
        # Keep the oldest chunks only while they can still be pre-roll of a future onset.
        while self._history and self._history_len - self._history[0].size >= self._pre_roll + 512:
            self._history_len -= self._history.pop(0).size
