"""Preemptive answers, and the stamps of a turn's way from end of speech to first sound.

`Preemption` is a pure state machine (the turn detector's signals and the audio clock in,
actions out, no asyncio): once silence has lasted `after_s` (not at the first quiet chunk:
a breath is no end) it says `Start`; the session then runs the turn's real answer —
generation and speech — with everything it would emit held back. When the turn commits
with exactly that audio it says `Promote` (the held answer is released at once and goes
on); when speech resumes, or the commit is another turn, it says `Discard` (the answer is
cancelled and nothing of it was ever emitted). At most one per session at a time.

    idle ──SilenceBegan──▶ waiting ──silence ≥ after_s──▶ running ──TurnCommitted (same end)──▶ Promote
      ▲                       │                             │
      └──── SpeechResumed ────┴──── SpeechResumed, other commit: Discard ──┘

`Held` is the session's side of one running preemptive answer: the events it buffers and
the gate its response waits at before anything irreversible (history, tool calls).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from agent import turns


@dataclass(frozen=True)
class Start:
    """Run the answer to the turn that ends at `end` (its audio is `audio`) now, held."""

    end: float
    audio: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class Promote:
    """The turn committed as preempted: release the held answer."""


@dataclass(frozen=True)
class Discard:
    """Speech resumed (or another turn committed): cancel the held answer, emit nothing of it."""


Action = Start | Promote | Discard


class _State(Enum):
    IDLE = "idle"
    WAITING = "waiting"  # silence began; not long enough yet
    RUNNING = "running"  # an answer is held


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


class Held:
    """One preemptive answer being made: its events wait here until `release`."""

    def __init__(self, turn_id: str, instruction: str | None) -> None:
        self.turn_id = turn_id
        self.instruction = instruction  # what it was made with: a commit with another one discards it
        self.events: list[Any] = []
        self.committed = False
        self.committed_at = 0.0  # monotonic
        self.failed = False  # its generation failed before the commit
        self.task: asyncio.Task[None] | None = None
        self._open = asyncio.Event()

    def hold(self, event: Any) -> bool:
        """Keep `event` if it belongs to this answer and the turn has not committed."""
        if self.committed or getattr(event, "turn_id", None) != self.turn_id:
            return False
        if getattr(event, "type", "") == "error" and not str(getattr(event, "code", "")).startswith("tts_"):
            self.failed = True  # e.g. busy: the commit asks again rather than report it
        self.events.append(event)
        return True

    def release(self) -> list[Any]:
        """The turn committed: the held events, in order; from now on the answer runs as any other."""
        self.committed, self.committed_at = True, time.monotonic()
        self._open.set()
        events, self.events = self.events, []
        return events

    async def opened(self) -> None:
        """Wait until the turn commits (a discarded answer is cancelled while waiting)."""
        await self._open.wait()


@dataclass
class TurnStamps:
    """Monotonic wall times of one turn's stages; `timings` counts each from the end of speech."""

    speech_end: float | None = None  # the VAD's last speech chunk was processed
    end_detected: float | None = None  # silence began (the first chunk below neg_threshold)
    commit: float | None = None  # the turn committed
    first_token: float | None = None  # the first text delta reached the client
    first_clause: float | None = None  # the first clause went to the TTS engine
    first_audio: float | None = None  # the TTS engine gave its first audio
    first_frame: float | None = None  # the first audio frame went out

    TEXT = ("end_detected", "commit", "first_token")
    SPEECH = ("first_clause", "first_audio", "first_frame")

    def observe(self, event: Any, speech: Any = None) -> None:
        """Stamp an answer's event as it goes out: its first `response.delta`, `response.done`
        (timings of the text stages added), `response.audio.started` (all stages; `speech`:
        the voice's `SpeechStats`, for the first clause and the engine's first audio)."""
        kind = getattr(event, "type", "")
        if kind == "response.delta":
            self.first_token = self.first_token or time.monotonic()
        elif kind == "response.done":
            event.timings.update(self.timings(self.TEXT))
        elif kind == "response.audio.started":
            self.first_frame = time.monotonic()
            if speech is not None:
                self.first_clause, self.first_audio = speech.first_piece_at, speech.first_audio_at
            event.timings.update(self.timings())

    def timings(self, stages: tuple[str, ...] = TEXT + SPEECH) -> dict[str, float]:
        """`speech_end_to_<stage>`: seconds from the end of speech to each stage reached."""
        if self.speech_end is None:
            return {}
        out = {"speech_end_at": round(self.speech_end, 4)}  # this host's monotonic clock (hop tables)
        for stage in stages:
            t = getattr(self, stage)
            if t is not None:
                out[f"speech_end_to_{stage}"] = round(t - self.speech_end, 4)
        return out
