"""One paced audio track for benchmark peers and test clients: a microphone that hands over 20 ms
frames of 16 kHz mono in real time (aiortc `MediaStreamTrack`).

It plays a buffer once (then silence, so the last turn commits) or in a loop (from `offset`), at
`speed` × real time, and clips queued with `play()` over it; it stamps when each frame was handed
over (`sent`) and sets `first_frame` when the connection pulls the first one. Imports aiortc and
PyAV: import this module where they are needed (the `server` extra).
"""

from __future__ import annotations

import asyncio
import fractions
import time

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

RATE = 16000
FRAME_S = 0.02  # what a browser sends per packet


def to_pcm(samples: np.ndarray) -> np.ndarray:
    """int16 as is; float in [-1, 1] scaled and clipped."""
    return samples if samples.dtype == np.int16 else (np.clip(samples, -1, 1) * 32767).astype(np.int16)


class PacedTrack(MediaStreamTrack):
    """`samples` (float32 or int16), then silence; with `loop`, `samples` over and over.

    The clock starts at the first frame pulled (`clock_at_first_frame`), as a microphone that
    starts when the call does; or at construction, so frames owed for the time the connection
    took go out at once."""

    kind = "audio"

    def __init__(self, samples: np.ndarray | None = None, rate: int = RATE, loop: bool = False, *, offset: int = 0,
                 speed: float = 1.0, clock_at_first_frame: bool = True) -> None:
        super().__init__()
        self.pcm = to_pcm(samples) if samples is not None else np.zeros(0, np.int16)
        self.rate, self.loop, self.offset, self.speed = rate, loop, offset, speed
        self.step = int(rate * FRAME_S)
        self.pos = 0
        self.t0: float | None = None if clock_at_first_frame else time.monotonic()
        self.sent: list[float] = []  # monotonic time each frame was handed over, by frame index
        self.first_frame = asyncio.Event()
        self._clip: np.ndarray | None = None
        self._at = 0
        self._started: asyncio.Future[float] | None = None
        self._ended: asyncio.Future[float] | None = None

    @property
    def finished(self) -> bool:
        return not self.loop and self.pos >= self.pcm.size

    def play(self, samples: np.ndarray) -> tuple[asyncio.Future[float], asyncio.Future[float]]:
        """Speak `samples` from the next frame on, over what the track plays: futures of the time
        its first frame was handed over and of the time its last sample was."""
        loop = asyncio.get_running_loop()
        self._clip, self._at = to_pcm(samples), 0
        self._started, self._ended = loop.create_future(), loop.create_future()
        return self._started, self._ended

    def _chunk(self) -> np.ndarray:
        if self.loop and self.pcm.size:
            start = (self.pos + self.offset) % self.pcm.size
        else:
            start = self.pos
        chunk = self.pcm[start : start + self.step]
        if chunk.size < self.step:
            chunk = np.concatenate([chunk, np.zeros(self.step - chunk.size, np.int16)])
        return chunk

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self.t0 is None:
            self.t0 = time.monotonic()
            self.first_frame.set()
        wait = self.t0 + self.pos / self.rate / self.speed - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        chunk = self._chunk()
        now = time.monotonic()
        if self._clip is not None:
            part = self._clip[self._at : self._at + self.step]
            chunk = chunk.copy()
            chunk[: part.size] = part
            if self._at == 0 and self._started is not None:
                self._started.set_result(now)  # handed to the encoder now: the onset leaves the peer
            self._at += self.step
            if self._at >= self._clip.size:
                self._clip = None
                if self._ended is not None:
                    self._ended.set_result(now + part.size / self.rate)  # the frame's start + the part
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = self.rate, self.pos, fractions.Fraction(1, self.rate)
        self.pos += self.step
        self.sent.append(now)
        return frame
