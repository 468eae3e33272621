"""One subscribed LiveKit audio track feeding one session.

    rtc.AudioStream (16 kHz mono int16 frames) → bounded buffer → float32 → Session.push_audio

The reader only converts and buffers, so the SDK's own frame queue never grows; the feeder
hands everything buffered to the session at once. When the pipeline falls more than
`max_queue_s` behind, the oldest audio is dropped (and counted) instead of piling up.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING

import numpy as np
from livekit import rtc

from agent.audio import SAMPLE_RATE

if TYPE_CHECKING:
    from agent.session import Session

log = logging.getLogger(__name__)


def frame_to_float(frame: rtc.AudioFrame) -> np.ndarray:
    """A mono int16 frame as float32 in [-1, 1)."""
    return np.frombuffer(frame.data, dtype=np.int16).astype(np.float32) / 32768.0


class AudioPump:
    def __init__(self, track: rtc.Track, session: "Session", max_queue_s: float = 2.0) -> None:
        self.track = track
        self.track_sid = track.sid
        self.session = session
        self.max_samples = max(1, int(max_queue_s * SAMPLE_RATE))
        self.frames = 0
        self.samples = 0  # received, dropped ones included
        self.dropped_frames = 0
        self._buf: deque[np.ndarray] = deque()
        self._queued = 0  # samples in _buf
        self._ready = asyncio.Event()
        self._ended = False  # the stream is over: the feeder drains and stops
        self._closing: asyncio.Future[None] | None = None
        self._stream = rtc.AudioStream(track, sample_rate=SAMPLE_RATE, num_channels=1)
        self._reader = asyncio.create_task(self._read(), name=f"livekit-read-{session.id}")
        self._feeder = asyncio.create_task(self._feed(), name=f"livekit-feed-{session.id}")

    @property
    def running(self) -> bool:
        return not self._feeder.done()

    async def _read(self) -> None:
        try:
            async for event in self._stream:
                samples = frame_to_float(event.frame)
                if not samples.size:
                    continue
                self.frames += 1
                self.samples += samples.size
                self._buf.append(samples)
                self._queued += samples.size
                while self._queued > self.max_samples and len(self._buf) > 1:
                    self._queued -= self._buf.popleft().size
                    self.dropped_frames += 1
                self._ready.set()
        finally:
            self._ended = True
            self._ready.set()

    async def _feed(self) -> None:
        session = self.session
        try:
            while not session.closed:
                if not self._buf:
                    if self._ended:  # checked only when drained: the last frames still go in
                        return
                    await self._ready.wait()
                    self._ready.clear()
                    continue
                pieces = list(self._buf)
                self._buf.clear()
                self._queued = 0
                await session.push_audio(pieces[0] if len(pieces) == 1 else np.concatenate(pieces))
        except Exception as exc:  # e.g. the VAD service died: end this session, not the room
            log.exception("livekit: session %s: audio pipeline failed", session.id)
            session.report_error("internal", f"audio pipeline failed: {exc}")
            self._closing = asyncio.ensure_future(session.close("error"))  # keep a reference

    async def aclose(self, timeout: float = 2.0) -> None:
        """Stop reading; what was already received still reaches the session (bounded wait)."""
        try:
            await asyncio.wait_for(self._stream.aclose(), timeout)
        except Exception as exc:
            log.debug("livekit: closing the audio stream: %s", exc)
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        try:
            await asyncio.wait_for(asyncio.shield(self._feeder), timeout)
        except (asyncio.TimeoutError, Exception):
            self._feeder.cancel()
            await asyncio.gather(self._feeder, return_exceptions=True)
        if self.dropped_frames:
            log.info("livekit: session %s: %d of %d audio frames dropped (pipeline too slow)",
                     self.session.id, self.dropped_frames, self.frames)
