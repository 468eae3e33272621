"""What all sessions of one process share: VAD service, inference backend, tools, bus, plugins.

The runtime creates sessions (handing each its dependencies), owns their lifetime and drops
closed ones; sessions never reach back into it. It is also the `CommandTarget` plugins and
transports send commands to.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent.bus import EventBus, Subscription
from agent.config import Settings
from agent.context import AgentHooks
from agent.conversation import Conversation
from agent.eot import SILENCE, EndOfTurnService, detector_factory
from agent.events import Command, Error, Event
from agent.heap import CycleCollector
from agent.inference.base import Backend
from agent.model.qwen2_audio import DEFAULT_SYSTEM
from agent.record.recorder import Recorder
from agent.session import Session, SessionDeps
from agent.speech.base import SpeechEngine, TTSError, load_engine
from agent.speech.voice import VoiceCounters
from agent.tools import Tool, ToolRegistry
from agent.vad import VADService

if TYPE_CHECKING:
    from agent.plugin import PluginHost

log = logging.getLogger(__name__)


def create_backend(settings: Settings) -> Backend:
    if settings.backend == "openai":
        from agent.inference.openai import OpenAIBackend

        return OpenAIBackend(settings.openai_url, settings.openai_model, api_key=settings.openai_api_key,
                             max_audios=settings.openai_max_audios)
    if settings.backend == "scripted" and settings.script is not None:
        from agent.inference.scripted import ScriptedBackend

        return ScriptedBackend.from_script(settings.script)
    from agent.inference.pool import InferencePool

    return InferencePool(model=settings.model, workers=settings.workers, max_batch=settings.max_batch,
                         max_queue=settings.max_queue, kv_budget_tokens=settings.kv_budget_tokens,
                         gpu_memory_utilization=settings.gpu_memory_utilization,
                         prefill_chunk_tokens=settings.prefill_chunk_tokens, encoder_padded=settings.encoder_padded,
                         step_timeout_s=settings.step_timeout_s)


class AgentRuntime:
    """Owns the shared services; a `CommandTarget` for plugins and transports."""

    def __init__(self, settings: Settings, *, backend: Backend | None = None,
                 tools: list[Tool] | None = None, plugin_classes: dict[str, Any] | None = None,
                 hooks: AgentHooks | None = None) -> None:
        """`hooks`: the agent whose hooks every session runs (an `agent.Agent`)."""
        self.settings = settings
        self.hooks = hooks or AgentHooks()
        self.bus = EventBus()
        self.vad = VADService()
        self.end_of_turn: EndOfTurnService | None = None  # turns.end_of_turn's model, shared (started by start())
        self.backend: Backend = backend or create_backend(settings)
        self.tools = ToolRegistry()
        self.tools.extend(tools or [])
        self.sessions: dict[str, Session] = {}
        self.collector = CycleCollector()
        self._plugin_classes = plugin_classes
        self.plugins: PluginHost | None = None
        self.tts: SpeechEngine | None = None  # started once, shared by every session (speech out)
        self.voice_counters = VoiceCounters()  # every session's speech out, added up (for /metrics)
        self.session_totals: dict[str, int] = {"events_dropped": 0}  # every session's drops, added up (/metrics)
        # serve --processes N (agent.server.router): ids carry the frontend; others hold some sessions.
        self.new_session_id: Callable[[], str] = lambda: uuid.uuid4().hex[:12]
        self.owns: Callable[[str | None], bool] = lambda session_id: True
        self.frontend: int | None = None
        self.recorder: Recorder | None = None  # `record: DIR`: turns and feedback on disk
        if settings.record:
            self.recorder = Recorder(settings.record, self.sessions.get)

    async def start(self) -> None:
        """Start everything; raises (InferenceError, ValueError) with a clear message."""
        if self.settings.plugins or self._plugin_classes:
            from agent.plugin import PluginContext, PluginHost

            context = PluginContext(bus=self.bus, commands=self, agent_id=self.settings.agent_id, sessions=self,
                                    owns=self.owns, frontend=self.frontend)
            # Configs are validated before anything starts: a typo fails fast.
            self.plugins = PluginHost.from_config(self.settings.plugins, context, classes=self._plugin_classes)
        if self.recorder is not None:
            self.recorder.open()  # an unwritable directory fails the start, with its reason
        await self.vad.start()
        if self.settings.turns.end_of_turn != SILENCE:
            self.end_of_turn = EndOfTurnService(detector_factory(self.settings.turns.end_of_turn))
            await self.end_of_turn.start()
        await self._start_tts()
        await self.backend.start()
        if self.plugins is not None:
            await self.plugins.start()
            self.tools.extend(self.plugins.tools())
        self._check_prompt_budget()

    async def _start_tts(self) -> None:
        """The configured speech engine, checked before the model loads (a bad voice fails fast)."""
        try:
            engine = load_engine(self.settings.tts)
            if engine is not None:
                await engine.start()
        except TTSError as exc:
            raise ValueError(f"speech out (tts): {exc}") from None
        self.tts = engine

    def _check_prompt_budget(self) -> None:
        """Say so when the system prompt and tool schemas (e.g. many Home Assistant entities)
        leave little room for history: the oldest turns are then dropped almost at once."""
        probe = Conversation.for_backend(self.system_prompt(), self.settings.context_tokens, self.backend)
        n = probe.system_tokens(self.tools.system_block(probe.family.tool_syntax) if len(self.tools) else None)
        if n > probe.context_tokens // 2:  # the server's max_model_len may be the smaller
            log.warning("the system prompt and tool schemas take %d of the %d context tokens: little "
                        "conversation history will fit; raise context_tokens or trim the prompt, tools "
                        "or entities", n, probe.context_tokens)

    def system_prompt(self) -> str | None:
        """The configured prompt plus what plugins add now (e.g. Home Assistant's current
        states). Read when a session starts: a running session keeps its prompt, so the KV
        cache of its history stays valid."""
        extra = self.plugins.system_prompt() if self.plugins is not None else None
        if not extra:
            return self.settings.system_prompt
        return f"{self.settings.system_prompt or DEFAULT_SYSTEM}\n\n{extra}"

    async def close(self) -> None:
        for session in list(self.sessions.values()):
            await session.close("shutdown")
        if self.plugins is not None:
            await self.plugins.stop()
        await self.backend.close()
        await self.vad.close()
        if self.end_of_turn is not None:
            await self.end_of_turn.close()
        self.collector.cancel()
        if self.tts is not None:
            await self.tts.aclose()
        if self.recorder is not None:
            await self.recorder.aclose()  # the writes handed over finish first

    def open_session(self, session_id: str | None = None, *, queue_size: int = 1024,
                     **options: Any) -> tuple[Session, Subscription]:
        """A new session and the stream of its events, `session.started` first: the
        subscription exists before the session does, so no event can be missed."""
        session_id = session_id or self.new_session_id()
        events = self.bus.subscribe(session_id, maxsize=queue_size)
        return self.create_session(session_id, **options), events

    def create_session(self, session_id: str | None = None, **options: Any) -> Session:
        """A started session (prefer `open_session`, which also gives its events)."""
        deps = SessionDeps(settings=self.settings, vad=self.vad.open_stream(), backend=self.backend,
                           tools=self.tools.copy(), publish=self._publish(), system_prompt=self.system_prompt(),
                           hooks=self.hooks, on_closed=self._closed, tts=self.tts,
                           voice_counters=self.voice_counters, end_of_turn=self.end_of_turn,
                           totals=self.session_totals)
        session = Session(deps, session_id, **options)
        self.sessions[session.id] = session
        session.start()
        return session

    def _publish(self) -> Callable[[Event], None]:
        return self.bus.publish if self.recorder is None else self.recorder.sink(self.bus.publish)

    def _closed(self, session: Session) -> None:
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]
        # A session's transport (aiortc above all) is a web of reference cycles: collect it now,
        # not in a hundred sessions, so the next session reuses its memory (agent/heap.py).
        self.collector.soon()

    # ---- CommandTarget ------------------------------------------------------------
    async def send_command(self, session_id: str | None, command: Command) -> None:
        targets = list(self.sessions.values()) if session_id is None else [self.sessions[session_id]]
        for session in targets:
            await session.handle(command)

    def report_error(self, session_id: str | None, code: str, message: str) -> None:
        if session_id is None:
            self.bus.publish(Error(code=code, message=message))  # not tied to a session
            return
        session = self.sessions.get(session_id)
        if session is not None:
            session.report_error(code, message)
        else:
            self.bus.publish(Error(session_id=session_id, code=code, message=f"{message} (unknown session)"))
