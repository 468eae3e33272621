"""Wyoming transport: Home Assistant Assist pipelines and voice satellites talk to the agent.

Built on PyPI's `wyoming` (its `AsyncServer` and `AsyncEventHandler`: the framing is the
library's). One TCP connection is one session on the event bus. Audio is pushed as each chunk
is read, and the next chunk is read only after that: TCP's flow control holds a client back
instead of the drop policy of `transports.base.AudioIngress` (a transcript of audio with holes
would be wrong). A session closed from another side closes its connection.

- `describe` → `info`: an `asr` program (Qwen2-Audio, its languages) and a `handle` program.
- `transcribe` + `audio-start`/`audio-chunk`/`audio-stop` → `transcript-start`,
  `transcript-chunk`…, `transcript`, `transcript-stop` (the streaming events where the installed
  `wyoming` has them; the plain `transcript` always). Audio of any rate, width and channel count
  is converted to 16 kHz mono; the turn is Qwen2-Audio in analysis mode with a transcription
  instruction, on the runtime's backend like every other session's turn.
  A transcription is offered no tools and runs none: the client acts on the transcript itself.
- `transcript` (sent by the client) → `handled-start`, `handled-chunk`…, `handled`,
  `handled-stop`: the agent answers, tools run. When the text is what this server has just
  transcribed for the same device, the model answers the audio itself (tone, hesitation,
  everything the text lost). The conversation is kept per satellite / device / conversation id,
  so follow-ups work.

Errors. A stray event (an `audio-chunk` before `audio-start`, an `audio-stop` with no stream, an
unknown type) gets an `error` and the connection goes on. A transcription that fails (no audio,
no speech, more than `max_audio_s`, a chunk over `max_chunk_bytes`, the backend busy or down)
gets an `error` and the connection is closed: Home Assistant's client ignores `error` and would
wait for a transcript until its pipeline timeout; a close is its speech-to-text error at once.
A `transcript` that cannot be handled (blank, the backend failing) gets `not-handled` with the
reason as its text, then a close: what Home Assistant's conversation agent reports. Every error
is also an `error` event on the bus (counted in /metrics). Requests, answers and tool calls are
logged at INFO with the session and satellite.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import unicodedata
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from wyoming import asr, handle, info
from wyoming.audio import AudioChunk, AudioChunkConverter, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.ping import Ping, Pong
from wyoming.server import AsyncEventHandler, AsyncServer, AsyncTcpServer

from agent import events as ev
from agent.audio import Resampler, frame_from_pcm
from agent.model.qwen2_audio import SAMPLE_RATE

if TYPE_CHECKING:
    from agent.bus import Subscription
    from agent.runtime import AgentRuntime
    from agent.session import Session

log = logging.getLogger(__name__)

# Qwen2-Audio's speech-recognition languages (its model card: "more than 8 languages and
# dialects"; these are the ones it names).
LANGUAGES = ["en", "zh", "yue", "fr", "it", "es", "de", "ja"]
TRANSCRIBE = ("Transcribe this speech exactly, in the language it is spoken in. "
              "Reply with the transcript only.")
ATTRIBUTION = info.Attribution(name="Qwen team, Alibaba Cloud", url="https://github.com/QwenLM/Qwen2-Audio")
LAYOUTS = {1: "mono", 2: "stereo", 3: "3.0", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}
MAX_EVENT_BYTES = 32 * 1024 * 1024  # data or payload declared larger: closed without reading it

# Newer `wyoming` releases stream transcripts and handled answers; older ones lack the classes.
TranscriptStart: Any = getattr(asr, "TranscriptStart", None)
TranscriptChunk: Any = getattr(asr, "TranscriptChunk", None)
TranscriptStop: Any = getattr(asr, "TranscriptStop", None)
HandledStart: Any = getattr(handle, "HandledStart", None)
HandledChunk: Any = getattr(handle, "HandledChunk", None)
HandledStop: Any = getattr(handle, "HandledStop", None)
TRANSCRIPT_STREAMING = None not in (TranscriptStart, TranscriptChunk, TranscriptStop)
HANDLED_STREAMING = None not in (HandledStart, HandledChunk, HandledStop)


class WyomingError(Exception):
    """A request this connection cannot answer: `code` and message go to the client."""

    def __init__(self, code: str, message: str, fatal: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal  # close the connection after the error event


@dataclass
class WyomingOptions:
    max_audio_s: float = 30.0  # one transcription (Qwen2-Audio hears 30 s per clip)
    max_chunk_bytes: int = 1024 * 1024
    recent_s: float = 120.0  # how long transcribed audio waits for its `transcript` to handle
    chat_idle_s: float = 300.0  # a satellite's conversation ends after this much silence
    max_chats: int = 64
    reply_timeout_s: float = 120.0


def _program(cls: Any, **kwargs: Any) -> Any:
    """An info dataclass from the fields this `wyoming` version has."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in kwargs.items() if k in names})


