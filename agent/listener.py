"""The user's side of one session: audio in, the turn in progress out.

    samples → VAD stream → (32 ms chunk, speech probability) → TurnDetector → signals

It keeps what belongs to the user's turn before any reply exists: the audio the VAD has not
scored yet, the audio clock, the end-of-turn model's verdict on the current silence, the
preemptive-start timer (agent/preempt.py), the stamps of the turn in progress and, with manual
turns, the speech the owner has not committed yet. No decision is taken here: the session
routes the signals.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np

from agent import turns
from agent.eot import EndOfTurnService, PendingVerdict
from agent.preempt import Preemption, Start
from agent.reply import TurnStamps
from agent.vad import CHUNK, VADStream

log = logging.getLogger(__name__)

MAX_UNCOMMITTED_S = 120.0  # manual turns: speech kept for commit() beyond this drops its oldest part
CHUNK_S = CHUNK / turns.SAMPLE_RATE

Spawn = Callable[[Coroutine[Any, Any, Any], str], "asyncio.Task[Any] | None"]


class Listener:
    def __init__(self, vad: VADStream, detector: turns.TurnDetector, preempt: Preemption,
                 end_of_turn: EndOfTurnService | None, spawn: Spawn, name: str = "") -> None:
        self.vad = vad
        self.detector = detector
        self.preempt = preempt
        self._eot = end_of_turn
        self._spawn = spawn
        self._name = name
        self._unscored: list[np.ndarray] = []  # audio the VAD has not scored yet
        self.pos = 0  # samples the detector has seen
        self.stamps = TurnStamps()  # the turn in progress (its reply takes them at the commit)
        self._verdict: PendingVerdict | None = None  # the end-of-turn model on this silence
        self.uncommitted: list[turns.TurnCommitted] = []  # manual turns: speech not committed yet
        self.uncommitted_dropped_s = 0.0  # … dropped beyond MAX_UNCOMMITTED_S

    @property
    def now(self) -> float:
        """Seconds of session audio heard."""
        return self.pos / turns.SAMPLE_RATE

    async def score(self, samples: np.ndarray) -> list[tuple[np.ndarray, float]]:
        """The VAD's (chunk, speech probability) pairs for the audio scored so far."""
        probs = await self.vad.process(samples)
        self._unscored.append(samples)
        if not probs.size:
            return []
        buf = np.concatenate(self._unscored)
        self._unscored = [buf[probs.size * CHUNK :]]
        return [(buf[i * CHUNK : (i + 1) * CHUNK], float(p)) for i, p in enumerate(probs)]

    async def feed(self, chunk: np.ndarray, prob: float) -> list[turns.Signal]:
        """One chunk to the detector (the end-of-turn verdict first, once it is needed)."""
        det = self.detector
        self.pos += CHUNK
        if prob >= det.config.neg_threshold:
            self.stamps.speech_end = time.monotonic()
        if (verdict := self._verdict) is not None and verdict.needed(det.silence_s, CHUNK_S,
                                                                     det.config.min_silence_s_complete):
            self._verdict = None
            det.set_verdict(verdict.t, await verdict.result())  # stale: ignored
        return det.feed(chunk, prob)

    def tick(self) -> Start | None:
        """A preemptive answer starts now (silence lasted long enough)."""
        return self.preempt.tick(self.now)

    def silence_began(self, signal: turns.SilenceBegan, may_preempt: bool) -> None:
        self.stamps.end_detected = time.monotonic()
        self.preempt.on_signal(signal, may_preempt)
        if self._eot is not None and (call := self._spawn(self._eot.predict(signal.audio), "eot")) is not None:
            self._verdict = PendingVerdict(signal.t, call)  # the model decides how long this silence must last

    def turn_committed(self, signal: turns.TurnCommitted) -> None:
        self.stamps.commit = time.monotonic()
        self.preempt.on_signal(signal)

    def take_stamps(self, committed_at: float) -> TurnStamps:
        """The committed turn's stamps, for its reply; the next turn starts afresh."""
        stamps, self.stamps = self.stamps, TurnStamps()
        stamps.commit = stamps.commit or committed_at
        return stamps

    # ---- manual turns: speech kept for the owner's commit() ----
    def keep(self, turn: turns.TurnCommitted) -> None:
        """Keep speech for the owner's commit(), bounded: the oldest goes first (logged)."""
        self.uncommitted.append(turn)
        kept_s = sum(t.audio.size for t in self.uncommitted) / turns.SAMPLE_RATE
        while kept_s > MAX_UNCOMMITTED_S and len(self.uncommitted) > 1:
            dropped = self.uncommitted.pop(0).audio.size / turns.SAMPLE_RATE
            kept_s -= dropped
            self.uncommitted_dropped_s += dropped
            log.warning("session %s: %.1f s of uncommitted speech dropped (more than %.0f s kept)",
                        self._name, dropped, MAX_UNCOMMITTED_S)

    def take_uncommitted(self) -> turns.TurnCommitted | None:
        """All uncommitted speech as one turn (None: there is none)."""
        parts, self.uncommitted = self.uncommitted, []
        if not parts:
            return None
        return turns.TurnCommitted(parts[0].start, parts[-1].end, np.concatenate([t.audio for t in parts]))
