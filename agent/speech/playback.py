"""Real-time playback of the agent's voice: 20 ms frames, and a record of what was heard.

`Player` is pure logic (no clock of its own, no I/O): the TTS stage's chunks go in
(`begin`, `feed`, `end`), fixed-size frames come out (`next_frame`, silence when idle).
It knows, per piece of text, how many of its samples have gone out, so at barge-in
`flush()` drops everything queued at once (the next frame is silence: playback stops
within one frame) and reports `spoken_text`: the pieces played in full plus the words of
the current piece in proportion to the samples played (word timings are not known; an
even speaking rate is assumed, as livekit-agents does for its transcript truncation).

`Pacer` releases one frame per 20 ms of its clock; both clock and sleep are injected, so
tests run on a virtual clock. `agent.speech.track.AgentAudioTrack` puts the two behind
an aiortc track.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import dataclass

import av
import numpy as np

from agent.audio import frame_from_pcm
from agent.speech.stage import SpeechChunk

OUTPUT_RATE = 48000  # what WebRTC's Opus runs at
FRAME_S = 0.02
_WORDS = re.compile(r"\S+\s*")


@dataclass(frozen=True)
class PlaybackReport:
    turn_id: str | None
    spoken_text: str  # what the user heard
    played_s: float
    flushed_s: float  # audio queued but never played (barge-in)
    interrupted: bool


@dataclass
class _Piece:
    text: str
    queued: int = 0  # output samples fed
    played: int = 0
    complete: bool = False  # its audio is all fed

    def heard(self) -> str:
        if self.complete and self.played >= self.queued:
            return self.text
        if not self.played:
            return ""
        words = _WORDS.findall(self.text)
        total = max(self.queued, 1)
        return "".join(words[: int(len(words) * min(self.played / total, 1.0))])


class _Resampler:
    """Engine rate → output rate, int16 mono, stateful across the chunks of one answer."""

    def __init__(self, rate_in: int, rate_out: int) -> None:
        self.rate_in = rate_in
        self._av = None if rate_in == rate_out else av.AudioResampler(format="s16", layout="mono", rate=rate_out)

    def convert(self, pcm: np.ndarray | None) -> np.ndarray:
        if self._av is None:
            return pcm if pcm is not None else np.zeros(0, np.int16)
        frames = self._av.resample(None if pcm is None else frame_from_pcm(pcm, self.rate_in))
        if not frames:
            return np.zeros(0, np.int16)
        return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.int16, copy=False)


class Player:
    """Queue of one answer's audio, read out as fixed frames. Callbacks fire from `next_frame`/`flush`."""

    def __init__(self, sample_rate: int = OUTPUT_RATE, frame_s: float = FRAME_S,
                 on_started: Callable[[str | None], None] | None = None,
                 on_done: Callable[[PlaybackReport], None] | None = None, echo_s: float = 2.0) -> None:
        self.sample_rate = sample_rate
        self.frame_samples = round(sample_rate * frame_s)
        self.frame_s = self.frame_samples / sample_rate
        self.on_started = on_started
        self.on_done = on_done
        self.turn_id: str | None = None
        self._queue: deque[tuple[_Piece, np.ndarray]] = deque()
        self._pieces: dict[int, _Piece] = {}
        self._resampler: _Resampler | None = None
        self._active = False  # an answer is begun and not yet done or flushed
        self._ended = False  # its last chunk is fed
        self._started = False  # its first audio frame went out
        self._played = 0
        self.paused = False  # frames are silence, the queue waits (pause, then decide)
        self._last_audible = -1  # index of the last frame that carried audio (the echo tail)
        # the last `echo_s` of output, for an echo gate that needs to know what is playing
        self._recent: deque[np.ndarray] = deque(maxlen=max(1, round(echo_s / self.frame_s)))
        self.withheld = False  # a preemptive answer: audio is queued, nothing goes out yet
        self.frames = 0  # counters for /metrics: frames out, silent frames while speaking, samples flushed
        self.underruns = 0
        self.flushed_samples = 0

    # ---- input: one answer at a time ----
    def begin(self, turn_id: str | None = None) -> PlaybackReport | None:
        """Start a new answer; one still playing is flushed (and reported)."""
        report = self.flush() if self._active else None
        self.turn_id = turn_id
        self._queue.clear()
        self._pieces = {}
        self._resampler = None
        self._active, self._ended, self._started, self._played = True, False, False, 0
        return report  # a pause holds on: speech over the agent began before this answer's audio

    def feed(self, chunk: SpeechChunk) -> None:
        if not self._active:
            return  # the answer was flushed: its late chunks are not played
        piece = self._pieces.setdefault(chunk.piece_index, _Piece(chunk.piece.text))
        if self._resampler is None or self._resampler.rate_in != chunk.sample_rate:
            tail = self._resampler.convert(None) if self._resampler is not None else None
            if tail is not None and tail.size and self._queue:
                self._push(self._queue[-1][0], tail)
            self._resampler = _Resampler(chunk.sample_rate, self.sample_rate)
        if chunk.pcm.size:
            self._push(piece, self._resampler.convert(chunk.pcm))
        if chunk.piece_end:
            self._push(piece, self._resampler.convert(None))
            self._resampler = None  # a fresh one per piece keeps the flushed tail with its piece
            piece.complete = True

    def _push(self, piece: _Piece, pcm: np.ndarray) -> None:
        if pcm.size:
            piece.queued += pcm.size
            self._queue.append((piece, pcm))

    def end(self) -> None:
        """No more chunks for this answer: it is done when the queue has played out."""
        if self._active:
            if self._resampler is not None and self._queue:
                self._push(self._queue[-1][0], self._resampler.convert(None))
            self._ended = True

    # ---- output ----
    @property
    def speaking(self) -> bool:
        """Whether the agent's voice is going out (an answer has begun, is not done nor paused)."""
        return self._active and self._started and not self.paused

    def pause(self) -> bool:
        """Hold the answer (or the one about to begin): the next frame is silence, nothing
        queued is lost, until `resume()` or `flush()`. Whether it paused."""
        if self.paused:
            return False
        self.paused = True
        return True

    def resume(self) -> bool:
        """Go on exactly where `pause()` stopped it. Whether it was paused."""
        if not self.paused:
            return False
        self.paused = False
        return True

    def audible_within(self, seconds: float) -> bool:
        """Whether audio went out in the last `seconds` of frames: the far end still plays
        what its jitter and output buffers hold after the last frame is sent (the echo tail)."""
        return self._last_audible >= 0 and (self.frames - 1 - self._last_audible) * self.frame_s <= seconds

    @property
    def queued_s(self) -> float:
        return sum(pcm.size for _, pcm in self._queue) / self.sample_rate

    def next_frame(self) -> np.ndarray:
        """The next frame: queued audio, or silence."""
        out = np.zeros(self.frame_samples, np.int16)
        filled = 0
        while filled < self.frame_samples and self._queue and not (self.paused or self.withheld):
            piece, pcm = self._queue[0]
            take = min(self.frame_samples - filled, pcm.size)
            out[filled : filled + take] = pcm[:take]
            piece.played += take
            filled += take
            if take == pcm.size:
                self._queue.popleft()
            else:
                self._queue[0] = (piece, pcm[take:])
        self.frames += 1
        self._played += filled
        if filled:
            self._last_audible = self.frames - 1
        if filled and not self._started:
            self._started = True
            if self.on_started is not None:
                self.on_started(self.turn_id)
        if self._active and filled < self.frame_samples and not (self.paused or self.withheld):
            if self._ended and not self._queue:
                self._finish(interrupted=False, flushed=0)
            elif self._started:
                self.underruns += 1  # the engine is behind playback: a gap the user hears
        self._recent.append(out)
        return out

    def flush(self) -> PlaybackReport | None:
        """Barge-in: drop all queued audio now; the next frame is silence. None when idle."""
        self.paused = False
        if not self._active:
            return None
        flushed = sum(pcm.size for _, pcm in self._queue)
        self._queue.clear()
        self.flushed_samples += flushed
        return self._finish(interrupted=True, flushed=flushed)

    def _finish(self, interrupted: bool, flushed: int) -> PlaybackReport:
        report = PlaybackReport(self.turn_id, self.spoken_text(), self._played / self.sample_rate,
                                flushed / self.sample_rate, interrupted)
        self._active = False
        self.paused = False
        self._resampler = None
        if self.on_done is not None:
            self.on_done(report)
        return report

    def spoken_text(self) -> str:
        """The answer's text as far as it has been played."""
        heard = []
        for index in sorted(self._pieces):
            piece = self._pieces[index]
            part = piece.heard()
            heard.append(part)
            if part != piece.text:
                break  # nothing after a partly heard piece was played
        return "".join(heard).strip()

    def recent_output(self) -> np.ndarray:
        """The last `echo_s` seconds sent out (silence included), for echo gating."""
        return np.concatenate(self._recent) if self._recent else np.zeros(0, np.int16)


