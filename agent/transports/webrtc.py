"""WebRTC transport (the browser playground, and WHIP ingest): one session per RTCPeerConnection.

The peer's audio track drives the session (48 kHz stereo Opus → 16 kHz mono float32, through
the shared `AudioIngress`); a data channel labelled `events` carries the session's events out
and commands in. With a TTS engine the answer also carries the agent's voice: the offer's
audio transceiver becomes `sendrecv` with an `AgentAudioTrack` (20 ms frames, paced in real
time); WHIP stays ingest-only. Anything that ends the peer (connection closed/failed, track ended, DELETE,
timeouts, `session.close` from any side, shutdown) goes through `Peer.close`, which cancels
every task, stops the track and closes the session exactly once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable
from typing import Any

import av
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcdatachannel import RTCDataChannel

from agent import events as ev
from agent.audio import Resampler
from agent.bus import Subscription
from agent.config import ServerSettings
from agent.runtime import AgentRuntime
from agent.session import Session
from agent.transports.base import AudioIngress, EventEgress, handle_command

log = logging.getLogger(__name__)

EVENTS_LABEL = "events"
TASK_PREFIX = "webrtc-"  # every task this module starts is named so (tests look for leftovers)
QUEUE_SECONDS = 2.0  # audio a session may fall behind before the oldest is dropped
MAX_UNSENT_EVENTS = 256  # events held while the data channel is not open yet


class OfferError(ValueError):
    """An offer that cannot be answered; the message is the reason sent to the client."""


class CapacityError(Exception):
    """max_sessions reached."""


def check_offer_sdp(sdp: str) -> None:
    """Cheap structural checks: aiortc's parser accepts almost any text silently."""
    if not sdp.strip():
        raise OfferError("empty SDP offer")
    lines = [line.strip() for line in sdp.strip().splitlines()]
    if lines[0] != "v=0":
        raise OfferError("malformed SDP: it must start with 'v=0'")
    media = [line for line in lines if line.startswith("m=")]
    if not any(line.startswith("m=audio ") for line in media):
        raise OfferError("the offer has no audio m-line: a session needs the microphone track")
    if not any(line.startswith("a=fingerprint:") for line in lines):
        raise OfferError("malformed SDP: no DTLS fingerprint")


def rtc_configuration(settings: ServerSettings) -> RTCConfiguration:
    return RTCConfiguration(iceServers=[RTCIceServer(urls=url) for url in settings.ice_servers])


def set_receive_jitter(pc: RTCPeerConnection, frames: int) -> int:
    """Hold incoming audio for `frames` later frames (aiortc holds 4, ~80 ms, and has no setting
    for it) before decoding; packets later than that are dropped. Call after the remote
    description is set (the receivers exist then). Returns the receivers changed."""
    from aiortc.jitterbuffer import JitterBuffer

    changed = 0
    for transceiver in pc.getTransceivers():
        receiver = transceiver.receiver
        name = "_RTCRtpReceiver__jitter_buffer"
        if transceiver.kind == "audio" and isinstance(getattr(receiver, name, None), JitterBuffer):
            setattr(receiver, name, JitterBuffer(capacity=16, prefetch=frames))
            changed += 1
    return changed


