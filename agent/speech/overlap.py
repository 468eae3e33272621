"""Speech that begins while the agent answers: barge-in, backchannel or the agent's own echo.

A pure state machine (no clock, no audio, no asyncio): the session feeds it the detector's
signals and the time in samples, and asks it what to do. Speech over the answer interrupts it
only once it has lasted `min_speech_s` and is not the agent's own voice coming back; shorter
speech (a backchannel, "mm-hm") and echo leave the answer alone and never become a turn.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum


class Kind(Enum):
    UNDECIDED = "undecided"  # too short so far: a backchannel if it ends now
    ECHO = "echo"  # not clearly louder than what the agent plays (re-checked: the user may join in)
    BARGE = "barge"  # interrupts the answer
    TURN = "turn"  # the answer ended meanwhile: an ordinary turn


class Overlap:
    def __init__(self, min_speech_s: float) -> None:
        self.min_speech_s = min_speech_s
        self.start: float | None = None  # when the overlapping speech began (None: no overlap)
        self.kind = Kind.UNDECIDED
        self.talking = False  # the user's voice is on now (speech, not its trailing silence)

    def speech_started(self, t: float, agent_busy: bool) -> None:
        self.talking = True
        self.start, self.kind = (t, Kind.UNDECIDED) if agent_busy else (None, Kind.UNDECIDED)

    def speech_paused(self) -> None:
        self.talking = False

    def speech_resumed(self) -> None:
        self.talking = True

    def step(self, now: float, agent_busy: bool, is_echo: Callable[[], bool]) -> Kind | None:
        """After each chunk: the new kind when it changed to ECHO (first time) or BARGE (the
        caller interrupts the answer), else None."""
        if self.start is None or self.kind in (Kind.BARGE, Kind.TURN) or not self.talking:
            return None
        if now - self.start < self.min_speech_s:
            return None
        if not agent_busy:
            self.kind = Kind.TURN
            return None
        if is_echo():
            first = self.kind is Kind.UNDECIDED
            self.kind = Kind.ECHO
            return Kind.ECHO if first else None
        self.kind = Kind.BARGE
        return Kind.BARGE

    def turn_committed(self, split: bool) -> Kind | None:
        """A turn ends: UNDECIDED (a backchannel) or ECHO when it must be ignored, else None.
        A split turn (over 30 s) keeps the overlap for its next part."""
        start, kind = self.start, self.kind
        if not split:
            self.start, self.kind = None, Kind.UNDECIDED
        if start is not None and kind in (Kind.UNDECIDED, Kind.ECHO):
            return kind
        return None