def normalize(text: str) -> str:
    """How a transcript is matched when it comes back to be handled (HA may strip or re-case it)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join("".join(c if c.isalnum() else " " for c in text).split())


@dataclass
class _Chat:
    """One satellite's (device's, conversation's) ongoing conversation."""

    session: Session
    events: Subscription
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    used: float = field(default_factory=time.monotonic)


class WyomingServer:
    """`await start()`, `await stop()`; `uri` is where it listens (port 0 resolved)."""

    def __init__(self, runtime: AgentRuntime, uri: str, options: WyomingOptions | None = None) -> None:
        self.runtime = runtime
        self.options = options or WyomingOptions()
        self._server: AsyncServer = AsyncServer.from_uri(uri)  # ValueError for a bad URI
        self.uri = uri
        self.connections: set[WyomingConnection] = set()
        self._chats: dict[str, _Chat] = {}
        # (device, normalized transcript) → (audio, when): what a later `transcript` from the same
        # device can be answered from (a device: its satellite/device id, else its address)
        self._recent: OrderedDict[tuple[str, str], tuple[np.ndarray, float]] = OrderedDict()
        self._ambiguous: dict[tuple[str, str], float] = {}  # the same words twice from one device: text only

    async def start(self) -> None:
        await self._server.start(lambda reader, writer: WyomingConnection(self, reader, writer))
        if isinstance(self._server, AsyncTcpServer):
            server = getattr(self._server, "_server", None)
            if server is not None and server.sockets:
                host, port = server.sockets[0].getsockname()[:2]
                self.uri = f"tcp://{host}:{port}"
        log.info("Wyoming server on %s", self.uri)

    async def stop(self) -> None:
        await self._server.stop()
        for conn in list(self.connections):
            await conn.close_session("shutdown")
        for chat in list(self._chats.values()):
            await self._end_chat(chat, "shutdown")
        self._chats.clear()

    def info(self) -> info.Info:
        backend = self.runtime.backend
        model = getattr(backend, "model_name", "") or "qwen2-audio"
        version = _version()
        asr_program = _program(
            info.AsrProgram, name="qwen2-audio", attribution=ATTRIBUTION, installed=True, version=version,
            description="Qwen2-Audio speech to text (voice-agent)",
            models=[info.AsrModel(name=model, attribution=ATTRIBUTION, installed=True, version=None,
                                  description=f"Qwen2-Audio: {model}", languages=list(LANGUAGES))],
            supports_transcript_streaming=TRANSCRIPT_STREAMING)
        programs: dict[str, Any] = {"asr": [asr_program]}
        if hasattr(info, "HandleProgram"):
            programs["handle"] = [_program(
                info.HandleProgram, name="voice-agent", attribution=ATTRIBUTION, installed=True, version=version,
                description="Qwen2-Audio voice agent: answers from the speaker's audio, runs tools",
                models=[info.HandleModel(name=model, attribution=ATTRIBUTION, installed=True, version=None,
                                         description=f"Qwen2-Audio: {model}", languages=list(LANGUAGES))],
                supports_handled_streaming=HANDLED_STREAMING, supports_home_control=len(self.runtime.tools) > 0)]
        return info.Info(**programs)

    # ---- audio this server transcribed, kept for the `transcript` that follows ----------------
    def remember(self, device: str, text: str, audio: np.ndarray) -> None:
        """Keep `audio` for a `transcript` of `text` from the same `device`. Two recordings of
        the same words from one device (two satellites behind one Home Assistant) cannot be
        told apart: neither is used, the text is answered."""
        self._prune_recent()
        key = (device, normalize(text))
        if not key[1]:
            return
        if key in self._recent or key in self._ambiguous:
            self._recent.pop(key, None)
            self._ambiguous[key] = time.monotonic()
            return
        self._recent[key] = (audio, time.monotonic())

    def recall(self, devices: list[str], text: str) -> np.ndarray | None:
        """The audio one of `devices` sent with these words, taken (once)."""
        self._prune_recent()
        for device in devices:
            found = self._recent.pop((device, normalize(text)), None)
            if found is not None:
                return found[0]
        return None

    def _prune_recent(self) -> None:
        cutoff = time.monotonic() - self.options.recent_s
        while self._recent and (len(self._recent) > 16 or next(iter(self._recent.values()))[1] < cutoff):
            self._recent.popitem(last=False)
        for key in [k for k, when in self._ambiguous.items() if when < cutoff]:
            del self._ambiguous[key]

    # ---- conversations per satellite -----------------------------------------------------
    async def chat(self, key: str) -> _Chat:
        now = time.monotonic()
        for k, c in list(self._chats.items()):
            if now - c.used > self.options.chat_idle_s and not c.lock.locked():
                await self._end_chat(self._chats.pop(k), "idle")
        chat = self._chats.get(key)
        if chat is None or chat.session.closed:
            if len(self._chats) >= self.options.max_chats:
                oldest = min(self._chats, key=lambda k: self._chats[k].used)
                await self._end_chat(self._chats.pop(oldest), "evicted")
            session, events = self.runtime.open_session(manual_turns=True)
            chat = self._chats[key] = _Chat(session, events)
        chat.used = now
        return chat

    async def _end_chat(self, chat: _Chat, reason: str) -> None:
        await chat.session.close(reason)
        chat.events.close()


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qwen-voice-agent")
    except PackageNotFoundError:
        return None