def use_loopback_candidates() -> None:
    """Offer only 127.0.0.1 host candidates (process-wide): nothing leaves the machine."""
    import aioice.ice

    def loopback(use_ipv4: bool = True, use_ipv6: bool = True) -> list[str]:
        return ["127.0.0.1"]

    aioice.ice.get_host_addresses = loopback


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Peer:
    """One peer connection and the session it drives."""

    def __init__(self, manager: PeerManager, pc: RTCPeerConnection, session: Session,
                 events: Subscription) -> None:
        self.manager = manager
        self.pc = pc
        self.session = session
        self.id = session.id
        self.started_event: ev.Event | None = None  # replayed to late WebSocket subscribers
        self._events = events  # the session's events, session.started first
        self._channel: RTCDataChannel | None = None
        self._unsent: list[ev.Event] = []  # until the data channel opens
        self._tracks: list[MediaStreamTrack] = []  # the peer's microphone
        self.out_tracks: list[MediaStreamTrack] = []  # the agent's voice, when it speaks
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ingress: AudioIngress | None = None
        self._egress: EventEgress | None = None
        self.frames = 0
        self.connected_at = time.monotonic()
        self.last_frame: float | None = None
        self.closed = False
        self._closing: asyncio.Task[None] | None = None

    @property
    def dropped_frames(self) -> int:
        return self._ingress.dropped_frames if self._ingress is not None else 0

    # ---- wiring -------------------------------------------------------------------
    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"{TASK_PREFIX}{name}-{self.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def attach(self) -> None:
        pc = self.pc

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind != "audio" or self._tracks:
                return  # one microphone per session; other tracks are ignored
            self._tracks.append(track)
            self._ingress = AudioIngress(self.session, QUEUE_SECONDS, self.manager.count_dropped, TASK_PREFIX)
            self.spawn(self._receive(track, self._ingress), "recv")

        @pc.on("datachannel")
        def on_datachannel(channel: RTCDataChannel) -> None:
            if channel.label != EVENTS_LABEL or self._channel is not None:
                return
            self._channel = channel
            channel.on("message", self._on_message)
            if channel.readyState == "open":
                self._flush_unsent()
            else:
                channel.on("open", self._flush_unsent)

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                self.close_soon("client_gone")

        self.spawn(self._watchdog(), "watchdog")
        # Every event goes through here, data channel or not (WHIP has none): a session that
        # ends from any side closes the peer.
        self._egress = EventEgress(self.id, self._events, self._send, self.close_soon, TASK_PREFIX)

    # ---- audio --------------------------------------------------------------------
    async def _receive(self, track: MediaStreamTrack, ingress: AudioIngress) -> None:
        """Consume every frame (aiortc buffers unread frames without bound)."""
        resampler = Resampler()
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                self.close_soon("client_gone")
                return
            self.frames += 1
            self.last_frame = time.monotonic()
            try:
                samples = resampler.convert(frame)  # type: ignore[arg-type]
            except (ValueError, av.FFmpegError) as exc:  # a frame the resampler rejects: skip it
                log.debug("session %s: bad audio frame: %s", self.id, exc)
                continue
            ingress.put(samples)

    # ---- events and commands ------------------------------------------------------
    def _send(self, event: ev.Event) -> None:
        if self.started_event is None:
            self.started_event = event
        channel = self._channel
        if channel is not None and channel.readyState == "open" and not self._unsent:
            channel.send(event.model_dump_json())
            return
        if len(self._unsent) >= MAX_UNSENT_EVENTS:  # nobody reads them (WHIP): keep the first ones
            self.manager.count_unsent(1)
            return
        self._unsent.append(event)

    def _flush_unsent(self) -> None:
        channel = self._channel
        if channel is None or channel.readyState != "open":
            return
        unsent, self._unsent = self._unsent, []
        for event in unsent:
            channel.send(event.model_dump_json())

    def _on_message(self, message: str | bytes) -> None:
        self.spawn(self.command(message), "command")

    async def command(self, message: str | bytes) -> None:
        """A client command (data channel or WebSocket); session.close ends the peer through
        the egress, as a close from any other side does."""
        await handle_command(self.session, message)

    # ---- timeouts -----------------------------------------------------------------
    async def _watchdog(self) -> None:
        s = self.manager.settings
        period = max(0.05, min(1.0, s.no_audio_timeout_s / 4, s.idle_timeout_s / 4))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            since_audio = now - (self.last_frame if self.last_frame is not None else self.connected_at)
            if since_audio >= s.no_audio_timeout_s:
                self.close_soon("no_audio")
                return
            if now - max(self.session.last_activity, self.connected_at) >= s.idle_timeout_s:
                self.close_soon("idle_timeout")
                return

    # ---- teardown -----------------------------------------------------------------
    def close_soon(self, reason: str) -> None:
        """Close from a callback or one of our own tasks (which close() cancels)."""
        if self._closing is None:
            self._closing = asyncio.create_task(self.close(reason), name=f"{TASK_PREFIX}close-{self.id}")

    async def close(self, reason: str = "closed") -> None:
        if self.closed:
            if self._closing is not None and self._closing is not asyncio.current_task():
                await asyncio.shield(self._closing)
            return
        self.closed = True
        self.manager.peers.pop(self.id, None)
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current and not t.get_name().startswith(f"{TASK_PREFIX}command")]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for track in [*self._tracks, *self.out_tracks]:
            track.stop()
        if self._ingress is not None:
            await self._ingress.aclose(timeout=0.5)
        try:
            await self.session.close(reason)
        except Exception:  # the peer must still go away
            log.exception("session %s: close failed", self.id)
        if self._egress is not None:  # session.ended goes out before the channel closes
            await self._egress.wait(2.0)
        self._flush_unsent()
        self._events.close()
        channel = self._channel
        if channel is not None and channel.readyState == "open":
            # Let SCTP hand session.ended to the peer before the transport goes away.
            for _ in range(20):
                if not channel.bufferedAmount:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
        try:
            await self.pc.close()
        except Exception as exc:
            log.debug("session %s: pc.close: %s", self.id, exc)
        # Command tasks end with the session; wait so none outlives the peer.
        rest = [t for t in self._tasks if t is not current]
        await asyncio.gather(*rest, return_exceptions=True)


