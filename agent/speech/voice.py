"""One session's voice: its answers' deltas → `SpeechStage` → `Player`, with the events.

The session calls `begin(turn_id)` when a response starts, `say(text)` per delta, `end()`
when the text is complete, and `interrupt()` at barge-in. Two outputs:

- live (`realtime=True`): a transport pulls the player's 20 ms frames in real time (the
  WebRTC `AgentAudioTrack`); `response.audio.started/done` follow what really went out.
- offline (`realtime=False`, `voice-agent run --speak-dir`): each answer is rendered as
  fast as the engine goes and handed to `on_audio(turn_id, pcm, rate)` once complete.

A TTS failure is an `error` event; the text answer is not affected (the stage runs in a
task of its own, fed by a queue the response never waits on).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent import events as ev
from agent.speech.base import SpeechEngine, TTSError
from agent.speech.playback import FRAME_S, OUTPUT_RATE, PlaybackReport, Player, play_answer
from agent.speech.stage import SpeechStage, SpeechStats

log = logging.getLogger(__name__)

ECHO_WINDOW_S = 1.0  # output compared with the microphone: covers the echo path's delay
VOICED_RMS = 1e-3  # frames quieter than this are pauses, not part of a level


async def _read(queue: asyncio.Queue[str | None]) -> AsyncIterator[str]:
    while (text := await queue.get()) is not None:
        yield text


def voiced_rms(samples: np.ndarray, frame: int) -> float:
    """RMS over the frames that carry sound (float in [-1, 1]); pauses would dilute a level."""
    n = samples.size // frame
    if n == 0:
        return 0.0
    frames = samples[: n * frame].reshape(n, frame).astype(np.float64)
    rms = np.sqrt((frames**2).mean(axis=1))
    voiced = rms[rms > VOICED_RMS]
    return float(np.sqrt((voiced**2).mean())) if voiced.size else 0.0


@dataclass
class VoiceCounters:
    """Totals over every session's voice in one process (the runtime's), read by /metrics."""

    answers: int = 0  # answers whose playback ended (played out or cut)
    interrupted: int = 0  # of those, cut (barge-in, a new answer, the client, a close)
    played_s: float = 0.0  # audio that went out
    flushed_s: float = 0.0  # audio made but dropped unplayed when an answer was cut
    underruns: int = 0  # frames in which the engine was behind playback: a gap the user hears
    echo_gated: int = 0  # speech over the agent's voice taken for its own echo
    backchannels: int = 0  # speech over the agent's voice judged a backchannel (it went on)


class Voice:
    def __init__(self, engine: SpeechEngine, emit: Callable[[Any], None], *, realtime: bool = True,
                 on_audio: Callable[[str, np.ndarray, int], None] | None = None,
                 echo_margin_db: float = 6.0, counters: VoiceCounters | None = None,
                 playout_margin_s: float = 0.3) -> None:
        self.engine = engine
        self.emit = emit
        self.realtime = realtime
        self.on_audio = on_audio
        rate = OUTPUT_RATE if realtime else engine.sample_rate  # offline: no resampling
        self.player = Player(sample_rate=rate, frame_s=FRAME_S, on_started=self._started, on_done=self._done)
        self.echo_ratio = 10 ** (-echo_margin_db / 20)
        # The far end plays a frame this long after we send it (jitter + output buffers): the
        # echo gate stays on for it after the last audible frame went out.
        self.playout_margin_s = playout_margin_s
        self._queue: asyncio.Queue[str | None] | None = None
        self._stage: SpeechStage | None = None
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._frames: list[np.ndarray] = []  # offline: the answer rendered so far
        self.turn_id: str | None = None  # the answer begun last
        self.counters = counters if counters is not None else VoiceCounters()
        self.echo_gated = 0  # this session's speech starts taken for our own voice
        self.backchannels = 0
        self._accounted = (0, 0)  # the player's (underruns, flushed samples) already counted
        self._quiet = False  # a discarded preemptive answer: its end is neither counted nor reported

    # ---- driven by the session ------------------------------------------------------
    @property
    def active(self) -> bool:
        """An answer is being synthesized or played."""
        return not self._idle.is_set()

    @property
    def withheld(self) -> bool:
        """A preemptive answer is being made and not yet released (no frame goes out)."""
        return self.player.withheld

    @property
    def stage_stats(self) -> SpeechStats | None:
        return self._stage.stats if self._stage is not None else None

    def begin(self, turn_id: str, withheld: bool = False) -> None:
        """`withheld`: synthesize, but send nothing until `release()` (a preemptive answer)."""
        self.interrupt()  # a previous answer still speaking is superseded
        self.turn_id = turn_id
        self.player.withheld = withheld
        self._queue = queue = asyncio.Queue[str | None]()
        self._idle.clear()
        self._frames = []
        self._stage = stage = SpeechStage(self.engine, _read(queue), on_error=lambda exc: self._error(turn_id, exc),
                                          clock=time.monotonic)
        self._task = asyncio.create_task(self._speak(stage, turn_id), name=f"voice-{turn_id}")

    def say(self, text: str) -> None:
        if self._queue is not None and text:
            self._queue.put_nowait(text)

    def end(self) -> None:
        if self._queue is not None:
            self._queue.put_nowait(None)
            self._queue = None

    def release(self) -> None:
        """The withheld answer's turn committed: its audio goes out from the next frame."""
        self.player.withheld = False

    def discard(self) -> None:
        """Drop a withheld answer without a trace: no event, no count."""
        self._quiet = True
        try:
            self.interrupt()
        finally:
            self._quiet = False

    def interrupt(self) -> PlaybackReport | None:
        """Stop now: queued audio is dropped (the next frame is silence). What was heard, or None."""
        self.player.withheld = False
        report = self.player.flush()  # fires response.audio.done (interrupted)
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._queue = None
        self._idle.set()
        return report

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def close(self) -> None:
        self.interrupt()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    def pause(self) -> bool:
        """Pause the answer's voice (speech over it, undecided yet); synthesis goes on into the queue."""
        return self.player.pause()

    def resume(self) -> bool:
        return self.player.resume()

    @property
    def paused(self) -> bool:
        return self.player.paused

    @property
    def sounding(self) -> bool:
        """The agent's voice may still be heard at the far end: playing, or within the playout margin."""
        return self.player.speaking or self.player.audible_within(self.playout_margin_s)

    def note_echo(self) -> None:
        """Speech over the agent's voice was taken for its own echo (the session decides)."""
        self.echo_gated += 1
        self.counters.echo_gated += 1

    def note_backchannel(self) -> None:
        """Speech over the agent's voice ended too soon to interrupt it."""
        self.backchannels += 1
        self.counters.backchannels += 1

    # ---- self-echo ------------------------------------------------------------------
    def is_echo(self, mic: np.ndarray, mic_rate: int = 16000) -> bool:
        """Whether speech heard while the agent talks may be its own voice coming back.

        The agent knows what it plays: without echo cancellation the microphone picks up the
        loudspeaker, attenuated by the room. Speech counts as the user's only when its level
        is clearly above (more than `echo_margin_db` below at most) the level of what we sent
        out in the last second; the echo of our own voice is quieter than that, a user
        talking over it is not. With nothing playing (for longer than the playout margin)
        there is no echo.
        """
        if not self.sounding:
            return False
        out = self.player.recent_output()[-round(ECHO_WINDOW_S * self.player.sample_rate):]
        out_level = voiced_rms(out.astype(np.float32) / 32768, self.player.frame_samples)
        if out_level == 0.0:
            return False
        mic_level = voiced_rms(mic, round(mic_rate * FRAME_S))
        return mic_level < out_level * self.echo_ratio

    # ---- internals ------------------------------------------------------------------
    async def _speak(self, stage: SpeechStage, turn_id: str) -> None:
        try:
            await play_answer(self.player, stage, turn_id)
        except TTSError as exc:
            self._error(turn_id, exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not touch the text answer
            log.exception("voice of %s failed", turn_id)
            self._error(turn_id, TTSError("tts_failed", f"{type(exc).__name__}: {exc}"))
        finally:
            await stage.aclose()
        if not self.realtime:
            self._render()

    def _render(self) -> None:
        """Offline: play the complete answer out at once (fires started/done)."""
        limit = int(self.player.queued_s / self.player.frame_s) + 3
        for _ in range(limit):
            if self._idle.is_set():
                break
            self._frames.append(self.player.next_frame())

    def _error(self, turn_id: str, exc: TTSError) -> None:
        self.emit(ev.Error(code=exc.code, message=exc.message, turn_id=turn_id))

    def _started(self, turn_id: str | None) -> None:
        self.emit(ev.ResponseAudioStarted(turn_id=turn_id or ""))

    def _done(self, report: PlaybackReport) -> None:
        c, player = self.counters, self.player
        if self._quiet:
            self._accounted = (player.underruns, player.flushed_samples)
            self._frames = []
            self._idle.set()
            return
        c.answers += 1
        c.interrupted += report.interrupted
        c.played_s += report.played_s
        underruns, flushed = self._accounted
        c.underruns += player.underruns - underruns
        c.flushed_s += (player.flushed_samples - flushed) / player.sample_rate
        self._accounted = (player.underruns, player.flushed_samples)
        timings = self._stage.stats.timings() if self._stage is not None else {}
        self.emit(ev.ResponseAudioDone(turn_id=report.turn_id or "", duration_s=round(report.played_s, 3),
                                       spoken_text=report.spoken_text, interrupted=report.interrupted,
                                       timings=timings))
        if not self.realtime and self.on_audio is not None and report.turn_id:
            played = round(report.played_s * self.player.sample_rate)
            pcm = np.concatenate(self._frames)[:played] if self._frames else np.zeros(0, np.int16)
            self.on_audio(report.turn_id, pcm, self.player.sample_rate)
        self._frames = []
        self._idle.set()
