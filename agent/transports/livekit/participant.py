"""Room participants ↔ agent sessions, independent of a live LiveKit connection.

`ParticipantRouter` owns "participant identity → (audio pump, session, event sender)". The
room's event handlers drive it in production; tests call the same methods with local tracks.
Everything it says goes through `Outbound` — the room's `LocalParticipant` in production
(whose `publish_data` / `stream_text` have exactly these signatures), a recorder in tests.

Per participant: its session's events go out as JSON data packets (reliable, `events_topic`)
and each response's text as an `lk.transcription` text stream (the livekit-agents convention:
`lk.segment_id`, `lk.transcription_final` "false" while streaming, "true" on the close), so
LiveKit's own client components show the answers; commands come in on `commands_topic`.
Both are addressed to that participant only: a session is one person's conversation, others
in the room would otherwise see it, and would have to filter everyone's traffic by session id.

With a `RoomVoice` (TTS on) each session opens with a live voice whose player is mixed into
the agent's one published audio track (voice.py); without one, sessions are text only.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from livekit import rtc

from agent import events as ev
from agent.bus import EventBus, Subscription
from agent.model.qwen2_audio import SAMPLE_RATE
from agent.plugin import SessionFactory
from agent.session import Session
from agent.transports.base import AudioIngress, EventEgress, handle_command
from agent.transports.livekit.voice import RoomVoice

log = logging.getLogger(__name__)

TOPIC_TRANSCRIPTION = "lk.transcription"
# LiveKit's limit for one reliable data packet is about 15 KiB; a bigger event (a very long
# response.done) goes as a text stream on the same topic, which the SDK chunks.
MAX_PACKET = 15_000
ATTR_SEGMENT_ID = "lk.segment_id"
ATTR_FINAL = "lk.transcription_final"


def frame_to_float(frame: rtc.AudioFrame) -> np.ndarray:
    """A mono int16 frame as float32 in [-1, 1)."""
    return np.frombuffer(frame.data, dtype=np.int16).astype(np.float32) / 32768.0


class AudioPump:
    """One subscribed track → its session's `AudioIngress` (the one bounded drop policy).

    rtc.AudioStream (16 kHz mono int16, the SDK's resampler) is read at once, so the SDK's own
    frame queue never grows."""

    def __init__(self, track: rtc.Track, session: Session, max_queue_s: float = 2.0,
                 on_dropped: Any = None) -> None:
        self.track_sid = track.sid
        self.session = session
        self.ingress = AudioIngress(session, max_queue_s, on_dropped, "livekit")
        self._stream = rtc.AudioStream(track, sample_rate=SAMPLE_RATE, num_channels=1)
        self._reader = asyncio.create_task(self._read(), name=f"livekit-read-{session.id}")

    @property
    def running(self) -> bool:
        return self.ingress.running

    @property
    def dropped_frames(self) -> int:
        return self.ingress.dropped_frames

    @property
    def frames(self) -> int:
        return self.ingress.frames

    @property
    def samples(self) -> int:
        return self.ingress.samples

    async def _read(self) -> None:
        try:
            async for event in self._stream:
                self.ingress.put(frame_to_float(event.frame))
        finally:
            self.ingress.end()

    async def aclose(self, wait_s: float = 2.0) -> None:
        """Stop reading; what was already received still reaches the session (bounded wait)."""
        try:
            await asyncio.wait_for(self._stream.aclose(), wait_s)
        except Exception as exc:
            log.debug("livekit: closing the audio stream: %s", exc)
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        await self.ingress.aclose(wait_s)


class TextWriter(Protocol):
    async def write(self, text: str) -> None: ...

    async def aclose(self, *, reason: str = "", attributes: dict[str, str] | None = None) -> None: ...


class Outbound(Protocol):
    async def publish_data(self, payload: bytes | str, *, reliable: bool = True,
                           destination_identities: list[str] = ..., topic: str = "") -> None: ...

    async def stream_text(self, *, destination_identities: list[str] | None = None, topic: str = "",
                          attributes: dict[str, str] | None = None) -> Any: ...

    async def send_text(self, text: str, *, destination_identities: list[str] | None = None,
                        topic: str = "") -> Any: ...


def session_id_for(identity: str, prefix: str = "lk") -> str:
    """Recognisable and safe as an MQTT topic level or URL part: `lk-<identity>-<random>`."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", identity)[:48] or "anon"
    return f"{prefix}-{safe}-{uuid.uuid4().hex[:6]}"


