"""The session's side of speech over the agent's voice: a thin adapter around `Overlap`.

It keeps the last second of input (for the echo gate and for the overlapping speech's own
audio, from its onset), asks the detector (`agent.speech.backchannel`) for a verdict, and
carries out what the state machine decides on the voice: pause, resume, and the events
`response.paused`, `response.resumed`, `speech.backchannel`. Cancelling the answer is the
session's (it owns the response task): `step()` and `turn_committed()` say when.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from agent import events as ev
from agent.speech.backchannel import (
    SAMPLE_RATE,
    BargeInConfig,
    Features,
    InterruptionDetector,
    OverlapSpeech,
    level_db,
    load_detector,
    pitch,
)
from agent.speech.overlap import Action, Kind, Overlap, Verdict
from agent.speech.playback import PlaybackReport

log = logging.getLogger(__name__)

RECENT_CHUNKS = 32  # ~1 s of input kept: the onset is reported 0.15 s late, the echo gate looks back 0.5 s
ECHO_CHUNKS = 16  # ~0.5 s of microphone compared with the agent's output
MAX_OVERLAP_S = 4.0  # audio kept of one overlap: far past any backchannel's length
PREROLL_S = 0.2  # audio before the onset handed to detectors (a word's first consonant is often below the VAD)
USER_LEVEL_WEIGHT = 0.3  # the user's level follows their latest turns (an exponential average)


class Playout(Protocol):
    """What barge-in needs of the agent's voice: our own `Voice`, or one an owner plays
    (livekit-agents' AgentSession, agent/integrations/livekit_agents.py)."""

    realtime: bool
    turn_id: str | None

    @property
    def active(self) -> bool: ...  # an answer is playing or about to: something to pause or cancel

    @property
    def sounding(self) -> bool: ...  # it may still be heard (playout margin): echo is possible

    def is_echo(self, mic: np.ndarray, mic_rate: int = 16000) -> bool: ...

    def pause(self) -> bool: ...

    def resume(self) -> bool: ...

    def interrupt(self) -> PlaybackReport | None: ...

    def note_echo(self) -> None: ...

    def note_backchannel(self) -> None: ...


class BargeIn:
    def __init__(self, config: BargeInConfig, voice: Playout | None, emit: Callable[[Any], None],
                 detector: InterruptionDetector | None = None) -> None:
        self.config = config
        self.voice = voice
        self.emit = emit
        self.detector = detector or load_detector(config)
        # Only a live voice can be paused (an offline one is rendered at once).
        live = voice is not None and voice.realtime
        self.overlap = Overlap(pause=config.pause and live, resume_after_s=config.resume_after_s,
                               command_turn=config.command_turn)
        self._recent: deque[tuple[float, np.ndarray, float]] = deque(maxlen=RECENT_CHUNKS)  # (start, chunk, p)
        self._audio: list[np.ndarray] = []  # the overlapping speech from its onset
        self._probs: list[float] = []
        self._paused_at: float | None = None
        self._paused_turn = ""
        # Paused at the first chunk of speech (not 0.15 s later, when the turn detector calls it
        # speech): until it does, the overlap is tentative, dismissed if the VAD drops it.
        self._tentative = False
        self.user_level_db: float | None = None

    @property
    def start(self) -> float | None:
        return self.overlap.start

    # ---- signals ----------------------------------------------------------------------
    def speech_started(self, t: float, busy: bool) -> None:
        """`busy`: an answer runs or plays; its echo may also still come back (playout margin)."""
        if self._tentative and self.overlap.start is not None:
            self._tentative = False  # the speech paused for at its first chunk is confirmed
            self.overlap.speech_resumed()
            return
        self._tentative = False
        tail = self.voice is not None and self.voice.sounding
        self.overlap.speech_started(t, busy or tail)
        self._audio, self._probs, self._paused_turn = [], [], ""
        if self.overlap.start is not None:
            for start, chunk, p in self._recent:
                if start >= t - 1e-6:
                    self._audio.append(chunk)
                    self._probs.append(p)

    def speech_paused(self, t: float) -> None:
        self.overlap.speech_paused(t)

    def speech_resumed(self) -> None:
        self.overlap.speech_resumed()

    # ---- after each chunk ----------------------------------------------------------------
    def step(self, chunk: np.ndarray, prob: float, now: float, busy: bool) -> bool:
        """One chunk heard (ending at `now`, seconds of session audio). True: cancel the answer now."""
        start = now - chunk.size / SAMPLE_RATE
        self._recent.append((start, chunk, prob))
        o = self.overlap
        if o.start is None and o.pause and prob >= self.config.threshold and self.voice is not None \
                and (busy or self.voice.sounding):
            o.speech_started(start, True)  # pause now; the turn detector confirms it later
            self._tentative, self._audio, self._probs, self._paused_turn = True, [], [], ""
        elif self._tentative and prob < self.config.neg_threshold:
            self._tentative = False  # a blip (a click, a cough): no speech after all
            self._audio, self._probs = [], []
            return self._apply(o.dismiss(), now)
        if o.start is None or o.kind in (Kind.BARGE, Kind.TURN):
            return False
        if len(self._probs) * chunk.size < MAX_OVERLAP_S * SAMPLE_RATE:
            self._audio.append(chunk)  # after a command too: its turn is judged again, whole, at its end
            self._probs.append(prob)
        return self._apply(o.step(now, busy, self._is_echo, self._judge), now)

    def turn_committed(self, audio: np.ndarray, split: bool, now: float) -> tuple[Kind | None, bool]:
        """A turn ends: (RESUMED for a backchannel / ECHO: no turn; None: a real turn, whether
        to cancel the answer first)."""
        start = self.overlap.start
        ignored, actions = self.overlap.turn_committed(split, self._judge)
        cancel = self._apply(actions, now)
        if ignored is Kind.RESUMED and start is not None:
            self._backchannel(start)
        elif ignored is Kind.ECHO:
            log.info("speech at %.2f s taken for the agent's own voice", start)
        elif ignored is Kind.COMMAND:
            log.info("a command at %.2f s stopped the answer; no turn of its own", start)
        elif ignored is None and not split:
            # the user's own level, for "louder than usual" (their real turns, not backchannels)
            level = level_db(audio)
            if level > -60:
                prev = self.user_level_db
                self.user_level_db = level if prev is None else prev + USER_LEVEL_WEIGHT * (level - prev)
        if not split:
            self._audio, self._probs = [], []
        return ignored, cancel

    # ---- internals ------------------------------------------------------------------------
    def _is_echo(self) -> bool:
        if self.voice is None:
            return False
        mic = [c for _, c, _ in list(self._recent)[-ECHO_CHUNKS:]]
        return bool(mic) and self.voice.is_echo(np.concatenate(mic))

    def _speech(self, ended: bool) -> OverlapSpeech:
        audio = np.concatenate(self._audio) if self._audio else np.zeros(0, np.float32)
        start = self.overlap.start
        before = [c for s, c, _ in self._recent if start is not None and start - PREROLL_S - 1e-6 <= s < start - 1e-6]
        preroll = np.concatenate(before) if before else np.zeros(0, np.float32)
        return OverlapSpeech(audio, np.asarray(self._probs, np.float32), ended, self.user_level_db,
                             self.config.threshold, preroll)

    def _judge(self, ended: bool) -> Verdict:
        if self._tentative:
            return Verdict.UNDECIDED  # not speech yet: nothing to judge
        try:
            return self.detector.judge(self._speech(ended))
        except Exception:  # a plugin's detector failing must not cost the answer nor the turn
            log.exception("interruption detector %s failed; the duration rule decides", self.config.backchannel)
            speech = self._speech(ended)
            if speech.duration_s >= self.config.backchannel_max_s:
                return Verdict.INTERRUPTION
            return Verdict.BACKCHANNEL if ended else Verdict.UNDECIDED

    def _apply(self, actions: list[Action], now: float) -> bool:
        voice, cancel = self.voice, False
        for action in actions:
            if voice is None:
                cancel |= action is Action.CANCEL
                continue
            if action is Action.PAUSE:
                voice.pause()
                self._paused_at, self._paused_turn = now, voice.turn_id or ""
                self.emit(ev.ResponsePaused(turn_id=self._paused_turn, t=round(now, 3)))
            elif action is Action.RESUME:
                if voice.resume() or self._paused_at is not None:
                    paused_s = now - self._paused_at if self._paused_at is not None else 0.0
                    self.emit(ev.ResponseResumed(turn_id=self._paused_turn, t=round(now, 3),
                                                 paused_s=round(paused_s, 3)))
                self._paused_at = None
            elif action is Action.CANCEL:
                self._paused_at = None
                cancel = True
            elif action is Action.ECHO:
                voice.note_echo()
                log.info("speech at %.2f s taken for the agent's own voice", self.overlap.start)
        return cancel

    def _backchannel(self, start: float) -> None:
        speech = self._speech(True)
        last = getattr(self.detector, "last", None)  # the feature detector's, or the command detector's
        features = last.as_dict() if isinstance(last, Features) else {"duration_s": round(speech.duration_s, 3)}
        pitch_range, voiced = pitch(speech.speech_part())  # reported, not decided on: once, here
        features.update(pitch_range_st=round(pitch_range, 1), voiced=round(voiced, 2))
        if self.voice is not None:
            self.voice.note_backchannel()
        self.emit(ev.SpeechBackchannel(start=round(start, 3), end=round(start + speech.duration_s, 3),
                                       turn_id=self._paused_turn or (self.voice.turn_id if self.voice else None),
                                       detector=self.config.backchannel, features=features))
        log.info("backchannel at %.2f s (%.2f s) ignored while the agent speaks", start, speech.duration_s)
