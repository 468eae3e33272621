"""LiveKit room transport: the agent joins a room; each person who speaks there gets a session.

    room events ──▶ ParticipantRouter (participant.py) ──▶ Session.push_audio / handle
    session events ──▶ data packets on `events_topic` + `lk.transcription` text streams
    sessions' voices (TTS on) ──▶ RoomVoice (voice.py) ──▶ one published audio track

`start()` joins the room or raises with the URL and the reason (bounded by
`connect_timeout_s`). Short network drops are the SDK's business (it resumes by itself); a
full disconnect we did not ask for is answered by joining again with a fresh `rtc.Room`,
with exponential backoff capped at `reconnect_max_s`, until `stop()`.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from livekit import rtc

from agent.plugin import Plugin, PluginContext
from agent.transports.livekit.config import LiveKitConfig, make_token
from agent.transports.livekit.participant import ParticipantRouter
from agent.transports.livekit.voice import RoomVoice

log = logging.getLogger(__name__)

# Full disconnects after which joining again would be wrong: we left, or another process
# joined with our identity (rejoining would kick it out, and it us, forever).
NO_REJOIN = {rtc.DisconnectReason.CLIENT_INITIATED, rtc.DisconnectReason.DUPLICATE_IDENTITY}

REJECTED = re.compile(r"\b4\d\d\b")  # the server answered 401/403/404…: trying again will not help


def explain(message: str) -> str:
    """The SDK's connect error, with a hint at the usual cause."""
    if "401" in message or "403" in message or "nauthorized" in message:
        return f"the server rejected the credentials (check api_key/api_secret): {message}"
    if "refused" in message:
        return f"nothing accepts connections there (is the LiveKit server running?): {message}"
    return message