class PeerManager:
    """All live peers of one app; enforces max_sessions (peers still negotiating count)."""

    def __init__(self, runtime: AgentRuntime, settings: ServerSettings,
                 on_dropped: Callable[[int], None] = lambda n: None) -> None:
        self.runtime = runtime
        self.settings = settings
        self.peers: dict[str, Peer] = {}
        self.on_dropped = on_dropped
        self.dropped_frames = 0
        self.unsent_events = 0  # events no data channel took (WHIP peers have none)

    def full(self) -> bool:
        return len(self.peers) >= self.settings.max_sessions

    async def create(self, sdp: str, sdp_type: str = "offer", *, speak: bool = True) -> tuple[Peer, str]:
        """Answer an offer; returns the peer and the SDP answer. Raises OfferError.
        `speak`: send the agent's voice back when a TTS engine is on (False for WHIP)."""
        if sdp_type != "offer":
            raise OfferError(f"expected an SDP offer, got type {sdp_type!r}")
        check_offer_sdp(sdp)
        if self.full():
            raise CapacityError(f"server is at its limit of {self.settings.max_sessions} sessions")
        speak = speak and self.runtime.tts is not None
        session, events = self.runtime.open_session(voice_output="live" if speak else "none")
        pc = RTCPeerConnection(rtc_configuration(self.settings))
        peer = Peer(self, pc, session, events)
        self.peers[peer.id] = peer  # counts against max_sessions while negotiating
        peer.attach()
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            set_receive_jitter(pc, self.settings.receive_jitter_frames)
            if speak and session.voice is not None:
                from agent.speech.track import AgentAudioTrack

                voice_track = AgentAudioTrack(session.voice.player)
                peer.out_tracks.append(voice_track)
                pc.addTrack(voice_track)  # joins the offer's audio transceiver: sendrecv
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:  # aiortc raises ValueError, KeyError … on bad offers
            await peer.close("negotiation_failed")
            raise OfferError(f"cannot negotiate the offer: {exc or type(exc).__name__}") from None
        except BaseException:
            await asyncio.shield(peer.close("negotiation_failed"))
            raise
        return peer, pc.localDescription.sdp

    def count_dropped(self, frames: int) -> None:
        self.dropped_frames += frames
        self.on_dropped(frames)

    def count_unsent(self, events: int) -> None:
        self.unsent_events += events

    async def close_all(self, reason: str = "shutdown") -> None:
        await asyncio.gather(*(peer.close(reason) for peer in list(self.peers.values())),
                             return_exceptions=True)
