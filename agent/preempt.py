"""When to start a preemptive answer: the turn detector's signals and the audio clock in.

`Preemption` is a pure state machine (the turn detector's signals and the audio clock in,
actions out, no asyncio): once silence has lasted `after_s` (not at the first quiet chunk:
a breath is no end) it says `Start`; the session then runs the turn's real answer —
generation and speech — with everything it would emit kept back. When the turn commits
with exactly that audio it says `Promote` (the preemptive answer is published at once and goes
on); when speech resumes, or the commit is another turn, it says `Discard` (the answer is
cancelled and nothing of it was ever emitted). At most one per session at a time.

    idle ──SilenceBegan──▶ waiting ──silence ≥ after_s──▶ running ──TurnCommitted (same end)──▶ Promote
      ▲                       │                             │
      └──── SpeechResumed ────┴──── SpeechResumed, other commit: Discard ──┘

The answer itself — kept back, promoted or dropped — is a `Reply` (agent/reply.py), run by
`agent/replies.py`; this machine only says when one starts and whether a commit is its turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from agent import turns


@dataclass(frozen=True)
class Start:
    """Run the answer to the turn that ends at `end` (its audio is `audio`) now, kept back."""

    end: float
    audio: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class Promote:
    """The turn committed as preempted: publish the preemptive answer."""


@dataclass(frozen=True)
class Discard:
    """Speech resumed (or another turn committed): drop the preemptive answer, emit nothing of it."""


Action = Start | Promote | Discard


class _State(Enum):
    IDLE = "idle"
    WAITING = "waiting"  # silence began; not long enough yet
    RUNNING = "running"  # a preemptive answer is being made


class Preemption:
    def __init__(self, after_s: float = 0.16, enabled: bool = True) -> None:
        self.after_s = after_s
        self.enabled = enabled
        self._state = _State.IDLE
        self._silence: turns.SilenceBegan | None = None
        self.started = self.promoted = self.discarded = 0  # counters

    @property
    def running(self) -> bool:
        return self._state is _State.RUNNING

    def on_signal(self, signal: turns.Signal, allowed: bool = True) -> Action | None:
        """A detector signal; `allowed`: whether this silence may start one (the session
        says no while the agent is speaking, with manual turns, …)."""
        if isinstance(signal, turns.SilenceBegan):
            stale = self._drop()  # cannot happen after Discard/Promote, but never leave one running
            if self.enabled and allowed:
                self._state, self._silence = _State.WAITING, signal
            return stale
        if isinstance(signal, turns.SpeechResumed):
            return self._drop()
        if isinstance(signal, turns.TurnCommitted):
            silence = self._silence
            if self._state is _State.RUNNING and silence is not None and signal.end == silence.t and not signal.split:
                self._state, self._silence = _State.IDLE, None
                self.promoted += 1
                return Promote()
            return self._drop()
        return None

    def tick(self, now: float) -> Start | None:
        """The audio clock (seconds fed); starts the answer once silence lasted `after_s`."""
        silence = self._silence
        if self._state is _State.WAITING and silence is not None and now - silence.t >= self.after_s - 1e-9:
            self._state = _State.RUNNING
            self.started += 1
            return Start(silence.t, silence.audio)
        return None

    def cancel(self) -> Discard | None:
        """The owner drops the turn in progress (clear, close)."""
        return self._drop()

    def _drop(self) -> Discard | None:
        running = self._state is _State.RUNNING
        self._state, self._silence = _State.IDLE, None
        if running:
            self.discarded += 1
            return Discard()
        return None