class _SizeGuard:
    """The reader `wyoming` parses from, refusing a declared data/payload length over the
    limit before reading it (a ValueError: the library treats it as end of stream)."""

    def __init__(self, reader: asyncio.StreamReader, limit: int) -> None:
        self._reader = reader
        self._limit = limit

    async def readline(self) -> bytes:
        return await self._reader.readline()

    async def readexactly(self, n: int) -> bytes:
        if n > self._limit:
            raise ValueError(f"event of {n} bytes is over the limit of {self._limit}")
        return await self._reader.readexactly(n)

    def feed_eof(self) -> None:
        self._reader.feed_eof()


class _AudioIn:
    """One audio stream: Wyoming PCM of any format → 16 kHz mono float32."""

    def __init__(self, start: AudioStart) -> None:
        _check_format(start.rate, start.width, start.channels)
        self.seconds = 0.0
        self.parts: list[np.ndarray] = []
        self._format: tuple[int, int, int] | None = None
        self._resampler = Resampler()
        self._width = AudioChunkConverter(width=2)

    def convert(self, chunk: AudioChunk) -> np.ndarray:
        _check_format(chunk.rate, chunk.width, chunk.channels)
        if len(chunk.audio) % (chunk.width * chunk.channels):
            raise WyomingError("bad_audio", f"audio-chunk of {len(chunk.audio)} bytes is not whole frames "
                                            f"of {chunk.channels} × {chunk.width} bytes")
        out: list[np.ndarray] = []
        fmt = (chunk.rate, chunk.width, chunk.channels)
        if fmt != self._format:  # a format change: flush what the old resampler holds
            if self._format is not None:
                out.append(self._resampler.convert(None))
                self._resampler = Resampler()
            self._format = fmt
        self.seconds += chunk.samples / chunk.rate
        pcm = np.frombuffer(self._width.convert(chunk).audio, dtype="<i2")
        if pcm.size:
            out.append(self._resampler.convert(frame_from_pcm(pcm, chunk.rate, LAYOUTS[chunk.channels])))
        return self._keep(out)

    def flush(self) -> np.ndarray:
        return self._keep([self._resampler.convert(None)])

    def _keep(self, out: list[np.ndarray]) -> np.ndarray:
        samples = np.concatenate(out) if out else np.zeros(0, np.float32)
        if samples.size:
            self.parts.append(samples)
        return samples

    def audio(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.zeros(0, np.float32)


def _check_format(rate: int, width: int, channels: int) -> None:
    if not (isinstance(rate, int) and 1000 <= rate <= 384000):
        raise WyomingError("bad_audio", f"unsupported sample rate {rate!r} (1000 to 384000 Hz)")
    if width not in (1, 2, 3, 4):
        raise WyomingError("bad_audio", f"unsupported sample width {width!r} (1 to 4 bytes)")
    if channels not in LAYOUTS:
        raise WyomingError("bad_audio", f"unsupported channel count {channels!r} (1 to 8)")


class WyomingConnection(AsyncEventHandler):
    """One client connection: one session on the bus, opened at its first request."""

    def __init__(self, server: WyomingServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(_SizeGuard(reader, MAX_EVENT_BYTES), writer)  # type: ignore[arg-type]
        self.server = server
        self.runtime = server.runtime
        self.options = server.options
        self.session: Session | None = None
        self._events: Subscription | None = None
        self._language: str | None = None
        self._context: dict[str, Any] | None = None
        self._audio: _AudioIn | None = None
        self._last: tuple[str, np.ndarray] | None = None  # (transcript, audio) of this connection
        self._watchdog: asyncio.Task[None] | None = None
        self._seen = time.monotonic()

    # ---- lifecycle -----------------------------------------------------------------------
    async def run(self) -> None:
        self.server.connections.add(self)
        limit = self.runtime.settings.server.max_sessions
        self._watchdog = asyncio.create_task(self._idle_watch())
        try:
            if len(self.server.connections) > limit:
                await self.write_event(Error(text=f"too many connections (limit {limit})", code="busy").event())
                return
            await super().run()
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            log.info("Wyoming client went away: %s", exc)  # mid-event: a clean close all the same
        finally:
            self._watchdog.cancel()
            self.server.connections.discard(self)
            await self.close_session("client_disconnected")
            self.writer.close()

    async def _idle_watch(self) -> None:
        idle = self.runtime.settings.server.idle_timeout_s
        while True:
            await asyncio.sleep(min(idle, 60.0))
            if time.monotonic() - self._seen > idle:
                log.info("closing an idle Wyoming connection")
                await self.stop()
                return

    def _session(self) -> tuple[Session, Subscription]:
        if self.session is None or self._events is None:
            self.session, self._events = self.runtime.open_session(manual_turns=True)
        return self.session, self._events

    async def close_session(self, reason: str) -> None:
        if self.session is not None:
            await self.session.close(reason)
        if self._events is not None:
            self._events.close()

    # ---- events --------------------------------------------------------------------------
    async def handle_event(self, event: Event) -> bool:
        self._seen = time.monotonic()
        if self.session is not None and self.session.closed:
            return False  # closed from another side (a plugin's command, shutdown): the connection goes too
        try:
            return await self._dispatch(event)
        except WyomingError as exc:
            return await self._fail(exc)
        except (ConnectionError, asyncio.IncompleteReadError):
            return False  # the client is gone; run() closes the session
        except (KeyError, TypeError, ValueError) as exc:  # a malformed event
            return await self._fail(WyomingError("bad_request", f"malformed {event.type}: {exc!r}", fatal=False))

    async def _fail(self, exc: WyomingError) -> bool:
        log.info("Wyoming %s: %s", exc.code, exc.message)
        self._audio = None
        session, _ = self._session()
        session.report_error(exc.code, exc.message)  # on the bus: plugins and /metrics see it
        try:
            await self.write_event(Error(text=exc.message, code=exc.code).event())
        except ConnectionError:
            return False
        return not exc.fatal

    async def _dispatch(self, event: Event) -> bool:
        if info.Describe.is_type(event.type):
            await self.write_event(self.server.info().event())
        elif Ping.is_type(event.type):
            await self.write_event(Pong(text=Ping.from_event(event).text).event())
        elif event.type == "select-program":
            pass  # one program per domain: nothing to select
        elif asr.Transcribe.is_type(event.type):
            transcribe = asr.Transcribe.from_event(event)
            self._language, self._context = transcribe.language, transcribe.context
        elif AudioStart.is_type(event.type):
            session, _ = self._session()
            await session.clear()  # speech held from an abandoned stream must not join this one
            self._audio = _AudioIn(AudioStart.from_event(event))
        elif AudioChunk.is_type(event.type):
            await self._on_chunk(event)
        elif AudioStop.is_type(event.type):
            return await self._on_stop()
        elif asr.Transcript.is_type(event.type):
            return await self._on_transcript(asr.Transcript.from_event(event))
        else:
            raise WyomingError("unknown_event", f"unknown event type {event.type!r}", fatal=False)
        return True

    # ---- speech to text ------------------------------------------------------------------
    async def _on_chunk(self, event: Event) -> None:
        if self._audio is None:
            raise WyomingError("audio_not_started", "audio-chunk before audio-start", fatal=False)
        size = len(event.payload or b"")
        if size > self.options.max_chunk_bytes:
            raise WyomingError("chunk_too_large", f"audio-chunk of {size} bytes is over the limit of "
                                                  f"{self.options.max_chunk_bytes}: this transcription is dropped")
        stream = self._audio
        samples = stream.convert(AudioChunk.from_event(event))
        if stream.seconds > self.options.max_audio_s + 1e-6:  # float sums of exact 30 s
            raise WyomingError("audio_too_long", f"more than {self.options.max_audio_s:g} s of audio in one "
                                                 "transcription: this transcription is dropped")
        session, _ = self._session()
        await session.push_audio(samples)

    async def _on_stop(self) -> bool:
        stream, self._audio = self._audio, None
        if stream is None:
            raise WyomingError("audio_not_started", "audio-stop without audio-start", fatal=False)
        session, events = self._session()
        await session.push_audio(stream.flush())
        audio = stream.audio()
        if audio.size == 0:
            raise WyomingError("no_audio", "audio-stop with no audio to transcribe")
        await session.handle(ev.InstructionSet(text=self._instruction()))
        committed = await session.commit()
        if not committed:
            await session.handle(ev.InstructionSet(text=""))  # it must not stick to a later turn
            raise WyomingError("no_speech", f"no speech heard in {audio.size / SAMPLE_RATE:.1f} s of audio")
        device = self._devices(self._context)[0]
        try:
            text = await self._transcribe(session, events, device)
        except WyomingError as exc:
            exc.fatal = True  # Home Assistant ignores `error`: only the close ends its wait at once
            raise
        finally:
            await session.handle(ev.ResponseCancel())  # a no-op once done; after a failure it
            await session.wait_idle()  # must not add its answer after the pop below
            session.conversation.pop_last_user()  # a transcript is not part of any conversation
        log.info("Wyoming transcribe: session %s, %s: %.1f s of audio, %d characters", session.id, device,
                 audio.size / SAMPLE_RATE, len(text))
        self._last = (text, audio)
        self.server.remember(device, text, audio)
        return True

    def _devices(self, context: dict[str, Any] | None) -> list[str]:
        """Who sent a request, most specific first: the satellite / device it names, then the
        client's address (Home Assistant's speech-to-text requests name none)."""
        context = context or {}
        named = [f"{k.removesuffix('_id')} {context[k]}" for k in ("satellite_id", "device_id") if context.get(k)]
        peer = self.writer.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) and peer else "local socket"
        return [*named, f"client {host}"]

    def _instruction(self) -> str:
        if self._language:
            return f"{TRANSCRIBE} The speech is in the language with code '{self._language}'."
        return TRANSCRIBE

    async def _transcribe(self, session: Session, events: Subscription, device: str) -> str:
        language, context = self._language, self._context
        streaming = (TranscriptStart(language=language, context=context), TranscriptChunk, TranscriptStop()) \
            if TRANSCRIPT_STREAMING else None
        # No tools: the client acts on the transcript; a call run here would be done twice.
        text = await self._stream(events, await session.reply(tools=False), streaming, device)
        await self.write_event(asr.Transcript(text=text, language=language, context=context).event())
        if streaming is not None:
            await self.write_event(streaming[2].event())
        return text

    async def _stream(self, events: Subscription, turn_id: str, streaming: tuple[Any, Any, Any] | None,
                      device: str) -> str:
        """One answer's text; with `streaming` (start event, chunk class, stop event: the
        transcript-* or handled-* family) its start and chunks go out as it comes. The caller
        sends the final event, then the stop."""
        if streaming is not None:
            await self.write_event(streaming[0].event())
        said: list[str] = []
        async for delta in self._answer(events, turn_id, device):
            said.append(delta)
            if streaming is not None:
                await self.write_event(streaming[1](text=delta).event())
        return "".join(said).strip()

    async def _answer(self, events: Subscription, turn_id: str, device: str) -> AsyncIterator[str]:
        """The text deltas of one response; WyomingError when it fails. Its tool calls are logged."""
        deadline = time.monotonic() + self.options.reply_timeout_s
        calls: set[str] = set()
        while True:
            try:
                event = await asyncio.wait_for(events.get(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise WyomingError("timeout", f"no answer within {self.options.reply_timeout_s:g} s") from None
            if isinstance(event, ev.SessionEnded):
                raise WyomingError("session_closed", f"the session ended ({event.reason})")
            if isinstance(event, ev.ToolResult) and event.call_id in calls:
                log.info("Wyoming tool result: session %s, %s: %s %s", event.session_id, device, event.call_id,
                         "ok" if event.ok else f"failed: {event.error}")
            if getattr(event, "turn_id", None) != turn_id:
                continue
            if isinstance(event, ev.ToolCall):
                calls.add(event.call_id)
                log.info("Wyoming tool call: session %s, %s: %s %s %s", event.session_id, device, event.call_id,
                         event.name, event.arguments)
            elif isinstance(event, ev.ResponseDelta):
                yield event.text
            elif isinstance(event, ev.ResponseDone):
                return
            elif isinstance(event, ev.ResponseCancelled):
                raise WyomingError("cancelled", f"the answer was cancelled ({event.reason})", fatal=False)
            elif isinstance(event, ev.Error):
                raise WyomingError(event.code, event.message, fatal=False)

    # ---- handle: the agent answers ---------------------------------------------------------
    async def _on_transcript(self, transcript: asr.Transcript) -> bool:
        """Answer a `transcript`; one that cannot be answered gets `not-handled` and a close."""
        context = dict(transcript.context or {})
        key = next((f"{k}:{context[k]}" for k in ("satellite_id", "device_id", "conversation_id") if context.get(k)),
                   None)
        devices = self._devices(context)
        session: Session | None = None
        try:
            if not transcript.text.strip():
                raise WyomingError("bad_request", "there was no text to handle")
            if self._last is not None and normalize(self._last[0]) == normalize(transcript.text):
                audio: np.ndarray | None = self._last[1]  # this connection's own, whatever its device
                self.server.recall(self._devices(self._context)[:1], transcript.text)
            else:
                audio = self.server.recall(devices, transcript.text)
            if key is None:
                session, events = self._session()
                lock: AbstractAsyncContextManager[Any] = nullcontext()
            else:
                chat = await self.server.chat(key)
                session, events, lock = chat.session, chat.events, chat.lock
            async with lock:  # one answer at a time per satellite
                await self._handle(session, events, transcript.text, audio, context, devices[0])
            return True
        except WyomingError as exc:
            log.info("Wyoming handle failed: session %s, %s: %s: %s", session.id if session else "-", devices[0],
                     exc.code, exc.message)
            (session or self._session()[0]).report_error(exc.code, exc.message)
            reply_context = {**context, "conversation_id": context.get("conversation_id") or
                             (session.id if session is not None else None)}
            with contextlib.suppress(ConnectionError):
                await self.write_event(handle.NotHandled(text=exc.message, context=reply_context).event())
            return False  # Home Assistant opens a connection per request: done with this one

    async def _handle(self, session: Session, events: Subscription, text: str, audio: np.ndarray | None,
                      context: dict[str, Any], device: str) -> None:
        committed = False
        if audio is not None:  # answer the speaker's own audio: voice chat mode
            await session.push_audio(audio)
            committed = await session.commit()
        if not committed:
            session.conversation.add_user_text(text)
        reply_context = {**context, "conversation_id": context.get("conversation_id") or session.id}
        streaming = (HandledStart(context=reply_context), HandledChunk, HandledStop()) if HANDLED_STREAMING else None
        text = await self._stream(events, await session.reply(), streaming, device)
        log.info("Wyoming handle: session %s, %s: answered from %s, %d characters", session.id, device,
                 "the speaker's audio" if committed else "the text", len(text))
        await self.write_event(handle.Handled(text=text, context=reply_context).event())
        if streaming is not None:
            await self.write_event(streaming[2].event())