class Transcript:
    """The open `lk.transcription` stream of one participant's current response."""

    def __init__(self, identity: str) -> None:
        self.identity = identity
        self.writer: TextWriter | None = None
        self.turn_id: str | None = None

    async def on_event(self, event: ev.Event, out: Outbound | None) -> None:
        if isinstance(event, ev.ResponseDelta):
            if out is None:
                return
            if self.writer is None or self.turn_id != event.turn_id:
                await self.close()
                self.writer = await out.stream_text(
                    topic=TOPIC_TRANSCRIPTION, destination_identities=[self.identity],
                    attributes={ATTR_FINAL: "false", ATTR_SEGMENT_ID: f"SG_{event.turn_id}"})
                self.turn_id = event.turn_id
            await self.writer.write(event.text)
        elif isinstance(event, (ev.ResponseDone, ev.ResponseCancelled, ev.SessionEnded)):
            await self.close()

    async def close(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            await writer.aclose(attributes={ATTR_FINAL: "true", ATTR_SEGMENT_ID: f"SG_{self.turn_id}"})


@dataclass
class Participant:
    identity: str
    session: Session
    sub: Subscription
    transcript: Transcript
    pump: AudioPump | None = None
    track_sid: str | None = None  # its audio track, kept after the pump stops (unpublish comes later)
    egress: EventEgress | None = None
    commands: asyncio.Lock = field(default_factory=asyncio.Lock)  # in arrival order, one at a time


class ParticipantRouter:
    def __init__(self, sessions: SessionFactory, bus: EventBus, *, events_topic: str = "voice-agent.events",
                 commands_topic: str = "voice-agent.commands", max_queue_s: float = 2.0,
                 voice: RoomVoice | None = None) -> None:
        self.sessions = sessions
        self.voice = voice  # the agent's voice track in the room (None: text only)
        self.bus = bus
        self.events_topic = events_topic
        self.commands_topic = commands_topic
        self.max_queue_s = max_queue_s
        self.outbound: Outbound | None = None  # None while the room is not connected
        self.participants: dict[str, Participant] = {}
        self.unsent = 0  # events published while no room was connected
        self._tasks: set[asyncio.Task[Any]] = set()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"livekit-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- participants and tracks ----------------------------------------------------
    def on_track_subscribed(self, track: rtc.Track, identity: str) -> Session:
        """A remote audio track: start (or resume) this participant's session."""
        p = self.participants.get(identity)
        if p is not None and p.session.closed:  # ended meanwhile (session.close): release it, start anew
            self.on_participant_left(identity)
            p = None
        if p is None:
            p = self._open(identity)
        if p.pump is not None and p.pump.running:
            if p.pump.track_sid != track.sid:
                log.info("livekit: %s publishes a second audio track %s; only %s is listened to",
                         identity, track.sid, p.pump.track_sid)
            return p.session
        if p.pump is not None:  # its stream ended (e.g. a reconnect); release it
            self._spawn(p.pump.aclose(), f"stale-{p.session.id}")
        p.pump = AudioPump(track, p.session, self.max_queue_s)
        p.track_sid = track.sid
        return p.session

    def _open(self, identity: str) -> Participant:
        if self.voice is None:
            session, sub = self.sessions.open_session(session_id_for(identity))
        else:
            session, sub = self.sessions.open_session(session_id_for(identity), voice_output="live")
            if session.voice is not None:
                self.voice.add(session.id, session.voice.player)
        p = Participant(identity, session, sub, Transcript(identity))
        # A session that ends from any side (session.close, MQTT) releases its participant.
        p.egress = EventEgress(session.id, sub, lambda event: self._publish(p, event),
                               lambda reason: self._release(p), "livekit")
        self.participants[identity] = p
        log.info("livekit: %s joined: session %s", identity, session.id)
        return p

    def on_track_unsubscribed(self, identity: str, track_sid: str) -> None:
        """Not listening any more (e.g. a reconnect): the session waits for the track to return."""
        p = self.participants.get(identity)
        if p is not None and p.pump is not None and p.pump.track_sid == track_sid:
            pump, p.pump = p.pump, None
            self._spawn(pump.aclose(), f"unsubscribe-{p.session.id}")

    def on_track_unpublished(self, identity: str, track_sid: str) -> None:
        p = self.participants.get(identity)
        if p is not None and p.track_sid == track_sid:
            self.on_participant_left(identity)

    def on_participant_left(self, identity: str, reason: str = "participant_left") -> asyncio.Task[None] | None:
        p = self.participants.pop(identity, None)
        return None if p is None else self._spawn(self._end(p, reason), f"end-{p.session.id}")

    def retain(self, identities: Iterable[str], reason: str = "participant_left") -> None:
        """After a reconnect: end the sessions of participants who are no longer in the room."""
        keep = set(identities)
        for identity in [i for i in self.participants if i not in keep]:
            self.on_participant_left(identity, reason)

    def detach_all(self) -> None:
        """The room is gone: stop listening, keep the sessions (their people may come back)."""
        for p in self.participants.values():
            if p.pump is not None:
                self.on_track_unsubscribed(p.identity, p.pump.track_sid)

    async def _end(self, p: Participant, reason: str) -> None:
        if p.pump is not None:
            pump, p.pump = p.pump, None
            await pump.aclose()
        await p.session.close(reason)
        if self.voice is not None:
            self.voice.remove(p.session.id)
        if p.egress is not None:  # it stops after publishing session.ended
            await p.egress.wait(5.0)
        p.sub.close()

    async def aclose(self, reason: str = "shutdown") -> None:
        ends = [self.on_participant_left(i, reason) for i in list(self.participants)]
        await asyncio.gather(*[t for t in ends if t is not None], return_exceptions=True)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- events out -----------------------------------------------------------------
    def _release(self, p: Participant) -> None:
        p.sub.close()
        if self.voice is not None:  # its session ended: nothing more to mix
            self.voice.remove(p.session.id)
        if self.participants.get(p.identity) is p:  # ended by the client (session.close) or the agent
            self.on_participant_left(p.identity)

    async def _publish(self, p: Participant, event: ev.Event) -> None:
        out = self.outbound
        if out is None:
            self.unsent += 1
        else:
            data = event.model_dump_json()
            try:
                if len(data.encode()) <= MAX_PACKET:
                    await out.publish_data(data, reliable=True, topic=self.events_topic,
                                           destination_identities=[p.identity])
                else:
                    await out.send_text(data, topic=self.events_topic, destination_identities=[p.identity])
            except Exception as exc:  # e.g. the room is reconnecting: this event is lost, not the session
                log.warning("livekit: %s event to %s not sent: %s", event.type, p.identity, exc)
        try:
            await p.transcript.on_event(event, out)
        except Exception as exc:
            log.warning("livekit: transcription to %s failed: %s", p.identity, exc)
            p.transcript.writer = None

    # ---- commands in ----------------------------------------------------------------
    def on_data(self, identity: str | None, topic: str | None, payload: bytes) -> None:
        if topic != self.commands_topic:
            return
        p = self.participants.get(identity) if identity else None
        if p is None:
            log.debug("livekit: command from %r, who has no session; ignored", identity)
            return
        self._spawn(self._command(p, payload), f"command-{p.session.id}")

    async def _command(self, p: Participant, payload: bytes) -> None:
        async with p.commands:
            await handle_command(p.session, payload)
