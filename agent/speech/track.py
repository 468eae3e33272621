"""The agent's voice as an aiortc audio track (needs the `server` extra): 20 ms frames at
48 kHz from a `Player`, paced in real time, silence when idle.

The frame is taken from the player only after the pacer's wait, so a `flush()` during
that wait already turns the very next frame into silence.
"""

from __future__ import annotations

import fractions

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from agent.audio import frame_from_pcm
from agent.speech.playback import Pacer, Player


class AgentAudioTrack(MediaStreamTrack):
    kind = "audio"

    def __init__(self, player: Player, pacer: Pacer | None = None) -> None:
        super().__init__()
        self.player = player
        self.pacer = pacer or Pacer(player.frame_s)
        self._pts = 0
        self._time_base = fractions.Fraction(1, player.sample_rate)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        await self.pacer.wait()
        frame = frame_from_pcm(self.player.next_frame(), self.player.sample_rate)
        frame.pts = self._pts
        frame.time_base = self._time_base
        self._pts += frame.samples
        return frame
