"""Speech that begins while the agent answers: pause, then decide — backchannel, barge-in or echo.

A pure state machine (no clock, no audio, no asyncio): the session's adapter
(`agent.speech.bargein.BargeIn`) feeds it the turn detector's signals and the time in
seconds of session audio, and carries out the actions it returns.

    speech over the answer ──not echo──▶ PAUSED (voice paused at once, the answer kept)
        │ judge: interruption (too long, too much content, …) ─▶ BARGE: cancel the answer
        │ judge: a command ("stop", "wait") ─▶ COMMAND: cancel the answer; no turn of its own
        │        (unless `command_turn`: then a real turn, as BARGE; speech that goes on after
        │        it is judged again, whole, when its turn ends: a turn unless still a command)
        │ speech ended, judge: backchannel, `resume_after_s` of silence ─▶ RESUMED: voice goes on
        │        (speech again ─▶ PAUSED; the turn commits ─▶ a backchannel: no turn at all)
    speech that is the agent's own voice coming back ─▶ ECHO (re-checked: the user may join in)
    speech when nothing is playing, or the answer ended meanwhile ─▶ TURN (an ordinary turn)

With `pause=False` nothing is paused: the answer plays on until the judge says interruption
(the duration-only rule this replaced: `interrupt_min_speech_s`).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum


class Kind(Enum):
    UNDECIDED = "undecided"  # speech on, not yet known to be the user's (or, without pause: too short so far)
    ECHO = "echo"  # not clearly louder than what the agent plays (re-checked: the user may join in)
    PAUSED = "paused"  # the user's speech over the answer: voice paused, waiting for the judge
    RESUMED = "resumed"  # judged a backchannel: the voice goes on; final when the turn commits
    BARGE = "barge"  # interrupts the answer
    COMMAND = "command"  # a short command ("stop"): the answer is cancelled, nothing more to answer
    TURN = "turn"  # nothing to interrupt (the answer ended meanwhile): an ordinary turn


class Verdict(Enum):
    BACKCHANNEL = "backchannel"
    INTERRUPTION = "interruption"
    COMMAND = "command"  # a short command ("stop", "wait"): cancel; not a turn unless `command_turn`
    UNDECIDED = "undecided"  # not yet (the speech goes on, or the detector waits for more)


class Action(Enum):
    PAUSE = "pause"  # stop the voice now, keep the answer
    RESUME = "resume"  # go on where it paused
    CANCEL = "cancel"  # the answer is interrupted (what was heard stays)
    ECHO = "echo"  # speech taken for the agent's own voice (reported once per overlap)


# judge(ended): the detector's verdict on the overlapping speech so far; `ended` once its
# speech has stopped (trailing silence), else while it goes on.
Judge = Callable[[bool], Verdict]


class Overlap:
    def __init__(self, *, pause: bool = True, resume_after_s: float = 0.2, command_turn: bool = False) -> None:
        self.pause = pause
        self.command_turn = command_turn
        self.resume_after_s = resume_after_s
        self.start: float | None = None  # when the overlapping speech began (None: no overlap)
        self.kind = Kind.UNDECIDED
        self.talking = False  # the user's voice is on now (speech, not its trailing silence)
        self.silent_since: float | None = None  # when its speech last stopped
        self.paused_at: float | None = None  # when the voice was paused (None: not paused by us)
        self.recheck = False  # a command's speech went on after it was carried out

    # ---- the turn detector's signals ---------------------------------------------------
    def speech_started(self, t: float, agent_busy: bool) -> None:
        """`agent_busy`: an answer is running or playing, or its echo may still come back."""
        self.talking, self.silent_since, self.recheck = True, None, False
        self.start, self.kind = (t, Kind.UNDECIDED) if agent_busy else (None, Kind.UNDECIDED)

    def speech_paused(self, t: float) -> None:
        if self.talking:
            self.talking, self.silent_since = False, t

    def speech_resumed(self) -> None:
        self.talking, self.silent_since = True, None
        if self.kind is Kind.COMMAND:
            self.recheck = True  # "wait, … I have a question": judged again, whole, when the turn ends

    def dismiss(self) -> list[Action]:
        """The speech never was (a blip the turn detector dropped before calling it speech):
        forget it; a voice paused for it goes on."""
        paused = self.kind is Kind.PAUSED
        self.start, self.kind, self.talking, self.silent_since, self.paused_at = None, Kind.UNDECIDED, False, None, None
        return [Action.RESUME] if paused else []

    # ---- after each chunk ----------------------------------------------------------------
    def step(self, now: float, agent_busy: bool, is_echo: Callable[[], bool], judge: Judge) -> list[Action]:
        """`agent_busy`: an answer is running or playing (something to pause or cancel);
        `is_echo()`: the speech may be the agent's own voice (its playout margin included)."""
        kind = self.kind
        if self.start is None or kind in (Kind.BARGE, Kind.TURN, Kind.COMMAND):
            return []
        if kind in (Kind.UNDECIDED, Kind.ECHO):
            if not self.talking:
                return []
            if is_echo():
                self.kind = Kind.ECHO
                return [Action.ECHO] if kind is Kind.UNDECIDED else []
            if not agent_busy:
                self.kind = Kind.TURN  # the answer is over: the user simply speaks next
                return []
            if self.pause:
                self.kind, self.paused_at = Kind.PAUSED, now
                return [Action.PAUSE, *self._judge(now, judge)]
            if (verdict := judge(False)) in (Verdict.INTERRUPTION, Verdict.COMMAND):
                self.kind = self._cancelled(verdict)
                return [Action.CANCEL]
            self.kind = Kind.UNDECIDED
            return []
        if kind is Kind.PAUSED:
            if not agent_busy:
                self.kind, self.paused_at = Kind.TURN, None  # cancelled meanwhile (superseded, client)
                return []
            return self._judge(now, judge)
        if kind is Kind.RESUMED and self.talking and agent_busy:
            self.kind, self.paused_at = Kind.PAUSED, now  # the user goes on after all
            return [Action.PAUSE, *self._judge(now, judge)]
        return []

    def _judge(self, now: float, judge: Judge) -> list[Action]:
        verdict = judge(not self.talking)
        if verdict in (Verdict.INTERRUPTION, Verdict.COMMAND):
            self.kind, self.paused_at = self._cancelled(verdict), None
            return [Action.CANCEL]
        if verdict is Verdict.BACKCHANNEL and not self.talking and self.silent_since is not None \
                and now - self.silent_since >= self.resume_after_s:
            self.kind, self.paused_at = Kind.RESUMED, None
            return [Action.RESUME]
        return []

    def turn_committed(self, split: bool, judge: Judge) -> tuple[Kind | None, list[Action]]:
        """A turn ends. Returns (what to ignore it as, actions): (RESUMED, …) for a backchannel
        — no turn at all — (ECHO, []) for the agent's own voice, (COMMAND, …) for a command
        alone (its answer cancelled, no turn), (None, …) for a real turn.
        A speech still PAUSED is judged now, once and for all (undecided: an interruption).
        A split turn (over 30 s) keeps the overlap for its next part."""
        actions: list[Action] = []
        if self.kind is Kind.PAUSED:
            verdict = judge(True)
            if verdict is Verdict.BACKCHANNEL:
                self.kind, actions = Kind.RESUMED, [Action.RESUME]
            else:
                self.kind, actions = self._cancelled(verdict), [Action.CANCEL]
            self.paused_at = None
        if self.kind is Kind.COMMAND and self.recheck:
            self.kind = self._cancelled(judge(True))  # the answer is cancelled already: a turn or not
        start, kind = self.start, self.kind
        if not split:
            self.recheck = False
            self.start, self.kind, self.paused_at = None, Kind.UNDECIDED, None
        if start is None:
            return None, actions
        if kind in (Kind.UNDECIDED, Kind.RESUMED):  # without pause, UNDECIDED is a short backchannel
            return Kind.RESUMED, actions
        if kind in (Kind.ECHO, Kind.COMMAND):
            return kind, actions  # the command was carried out: nothing to answer
        return None, actions

    def _cancelled(self, verdict: Verdict) -> Kind:
        return Kind.COMMAND if verdict is Verdict.COMMAND and not self.command_turn else Kind.BARGE
