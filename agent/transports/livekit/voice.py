"""The agent's one voice in a LiveKit room: a mixer of its sessions' players on one track.

Each participant's session speaks through its own `Player` (so barge-in, `spoken_text` and
the history truncation stay exact per conversation); every 20 ms `RoomVoice` takes one frame
from each player, sums them and captures the sum into one `rtc.AudioSource`, published once
as the agent's `LocalAudioTrack`. Two answers at the same moment (two people asked at once)
are heard over each other, as two voices of one speaker would be; `overlapped_frames`
counts how often that happens.

The source is created with `queue_size_ms=0` (the SDK's direct capture: no buffer of its
own, 10 ms frames): our `Pacer` is the only clock, and a `flush()` at barge-in silences the
very next frame in the room, as on WebRTC.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import numpy as np
from livekit import rtc

from agent.speech.playback import FRAME_S, OUTPUT_RATE, Pacer, Player

log = logging.getLogger(__name__)

TRACK_NAME = "agent-voice"
CAPTURE_S = 0.01  # direct capture takes 10 ms frames


class FrameSink(Protocol):
    """What the mixer captures into: `rtc.AudioSource` in production, a recorder in tests."""

    async def capture_frame(self, frame: rtc.AudioFrame) -> None: ...


class RoomVoice:
    def __init__(self, sample_rate: int = OUTPUT_RATE, frame_s: float = FRAME_S, *,
                 source: FrameSink | None = None, pacer: Pacer | None = None) -> None:
        self.sample_rate = sample_rate
        self.frame_s = frame_s
        self.frame_samples = round(sample_rate * frame_s)
        self._capture = round(sample_rate * CAPTURE_S)
        if self.frame_samples % self._capture:
            raise ValueError(f"frame_s must be a multiple of {CAPTURE_S * 1000:g} ms, got {frame_s}")
        self._own_source = source is None
        self.source: FrameSink = source or rtc.AudioSource(sample_rate, 1, queue_size_ms=0)
        self.pacer = pacer or Pacer(frame_s)
        self.players: dict[str, Player] = {}
        self._task: asyncio.Task[None] | None = None
        self.frames = 0  # mixed frames captured
        self.overlapped_frames = 0  # frames in which more than one answer was audible
        self.clipped_samples = 0  # samples the sum pushed past int16 (overlapping loud voices)
        self.capture_errors = 0

    # ---- players ---------------------------------------------------------------------
    def add(self, key: str, player: Player) -> None:
        """Mix this player (one session's voice, keyed by the session id) into the room's track."""
        if player.sample_rate != self.sample_rate or player.frame_samples != self.frame_samples:
            raise ValueError(f"player of {key} runs at {player.sample_rate} Hz / {player.frame_samples} samples; "
                             f"the room's track at {self.sample_rate} Hz / {self.frame_samples}")
        self.players[key] = player

    def remove(self, key: str) -> None:
        self.players.pop(key, None)

    def new_track(self) -> rtc.LocalAudioTrack:
        """The track to publish in a (fresh) room; all tracks made here carry the same source."""
        if not isinstance(self.source, rtc.AudioSource):
            raise TypeError("only a RoomVoice on an rtc.AudioSource can make a track")
        return rtc.LocalAudioTrack.create_audio_track(TRACK_NAME, self.source)

    # ---- the clock -------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="livekit-voice")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._own_source and isinstance(self.source, rtc.AudioSource):
            await self.source.aclose()

    async def _run(self) -> None:
        while True:
            await self.pacer.wait()
            await self.tick()

    async def tick(self) -> None:
        """One frame: mix every player's next frame and capture it (10 ms at a time)."""
        pcm = self.mix()
        for i in range(0, pcm.size, self._capture):
            part = pcm[i : i + self._capture]
            try:
                await self.source.capture_frame(rtc.AudioFrame(part.tobytes(), self.sample_rate, 1, part.size))
            except Exception as exc:  # a closed source, an SDK hiccup: this frame is lost, not the voice
                self.capture_errors += 1
                if self.capture_errors in (1, 10, 100) or self.capture_errors % 1000 == 0:
                    log.warning("livekit: the agent's voice frame was not captured (%d so far): %s",
                                self.capture_errors, exc)
                return

    def mix(self) -> np.ndarray:
        """The sum of every player's next frame (each player advances by one frame)."""
        frames = [p.next_frame() for p in list(self.players.values())]
        self.frames += 1
        audible = [f for f in frames if f.any()]
        if not audible:
            return np.zeros(self.frame_samples, np.int16)
        if len(audible) == 1:
            return audible[0]
        self.overlapped_frames += 1
        total = np.sum(np.stack(audible).astype(np.int32), axis=0)
        clipped = np.clip(total, -32768, 32767)
        self.clipped_samples += int(np.count_nonzero(clipped != total))
        return clipped.astype(np.int16)
