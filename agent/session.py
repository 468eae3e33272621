"""One conversation with one speaker: audio in, events out.

    push_audio → VAD stream → TurnDetector → Conversation → Backend → ToolCallParser → events

Transports (WebRTC, WHIP, LiveKit, files, Wyoming) only call `push_audio`, `handle` and
`close`; everything the session says goes out through the event sink it was given. A session
is given its dependencies (`SessionDeps`) and knows nothing of the runtime that made it.

The session routes signals — the turn detector's, the overlap decision of agent/speech/bargein.py,
the client's commands — and keeps the conversation. Each answer is a `Reply` (agent/reply.py:
its request, voice, stamps and cancellation), run by `Replies` (agent/replies.py), which owns
every answer's task: a close reaches them all, and nothing is emitted after `session.ended`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent import events as ev
from agent import turns
from agent.commands import Commands, HookRunner
from agent.config import Settings
from agent.context import AgentHooks, RunContext, UserTurn
from agent.conversation import Conversation
from agent.eot import EndOfTurnService
from agent.inference.base import Backend
from agent.listener import MAX_UNCOMMITTED_S, Listener
from agent.preempt import Preemption
from agent.replies import Replies
from agent.reply import Reply, TurnIds
from agent.speech.bargein import BargeIn, Playout
from agent.speech.base import SpeechEngine
from agent.speech.voice import Voice, VoiceCounters
from agent.tools import ToolRegistry
from agent.vad import VADStream

log = logging.getLogger(__name__)

__all__ = ["MAX_UNCOMMITTED_S", "Session", "SessionDeps"]


@dataclass
class SessionDeps:
    """Everything a session uses, handed in by whoever creates it (the runtime)."""

    settings: Settings
    vad: VADStream  # this session's stream of the shared VAD service
    backend: Backend
    tools: ToolRegistry  # this session's own view: changing it changes no other session
    publish: Callable[[ev.Event], None]  # the event sink (the runtime's bus)
    system_prompt: str | None = None
    hooks: AgentHooks = field(default_factory=AgentHooks)
    on_closed: Callable[[Session], None] = lambda session: None
    tts: SpeechEngine | None = None  # speech out, started and shared (None: text only)
    voice_counters: VoiceCounters | None = None  # the process's speech-out totals (for /metrics)
    end_of_turn: EndOfTurnService | None = None  # the process's end-of-turn model (None: fixed silence rule)
    totals: dict[str, int] = field(default_factory=dict)  # the process's counts, added up (events_dropped)


class Session:
    def __init__(self, deps: SessionDeps, session_id: str | None = None, *,
                 instruction: str | None = None, wait_for_responses: bool = False,
                 manual_turns: bool = False, voice_output: str = "none") -> None:
        """`instruction` applies to every turn (analysis mode throughout);
        `wait_for_responses` holds the audio input while a response runs — what a file
        fed faster than real time needs, where barge-in would otherwise cut every answer;
        `manual_turns`: the owner ends turns (`commit()` / `clear()`) and asks for answers
        (`reply()`) — the VAD still reports speech, its turns are kept until `commit()`;
        `voice_output`: with a TTS engine, "live" (a transport pulls `voice.player`'s frames in
        real time) or "offline" (each answer rendered at once); "none": text only."""
        self.deps = deps
        self.settings = s = deps.settings
        self.backend = deps.backend
        self.id = session_id or uuid.uuid4().hex[:12]
        self._stamper = ev.EventStamper(self.id)
        self.conversation = Conversation.for_backend(deps.system_prompt, s.context_tokens, deps.backend)
        self.hooks = deps.hooks
        self.context = RunContext(self, deps.hooks.create_userdata())
        self._wait = wait_for_responses
        self.turn_ids = TurnIds(self.id)
        self.manual_turns = manual_turns
        # The tools shown to the model (this session's own registry), and whether their calls
        # end the response instead of being run here (an owner with its own tool runtime,
        # livekit-agents, adds the results to `conversation` and calls `reply()`).
        self.tools = deps.tools
        self.defer_tool_calls = False
        self.hook_runner = HookRunner(deps.hooks, self.context, self.id, self.emit)  # its tasks (answers': `replies`)
        self._lock = asyncio.Lock()  # audio is processed in order, one push at a time
        self.closed = False
        self.ended = False  # session.ended went out: nothing else does
        self.events_dropped = 0  # events that came after session.ended (logged)
        self.last_activity = time.monotonic()
        # Speech out (None: text only, everything as without TTS).
        self.voice: Voice | None = None
        if deps.tts is not None and voice_output in ("live", "offline"):
            self.voice = Voice(deps.tts, self.emit, realtime=voice_output == "live",
                               counters=deps.voice_counters, playout_margin_s=s.turns.echo_playout_s)
        # Speech that began while the agent was answering: pause, then backchannel, barge-in or echo.
        self._overlap = BargeIn(s.turns.to_bargein_config(), self.voice, self.emit)
        self.replies = Replies(self)  # every answer, its task and its voice turn (agent/replies.py)
        # The user's turn in progress: VAD, detector, end-of-turn verdict, when to preempt, stamps.
        self._ears = Listener(deps.vad, turns.TurnDetector(s.turns.to_turn_config()),
                              Preemption(s.turns.preempt_after_s, s.turns.preemptive), deps.end_of_turn,
                              self.hook_runner.spawn, self.id)
        self.commands = Commands(self.conversation, self._ears.detector, self.turn_ids, self.hook_runner,
                                 s.max_new_tokens, instruction)

    @property
    def max_new_tokens(self) -> int:
        return self.commands.max_new_tokens

    @max_new_tokens.setter
    def max_new_tokens(self, value: int) -> None:  # as session.update's max_new_tokens
        self.commands.max_new_tokens = value

    @property
    def uncommitted_dropped_s(self) -> float:
        """manual_turns: seconds of uncommitted speech dropped beyond MAX_UNCOMMITTED_S."""
        return self._ears.uncommitted_dropped_s

    @property
    def held_dropped_s(self) -> float:
        """Deprecated name of `uncommitted_dropped_s` (kept for existing callers)."""
        return self.uncommitted_dropped_s

    # ---- events -------------------------------------------------------------------
    def emit(self, event: ev._Event) -> None:
        if self.ended:
            self.events_dropped += 1
            self.deps.totals["events_dropped"] = self.deps.totals.get("events_dropped", 0) + 1
            log.warning("session %s: %s after session.ended dropped (%d so far)", self.id, getattr(event, "type", "?"),
                        self.events_dropped)
            return
        if self.replies.route(event):  # a preemptive answer's events wait for its commit
            self.deps.publish(self._stamper.stamp(event))  # type: ignore[arg-type]

    def start(self) -> None:
        b = self.backend
        self.emit(ev.SessionStarted(model=b.model_name, warning=b.warning))
        self.hook_runner.spawn(self.hook_runner.run("on_session_started"), "started")

    def set_tools(self, tools: Sequence[Any]) -> None:
        """This session's tools from its next response on."""
        registry = ToolRegistry()
        registry.extend(tools)
        self.tools = registry

    # ---- audio --------------------------------------------------------------------
    async def push_audio(self, samples: np.ndarray) -> None:
        """Feed 16 kHz mono float32 audio of any length."""
        if self.closed or samples.size == 0:
            return
        async with self._lock:
            self.last_activity = time.monotonic()
            ears = self._ears
            for chunk, p in await ears.score(samples):
                if self.closed:
                    return  # closed meanwhile: the rest is nobody's
                for signal in await ears.feed(chunk, p):
                    await self._on_signal(signal)
                if (start := ears.tick()) is not None:
                    self.replies.preempt(start.end, start.audio, self.commands.take_instruction(peek=True))
                if self._overlap.voice is not None and not self.closed:
                    if self._overlap.step(chunk, p, ears.now, self._agent_busy()):
                        await self._interrupt("barge_in")

    async def finish(self) -> None:
        """End of input: a turn in progress commits; wait for its response."""
        await self.commit()
        await self.wait_idle()

    async def wait_idle(self) -> None:
        await self.replies.wait_idle()
        if self.voice is not None and not self.voice.realtime:
            await self.voice.wait_idle()  # offline speech is rendered at once: wait for it

    # ---- speech out: barge-in, backchannels, self-echo ---------------------------------
    def _agent_busy(self) -> bool:
        voice = self._overlap.voice  # ours, or the owner's (attach_voice)
        withheld = self.voice is not None and self.voice.withheld  # a preemptive answer nobody hears yet
        return self.replies.busy or (voice is not None and voice.active and not withheld)

    def attach_voice(self, voice: Playout) -> None:
        """The agent's voice is played by the owner (livekit-agents): speech over it is paused,
        judged and cancelled through `voice` as over our own (agent/speech/bargein.py)."""
        self._overlap = BargeIn(self.settings.turns.to_bargein_config(), voice, self.emit)

    async def _interrupt(self, reason: str) -> None:
        """Stop the answer (text and voice); the history keeps only what was heard."""
        assert self._overlap.voice is not None
        await self.replies.interrupt(reason, self._overlap.voice.interrupt())

    async def _on_signal(self, signal: turns.Signal) -> None:
        if self.closed:
            return
        if isinstance(signal, turns.SpeechStarted):
            self.emit(ev.SpeechStarted(t=signal.t))
            if self.manual_turns:
                return  # the owner decides about barge-in
            if self._overlap.voice is not None:
                self._overlap.speech_started(signal.t, self._agent_busy())
            else:
                self.replies.cancel("barge_in")  # the user talks over the answer
        elif isinstance(signal, turns.SpeechStopped):
            self.emit(ev.SpeechStopped(t=signal.t))
            self._overlap.speech_paused(signal.t)
        elif isinstance(signal, turns.SilenceBegan):
            self._overlap.speech_paused(signal.t)
            self._ears.silence_began(signal, self._may_preempt())
            if self.manual_turns:
                return  # the committed turn will join kept parts: no prefill can match it
            await self.replies.drop_pending()  # (none: speech resumed or the turn committed since the last silence)
            await self.replies.speculate(self.turn_ids.next(), signal.t, signal.audio, self.commands.take_instruction(peek=True))
        elif isinstance(signal, turns.SpeechResumed):
            self._overlap.speech_resumed()
            self._ears.preempt.on_signal(signal)
            await self.replies.drop_pending()
        elif isinstance(signal, turns.TurnCommitted):
            self._ears.turn_committed(signal)
            ignored, cancel = self._overlap.turn_committed(signal.audio, signal.split, self._ears.now)
            if cancel:
                await self._interrupt("barge_in")
            if ignored is not None:
                # A backchannel ("mm-hm") or our own voice: the agent goes on speaking and
                # this is no user turn (bargein.py reports it).
                await self.replies.drop_pending()
            elif self.manual_turns:
                self._ears.keep(signal)
            else:
                await self._commit(signal)

    async def commit(self) -> bool:
        """End the user's turn now (the owner's turn detection, push-to-talk): speech in
        progress is cut; with `manual_turns` all uncommitted speech becomes one user turn,
        answered only by `reply()`. Returns whether a turn was committed."""
        async with self._lock:
            flushed = self._ears.detector.flush()
            for signal in flushed:
                await self._on_signal(signal)
            if not self.manual_turns:
                return any(isinstance(s, turns.TurnCommitted) for s in flushed)
            turn = self._ears.take_uncommitted()
            if turn is None or self.closed:
                return False
            await self._commit(turn, respond=False)
            return True

    async def clear(self) -> None:
        """Forget the user's speech not committed yet (kept, and the turn in progress)."""
        async with self._lock:
            self._ears.uncommitted = []
            for signal in self._ears.detector.flush():
                if not isinstance(signal, turns.TurnCommitted):
                    await self._on_signal(signal)  # speech.stopped; the turn itself is dropped
            self._ears.preempt.cancel()
            await self.replies.drop_pending()

    async def reply(self, instructions: str | None = None, *, tools: bool = True) -> str:
        """Answer now rather than on a committed turn: the pending user turn (audio, typed)
        or tool results; with nothing pending, `instructions` become a typed user turn.
        `instructions` join the system prompt of this response only; `tools=False`: no tool
        is offered and nothing the model writes runs (a transcription). Returns its turn_id;
        raises ValueError when there is nothing to answer."""
        self._ears.preempt.cancel()  # the agent speaks first: no preemptive answer
        return await self.replies.reply(instructions, tools)

    async def say(self, text: str) -> str:
        """Speak `text` as the agent now (a hook, a tool, a greeting): events and history as if
        the model had said it; the running response, if any, is superseded. Its turn_id."""
        self._ears.preempt.cancel()  # the agent speaks first: no preemptive answer
        return await self.replies.say(text)

    async def _commit(self, turn: turns.TurnCommitted, respond: bool = True) -> None:
        reply = self.replies.matching(turn.end, turn.split)  # the speculative reply is this very turn
        if reply is None:
            await self.replies.drop_pending()
        turn_id = reply.turn_id if reply is not None else self.turn_ids.next()
        await self.replies.stop("superseded")
        committed_at = time.monotonic()
        stamps = self._ears.take_stamps(committed_at)
        user = UserTurn(turn_id, turn.audio, turn.start, turn.end, self.commands.take_instruction())
        direct = await self.hook_runner.run("on_user_turn", user)
        if self.closed:
            return  # closed meanwhile: nothing of this turn goes out, nothing reaches the backend
        instruction = user.instruction or None
        if reply is not None and not (respond and not user.skipped and not isinstance(direct, str)
                                      and reply.serves(instruction)):
            await self.replies.withdraw()  # the hook changed the turn: the preemptive answer is not its answer
        if user.skipped:
            await self.replies.discard(turn_id)
            return
        try:
            self.conversation.add_user(turn.audio, instruction)
        except ValueError as exc:  # e.g. an oversized instruction: this turn fails, the session goes on
            await self.replies.drop()
            self.emit(ev.Error(code="bad_request", message=str(exc), turn_id=turn_id))
            return
        self.emit(ev.TurnCommitted(turn_id=turn_id, start=turn.start, end=turn.end,
                                   mode="analysis" if instruction else "chat", instruction=instruction))
        if isinstance(direct, str):  # the agent answered it itself: no model
            await self.replies.discard(turn_id)
            self.replies.answer_directly(Reply.committed(turn_id, committed_at, stamps, turn.end), direct)
            return
        if not respond:
            return
        await self.replies.give(reply, turn_id, committed_at, stamps)
        if self._wait:
            await self.wait_idle()

    # ---- preemptive answers ----------------------------------------------------------
    def _may_preempt(self) -> bool:
        """Not while the agent speaks (overlap rules), nor for turns the owner ends, nor for
        files fed faster than real time (nothing to gain), nor with offline speech."""
        offline_voice = self.voice is not None and not self.voice.realtime
        return not (self.manual_turns or self._wait or offline_voice or self._agent_busy() or self.closed)

    # ---- commands -----------------------------------------------------------------
    async def handle(self, command: ev.Command) -> None:
        """Routed: a cancel to the answer, a close to `close`, the rest to `commands`."""
        self.last_activity = time.monotonic()
        if isinstance(command, ev.ResponseCancel):
            if self.voice is not None and self._agent_busy():
                await self._interrupt("client")  # the text, or only its speech still playing
            else:
                self.replies.cancel("client")
        elif isinstance(command, ev.SessionClose):
            await self.close("client")
        else:
            await self.commands.handle(command)

    def report_error(self, code: str, message: str) -> None:
        self.emit(ev.Error(code=code, message=message))

    async def close(self, reason: str = "closed") -> None:
        if self.closed:
            return
        self.closed = self.hook_runner.closed = True  # from here nothing starts: no reply, no task, no backend call
        self._ears.preempt.cancel()
        await self.replies.close()
        await self.hook_runner.close()
        if self.voice is not None:
            await self.voice.close()
        self._ears.vad.close()
        await self.hook_runner.run("on_session_ended", reason)
        try:
            await self.backend.forget(self.id)
        except Exception as exc:
            log.debug("forget failed: %s", exc)
        self.emit(ev.SessionEnded(reason=reason))
        self.ended = True
        self.deps.on_closed(self)