class Pacer:
    """Releases one frame per `frame_s` of `clock`, in step with real time.

    A consumer that stalled longer than `max_lag_s` is not sent a burst to catch up: the
    schedule restarts from now (a burst would arrive at the far end as a jitter spike).
    """

    def __init__(self, frame_s: float = FRAME_S, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep, max_lag_s: float = 0.2) -> None:
        self.frame_s = frame_s
        self.clock = clock
        self.sleep = sleep
        self.max_lag_s = max_lag_s
        self._t0: float | None = None
        self._n = 0
        self.resyncs = 0

    async def wait(self) -> None:
        now = self.clock()
        if self._t0 is None or now - (self._t0 + self._n * self.frame_s) > self.max_lag_s:
            if self._t0 is not None:
                self.resyncs += 1
            self._t0, self._n = now, 0
        due = self._t0 + self._n * self.frame_s
        if due > now:
            await self.sleep(due - now)
        self._n += 1


async def play_answer(player: Player, chunks: AsyncIterable[SpeechChunk], turn_id: str | None = None) -> None:
    """Feed one answer's chunks (a `SpeechStage`) to the player as they are made.

    The caller cancels this task at barge-in (after `player.flush()`); chunks that still
    arrive for a flushed answer are ignored by the player.
    """
    player.begin(turn_id)
    try:
        async for chunk in chunks:
            player.feed(chunk)
    finally:
        player.end()
