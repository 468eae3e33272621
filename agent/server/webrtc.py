"""WebRTC transport: one `AgentRuntime` session per RTCPeerConnection.

The peer's audio track drives the session (48 kHz stereo Opus → 16 kHz mono float32);
a data channel labelled `events` carries the session's events out and commands in.
Anything that ends the peer (connection closed/failed, track ended, DELETE, timeouts,
`session.close`, shutdown) goes through `Peer.close`, which cancels every task, stops
the track and closes the session exactly once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
import uuid
from typing import Any, Callable

import av
import numpy as np
import pydantic
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcdatachannel import RTCDataChannel

from agent import events as ev
from agent.audio import Resampler
from agent.config import ServerSettings
from agent.runtime import AgentRuntime
from agent.session import Session

log = logging.getLogger(__name__)

EVENTS_LABEL = "events"
TASK_PREFIX = "webrtc-"  # every task this module starts is named so (tests look for leftovers)
QUEUE_SECONDS = 2.0  # audio a session may fall behind before the oldest is dropped


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


def use_loopback_candidates() -> None:
    """Offer only 127.0.0.1 host candidates (process-wide): nothing leaves the machine."""
    import aioice.ice

    aioice.ice.get_host_addresses = lambda use_ipv4=True, use_ipv6=True: ["127.0.0.1"]


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Peer:
    """One peer connection and the session it drives."""

    def __init__(self, manager: "PeerManager", pc: RTCPeerConnection, session: Session,
                 sub: Any, started: ev.Event) -> None:
        self.manager = manager
        self.pc = pc
        self.session = session
        self.id = session.id
        self.started_event = started  # replayed to late WebSocket subscribers
        self._sub = sub  # the session's events, for the data channel
        self._channel: RTCDataChannel | None = None
        self._channel_open = asyncio.Event()
        self._tracks: list[MediaStreamTrack] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        # ~50 frames/s of 20 ms each; more than QUEUE_SECONDS behind → drop the oldest
        self._audio: asyncio.Queue[np.ndarray] = asyncio.Queue(int(QUEUE_SECONDS * 50))
        self.frames = 0
        self.dropped_frames = 0
        self.connected_at = time.monotonic()
        self.last_frame: float | None = None
        self.closed = False
        self._closing: asyncio.Task[None] | None = None

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
            self.spawn(self._receive(track), "recv")
            self.spawn(self._feed(), "feed")

        @pc.on("datachannel")
        def on_datachannel(channel: RTCDataChannel) -> None:
            if channel.label != EVENTS_LABEL or self._channel is not None:
                return
            self._channel = channel
            channel.on("message", self._on_message)
            if channel.readyState == "open":
                self._channel_open.set()
            else:
                channel.on("open", self._channel_open.set)
            self.spawn(self._pump(channel), "events")

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                self.close_soon("client_gone")

        self.spawn(self._watchdog(), "watchdog")

    # ---- audio --------------------------------------------------------------------
    async def _receive(self, track: MediaStreamTrack) -> None:
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
            if not samples.size:
                continue
            if self._audio.full():
                self._audio.get_nowait()
                self.dropped_frames += 1
                self.manager.count_dropped(1)
            self._audio.put_nowait(samples)

    async def _feed(self) -> None:
        """Hand queued audio to the session, everything waiting at once."""
        try:
            while True:
                pieces = [await self._audio.get()]
                while not self._audio.empty():
                    pieces.append(self._audio.get_nowait())
                await self.session.push_audio(np.concatenate(pieces) if len(pieces) > 1 else pieces[0])
        except Exception as exc:  # e.g. the VAD service died: end this session, not the server
            log.exception("session %s: audio pipeline failed", self.id)
            self.session.report_error("internal", f"audio pipeline failed: {exc}")
            self.close_soon("error")

    # ---- events and commands ------------------------------------------------------
    async def _pump(self, channel: RTCDataChannel) -> None:
        await self._channel_open.wait()
        channel.send(self.started_event.model_dump_json())
        while True:
            event = await self._sub.get()
            if channel.readyState != "open":
                return
            channel.send(event.model_dump_json())

    def _flush_events(self) -> None:
        """Send what is still queued (session.ended above all) before the channel closes."""
        channel = self._channel
        if channel is None or channel.readyState != "open" or not self._channel_open.is_set():
            return
        while not self._sub.queue.empty():
            channel.send(self._sub.queue.get_nowait().model_dump_json())

    def _on_message(self, message: str | bytes) -> None:
        self.spawn(self.command(message), "command")

    async def command(self, message: str | bytes) -> None:
        """A client command (data channel or WebSocket)."""
        await handle_command(self.session, message)
        if self.session.closed:  # session.close: the peer goes with it
            self.close_soon("client")

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
            self._closing = asyncio.ensure_future(self.close(reason))

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
        for track in self._tracks:
            track.stop()
        try:
            await self.session.close(reason)
        except Exception:  # the peer must still go away
            log.exception("session %s: close failed", self.id)
        self._flush_events()
        self._sub.close()
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


async def handle_command(session: Session, message: str | bytes) -> None:
    """A client command from any transport; a bad one becomes an `error` event."""
    try:
        command = ev.parse_command(message)
    except pydantic.ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'message'}: {e['msg']}" for e in exc.errors())
        session.report_error("bad_command", problems)
        return
    if not session.closed:
        await session.handle(command)


class PeerManager:
    """All live peers of one app; enforces max_sessions (peers still negotiating count)."""

    def __init__(self, runtime: AgentRuntime, settings: ServerSettings,
                 on_dropped: Callable[[int], None] = lambda n: None) -> None:
        self.runtime = runtime
        self.settings = settings
        self.peers: dict[str, Peer] = {}
        self.on_dropped = on_dropped
        self.dropped_frames = 0

    def full(self) -> bool:
        return len(self.peers) >= self.settings.max_sessions

    async def create(self, sdp: str, sdp_type: str = "offer") -> tuple[Peer, str]:
        """Answer an offer; returns the peer and the SDP answer. Raises OfferError."""
        if sdp_type != "offer":
            raise OfferError(f"expected an SDP offer, got type {sdp_type!r}")
        check_offer_sdp(sdp)
        if self.full():
            raise CapacityError(f"server is at its limit of {self.settings.max_sessions} sessions")
        session_id = uuid.uuid4().hex[:12]
        # Subscribe before the session exists so session.started is not missed.
        sub = self.runtime.bus.subscribe(session_id)
        pc = RTCPeerConnection(rtc_configuration(self.settings))
        peer = Peer(self, pc, self.runtime.create_session(session_id), sub, sub.queue.get_nowait())
        self.peers[peer.id] = peer  # counts against max_sessions while negotiating
        peer.attach()
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
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

    async def close_all(self, reason: str = "shutdown") -> None:
        await asyncio.gather(*(peer.close(reason) for peer in list(self.peers.values())),
                             return_exceptions=True)
