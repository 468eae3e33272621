"""One answer's whole life as a pure state machine: no asyncio, no clock of its own.

A `Reply` is made when the user's silence begins (the turn may have ended: its prompt is
prefilled) or when a turn commits without one. The session routes the turn detector's
signals, the overlap decision and the client's commands to it; `agent/replies.py` carries
out what it decides (backend calls, the generation task, the voice).

Its request:

    speculative ──preempt()──▶ preemptive ──promote()──▶ committed ──finish()──▶ finished
         │  ▲                      │                          ▲
         │  └────── withdraw() ────┘                          │
         └──────────────────────── commit() ──────────────────┘
    speculative | preemptive ──drop()──▶ dropped   (speech resumed, another turn, clear, close)

- speculative: the turn's prompt is prefilled; nothing is generated yet.
- preemptive: the answer is generated and spoken during the silence; every event of it is
  *kept* (`admit` says no), nothing goes into the history, its voice is *withheld*.
- committed: its turn committed; the kept events go out in order (`promote`), the voice is
  released, the history is written, tools run.
- dropped: never committed — users never see any of it, not even a cancellation.

Its voice turn (`VoiceTurn`), followed from what the reply decides and the events of its voice:

    silent ──begin──▶ withheld (preemptive) ──promote──▶ playing ⇄ paused ──▶ ended | interrupted
              └────────────────────────────────▶ playing

`TurnStamps` are the monotonic times of a turn's stages, from the end of speech to the first
frame of the answer; the reply carries its turn's stamps from the commit on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Stage(Enum):
    SPECULATIVE = "speculative"
    PREEMPTIVE = "preemptive"
    COMMITTED = "committed"
    FINISHED = "finished"  # done, cancelled or failed: the reply said what it will ever say
    DROPPED = "dropped"


class VoiceTurn(Enum):
    SILENT = "silent"  # no voice begun (text only, or not yet)
    WITHHELD = "withheld"  # synthesized, not sent: the answer is preemptive
    PLAYING = "playing"
    PAUSED = "paused"  # speech over it, not judged yet (agent/speech/bargein.py)
    ENDED = "ended"
    INTERRUPTED = "interrupted"


class ReplyError(RuntimeError):
    """A transition the machine does not have (a bug in the caller)."""


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

    def observe(self, event: Any, now: float, speech: Any = None) -> None:
        """Stamp an answer's event as it goes out: its first `response.delta`, `response.done`
        (timings of the text stages added), `response.audio.started` (all stages; `speech`:
        the voice's `SpeechStats`, for the first clause and the engine's first audio)."""
        kind = getattr(event, "type", "")
        if kind == "response.delta":
            self.first_token = self.first_token or now
        elif kind == "response.done":
            event.timings.update(self.timings(self.TEXT))
        elif kind == "response.audio.started":
            self.first_frame = now
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


@dataclass
class Reply:
    """One answer: `end` is the end of the user's turn it answers (seconds of session audio;
    None for an answer asked by the owner), `instruction` what its preemptive answer was made with."""

    turn_id: str
    end: float | None = None
    stage: Stage = Stage.SPECULATIVE
    voice: VoiceTurn = VoiceTurn.SILENT
    instruction: str | None = None
    stamps: TurnStamps = field(default_factory=TurnStamps)
    committed_at: float | None = None  # monotonic
    failed: bool = False  # its preemptive generation failed: the commit asks again rather than report it
    cancel_reason: str | None = None
    heard: str | None = None  # what the user heard of it when a barge-in cut it
    kept: list[Any] = field(default_factory=list, repr=False)  # a preemptive answer's events

    @classmethod
    def committed(cls, turn_id: str, now: float, stamps: TurnStamps | None = None, end: float | None = None) -> Reply:
        """An answer to a turn that committed without a speculative one (or asked by the owner)."""
        reply = cls(turn_id, end)
        reply.commit(now, stamps)
        return reply

    # ---- its request ----
    @property
    def pending(self) -> bool:
        """Its turn has not committed: it may still be dropped without a trace."""
        return self.stage in (Stage.SPECULATIVE, Stage.PREEMPTIVE)

    @property
    def preemptive(self) -> bool:
        return self.stage is Stage.PREEMPTIVE

    @property
    def writes_history(self) -> bool:
        """What it says is the conversation's (a preemptive answer's is not, yet)."""
        return self.stage in (Stage.COMMITTED, Stage.FINISHED)

    def preempt(self, instruction: str | None) -> bool:
        """Generate the answer now, kept back. Whether it started (only a speculative one does)."""
        if self.stage is not Stage.SPECULATIVE:
            return False
        self.stage, self.instruction = Stage.PREEMPTIVE, instruction
        return True

    def serves(self, instruction: str | None) -> bool:
        """Whether its preemptive answer is the answer to its turn as committed."""
        return self.stage is Stage.PREEMPTIVE and not self.failed and instruction == self.instruction

    def withdraw(self) -> bool:
        """Its preemptive answer is not wanted (the turn changed, the agent speaks first): back
        to speculative, nothing of it kept. Whether there was one to stop."""
        if self.stage is not Stage.PREEMPTIVE:
            return False
        self.stage, self.kept, self.failed, self.voice = Stage.SPECULATIVE, [], False, VoiceTurn.SILENT
        return True

    def commit(self, now: float, stamps: TurnStamps | None = None) -> None:
        """Its turn committed; the answer is generated from now on."""
        if self.stage is not Stage.SPECULATIVE:
            raise ReplyError(f"commit from {self.stage.value}")
        self.stage, self.committed_at = Stage.COMMITTED, now
        if stamps is not None:
            self.stamps = stamps

    def promote(self, now: float, stamps: TurnStamps | None = None) -> list[Any]:
        """Its turn committed as preempted: the kept events, in order; its voice is released."""
        if self.stage is not Stage.PREEMPTIVE:
            raise ReplyError(f"promote from {self.stage.value}")
        self.stage, self.committed_at = Stage.COMMITTED, now
        if stamps is not None:
            self.stamps = stamps
        if self.voice is VoiceTurn.WITHHELD:
            self.voice = VoiceTurn.PLAYING
        events, self.kept = self.kept, []
        return events

    def drop(self) -> bool:
        """Its turn never came (speech resumed, another turn, clear, close). Whether it was
        pending (the backend then forgets its prefill)."""
        if not self.pending:
            return False
        self.stage, self.kept = Stage.DROPPED, []
        return True

    def cancel(self, reason: str) -> None:
        """Stop it (a barge-in, a new answer, the client, a close); the first reason is its reason."""
        self.cancel_reason = self.cancel_reason or reason

    def finish(self) -> None:
        if self.stage is Stage.COMMITTED:
            self.stage = Stage.FINISHED

    # ---- its events ----
    def admit(self, event: Any) -> bool:
        """Whether `event` (one of its own) goes out now; a preemptive answer's are kept."""
        if self.stage is Stage.DROPPED:
            return False  # the last breath of a dropped answer: never seen
        if self.stage is not Stage.PREEMPTIVE or getattr(event, "type", "") == "turn.committed":
            return True
        if getattr(event, "type", "") == "error" and not str(getattr(event, "code", "")).startswith("tts_"):
            self.failed = True  # e.g. busy: the commit asks again rather than report it
        self.kept.append(event)
        return False

    def observe(self, event: Any, now: float, speech: Any = None) -> None:
        """One of its events goes out: its stamps, and its voice as the player reports it."""
        if self.committed_at is not None:
            self.stamps.observe(event, now, speech)
        kind = getattr(event, "type", "")
        if kind == "response.paused":
            self.voice = VoiceTurn.PAUSED
        elif kind in ("response.resumed", "response.audio.started") and self.voice is not VoiceTurn.WITHHELD:
            self.voice = VoiceTurn.PLAYING
        elif kind == "response.audio.done":
            self.voice = VoiceTurn.INTERRUPTED if getattr(event, "interrupted", False) else VoiceTurn.ENDED

    # ---- its voice ----
    def begin_voice(self) -> bool:
        """Its voice begins; whether it is withheld (a preemptive answer: made, not sent)."""
        self.voice = VoiceTurn.WITHHELD if self.stage is Stage.PREEMPTIVE else VoiceTurn.PLAYING
        return self.voice is VoiceTurn.WITHHELD

    @property
    def withheld(self) -> bool:
        return self.voice is VoiceTurn.WITHHELD


class TurnIds:
    """A session's turn ids, `<session>-t<n>`, counting 1, 2, 3 as users see them: the number of
    a reply dropped before its turn committed goes to the next turn (the backend has dropped it
    before that id is used again)."""

    def __init__(self, session_id: str) -> None:
        self.prefix = f"{session_id}-t"
        self.n = 0

    def next(self) -> str:
        self.n += 1
        return self.last

    @property
    def last(self) -> str:
        return f"{self.prefix}{self.n}"

    def give_back(self, turn_id: str) -> None:
        if turn_id == self.last and self.n > 0:
            self.n -= 1

    def issued(self, turn_id: str) -> bool:
        """Whether `turn_id` is one of this session's (a rating names one)."""
        n = turn_id.removeprefix(self.prefix)
        return n != turn_id and n.isdigit() and 0 < int(n) <= self.n