class LiveKitPlugin(Plugin):
    name = "livekit"
    Config = LiveKitConfig
    queue_size = 16  # events reach the room through per-session subscriptions, not on_event

    def __init__(self, config: LiveKitConfig, context: PluginContext) -> None:
        super().__init__(config, context)
        self.config: LiveKitConfig = config
        self.identity = config.identity or context.agent_id
        self.room: rtc.Room | None = None
        self.router: ParticipantRouter | None = None
        self.voice: RoomVoice | None = None  # the agent's voice track, when a TTS engine is on
        self.reconnects = 0
        self._stopping = False
        self._rejoin: asyncio.Task[None] | None = None

    def start_timeout_s(self) -> float:
        # Our own bounded join (with its clearer message) ends first; leaving a late room takes a little more.
        return self.config.connect_timeout_s + 5.0

    def where(self) -> str:
        return f"LiveKit room {self.config.room!r} at {self.config.url}"

    async def start(self) -> None:
        if self.context.sessions is None:
            raise RuntimeError("the livekit plugin needs a runtime that creates sessions (PluginContext.sessions)")
        c = self.config
        if getattr(self.context.sessions, "tts", None) is not None:  # the runtime started a TTS engine
            self.voice = RoomVoice()
            self.voice.start()
        self.router = ParticipantRouter(self.context.sessions, self.context.bus, events_topic=c.events_topic,
                                        commands_topic=c.commands_topic, max_queue_s=c.max_queue_s,
                                        voice=self.voice)
        await self._join()
        log.info("livekit: joined %s as %r", self.where(), self.identity)

    async def stop(self) -> None:
        self._stopping = True
        if self._rejoin is not None:
            self._rejoin.cancel()
            await asyncio.gather(self._rejoin, return_exceptions=True)
        if self.router is not None:  # session.ended goes out before the room does
            await self.router.aclose("shutdown")
        room, self.room = self.room, None
        if room is not None:
            try:
                await asyncio.wait_for(room.disconnect(), self.config.connect_timeout_s)
            except Exception as exc:
                log.warning("livekit: leaving %s: %s", self.where(), exc)
        if self.voice is not None:
            await self.voice.aclose()

    # ---- connection -----------------------------------------------------------------
    async def _join(self) -> None:
        """Join with a fresh Room; raises ConnectionError naming the URL and the reason.

        A server that is not up yet (refused, no answer) is tried again until
        `connect_timeout_s` is spent — in a compose file the agent may start first; a server
        that rejects us (4xx: bad credentials) is not."""
        loop = asyncio.get_running_loop()
        budget = self.config.connect_timeout_s
        deadline = loop.time() + budget
        pause, last = 0.25, None
        while True:
            try:
                await self._attempt(deadline - loop.time())
                return
            except TimeoutError:
                reason = f"{explain(last)} (kept trying for {budget:g} s)" if last else f"no answer within {budget:g} s"
                raise ConnectionError(f"cannot join {self.where()}: {reason}") from None
            except rtc.ConnectError as exc:
                last = exc.message
                if REJECTED.search(last):
                    raise ConnectionError(f"cannot join {self.where()}: {explain(last)}") from None
                if deadline - loop.time() <= pause:
                    raise ConnectionError(f"cannot join {self.where()}: {explain(last)} (kept trying for {budget:g} s)") from None
                log.debug("livekit: %s: %s; trying again", self.where(), last)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)

    async def _attempt(self, budget_s: float) -> None:
        c, router = self.config, self.router
        assert router is not None
        room = rtc.Room()
        self._attach(room)
        self.room = room  # handlers ignore the events of any other (stale) room

        async def connect() -> None:
            await room.connect(c.url, make_token(c, self.identity, publish=self.voice is not None),
                               rtc.RoomOptions(auto_subscribe=True, connect_timeout=max(budget_s, 0.1)))
            if self.voice is not None:
                await self._publish_voice(room)
            if self.room is room:  # before any room event runs: the first session.started goes out
                router.outbound = room.local_participant

        task = asyncio.ensure_future(connect())
        try:
            # shield: on timeout the SDK's connect goes on; `_leave_late` undoes it if it lands.
            await asyncio.wait_for(asyncio.shield(task), budget_s)
        except BaseException:  # timeout, connect error, or start() cancelled
            if self.room is room:
                self.room = None
            task.add_done_callback(lambda t: _leave_late(t, room))
            raise

    async def _publish_voice(self, room: rtc.Room) -> None:
        """Publish the agent's one voice track in this room; a refusal leaves the room again
        and fails the join (a voice agent nobody can hear is not running)."""
        assert self.voice is not None
        options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        try:
            await room.local_participant.publish_track(self.voice.new_track(), options)
        except Exception as exc:
            if self.room is room:
                self.room = None  # our own leaving is not a drop to answer with a rejoin
            await room.disconnect()
            raise ConnectionError(f"cannot publish the agent's voice in {self.where()}: {exc}") from None

    def _attach(self, room: rtc.Room) -> None:
        router = self.router
        assert router is not None

        def live() -> bool:
            return room is self.room and not self._stopping

        @room.on("track_subscribed")
        def _subscribed(track: rtc.Track, pub: rtc.RemoteTrackPublication, participant: rtc.RemoteParticipant) -> None:
            # Other agents' audio (a TTS bot in the same room) is not a person talking to us.
            if live() and track.kind == rtc.TrackKind.KIND_AUDIO \
                    and participant.kind != rtc.ParticipantKind.PARTICIPANT_KIND_AGENT:
                router.on_track_subscribed(track, participant.identity)

        @room.on("track_unsubscribed")
        def _unsubscribed(track: rtc.Track, pub: rtc.RemoteTrackPublication, participant: rtc.RemoteParticipant) -> None:
            if live():
                router.on_track_unsubscribed(participant.identity, track.sid)

        @room.on("track_unpublished")
        def _unpublished(pub: rtc.RemoteTrackPublication, participant: rtc.RemoteParticipant) -> None:
            if live():
                router.on_track_unpublished(participant.identity, pub.sid)

        @room.on("participant_disconnected")
        def _left(participant: rtc.RemoteParticipant) -> None:
            if live():
                router.on_participant_left(participant.identity)

        @room.on("data_received")
        def _data(packet: rtc.DataPacket) -> None:
            if live():
                identity = packet.participant.identity if packet.participant is not None else None
                router.on_data(identity, packet.topic, packet.data)

        @room.on("reconnecting")
        def _reconnecting() -> None:
            if live():
                log.warning("livekit: connection to %s interrupted; the SDK is resuming it", self.where())

        @room.on("reconnected")
        def _reconnected() -> None:
            if live():
                log.info("livekit: connection to %s resumed", self.where())

        @room.on("disconnected")
        def _disconnected(reason: Any) -> None:
            if not live():
                return
            self.room = None
            router.outbound = None
            router.detach_all()
            if reason in NO_REJOIN:
                log.error("livekit: left %s (%s); not joining again", self.where(), _reason_name(reason))
                return
            log.warning("livekit: disconnected from %s (%s); joining again", self.where(), _reason_name(reason))
            if self._rejoin is None or self._rejoin.done():
                self._rejoin = asyncio.ensure_future(self._rejoin_loop())

    async def _rejoin_loop(self) -> None:
        delay = self.config.reconnect_min_s
        while not self._stopping:
            await asyncio.sleep(delay)
            try:
                await self._join()
            except ConnectionError as exc:
                delay = min(delay * 2, self.config.reconnect_max_s)
                log.warning("livekit: %s; next try in %.1f s", exc, delay)
                continue
            self.reconnects += 1
            room = self.room
            if room is not None and self.router is not None:  # who left meanwhile is gone for good
                self.router.retain(room.remote_participants)
            log.info("livekit: joined %s again", self.where())
            return


_leaving: set[asyncio.Future[None]] = set()  # references, so these tasks are not collected mid-way


def _leave_late(task: asyncio.Future[None], room: rtc.Room) -> None:
    """A connect that completed after we gave up on it: leave that room again."""
    if not task.cancelled() and task.exception() is None:
        leave = asyncio.ensure_future(room.disconnect())
        _leaving.add(leave)
        leave.add_done_callback(_leaving.discard)


def _reason_name(reason: Any) -> str:
    try:
        return str(rtc.DisconnectReason.Name(reason))
    except Exception:
        return str(reason)
