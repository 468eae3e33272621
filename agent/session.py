"""One conversation with one speaker: audio in, events out.

    push_audio → VAD stream → TurnDetector → Conversation → Backend → ToolCallParser → events

Transports (WebRTC, WHIP, LiveKit, files, Wyoming) only call `push_audio`, `handle` and
`close`; everything the session says goes out through the event sink it was given. A session
is given its dependencies (`SessionDeps`) and knows nothing of the runtime that made it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent import events as ev
from agent import turns
from agent.config import Settings
from agent.context import AgentHooks, RunContext, UserTurn
from agent.conversation import Conversation
from agent.eot import EndOfTurnService, PendingVerdict
from agent.inference.base import Backend, GenerationRequest, GenerationStats, InferenceError
from agent.preempt import Discard, Held, Preemption, Promote, Start, TurnStamps
from agent.speech.bargein import BargeIn, Playout
from agent.speech.base import SpeechEngine
from agent.speech.voice import Voice, VoiceCounters
from agent.tools import ParsedToolCall, TextPiece, ToolCallParser, ToolOutcome, ToolRegistry, format_tool_responses
from agent.vad import CHUNK, VADStream

log = logging.getLogger(__name__)

MAX_HELD_S = 120.0  # manual turns: speech held for commit() beyond this drops its oldest part


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


async def _call(result: Any) -> Any:
    """Hooks may be plain or async methods."""
    return await result if inspect.isawaitable(result) else result


class Session:
    def __init__(self, deps: SessionDeps, session_id: str | None = None, *,
                 instruction: str | None = None, wait_for_responses: bool = False,
                 manual_turns: bool = False, voice_output: str = "none") -> None:
        """`instruction` applies to every turn (analysis mode throughout);
        `wait_for_responses` holds the audio input while a response runs — what a file
        fed faster than real time needs, where barge-in would otherwise cut every answer;
        `manual_turns`: the owner ends turns (`commit()` / `clear()`) and asks for answers
        (`reply()`) — the VAD still reports speech, its turns are held until `commit()`;
        `voice_output`: with a TTS engine, "live" (a transport pulls `voice.player`'s frames in
        real time) or "offline" (each answer rendered at once); "none": text only."""
        self.deps = deps
        self.settings = s = deps.settings
        self.backend = deps.backend
        self.id = session_id or uuid.uuid4().hex[:12]
        self._stamper = ev.EventStamper(self.id)
        self._detector = turns.TurnDetector(s.turns.to_turn_config())
        self._vad = deps.vad
        self._eot = deps.end_of_turn
        self.conversation = Conversation.for_backend(deps.system_prompt, s.context_tokens, deps.backend)
        self.hooks = deps.hooks
        self.context = RunContext(self, deps.hooks.create_userdata())
        self.max_new_tokens = s.max_new_tokens
        self._instruction = instruction
        self._next_instruction: str | None = None
        self._wait = wait_for_responses
        self._pending: list[np.ndarray] = []  # audio the VAD has not scored yet
        self._turn_n = 0
        self._speculative: tuple[str, float] | None = None  # (turn_id, end) being prefilled
        self._response: asyncio.Task[None] | None = None
        self.manual_turns = manual_turns
        self._held: list[turns.TurnCommitted] = []  # manual_turns: speech not committed yet
        self.held_dropped_s = 0.0  # manual_turns: held speech dropped beyond MAX_HELD_S
        # The tools shown to the model (this session's own registry), and whether their calls
        # end the response instead of being run here (an owner with its own tool runtime,
        # livekit-agents, adds the results to `conversation` and calls `reply()`).
        self.tools = deps.tools
        self.defer_tool_calls = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._lock = asyncio.Lock()  # audio is processed in order, one push at a time
        self.closed = False
        self.last_activity = time.monotonic()
        # Speech out (None: text only, everything as without TTS).
        self.voice: Voice | None = None
        if deps.tts is not None and voice_output in ("live", "offline"):
            self.voice = Voice(deps.tts, self.emit, realtime=voice_output == "live",
                               counters=deps.voice_counters, playout_margin_s=s.turns.echo_playout_s)
        self._pos = 0  # samples the detector has seen
        # Speech that began while the agent was answering: pause, then backchannel, barge-in or echo.
        self._overlap = BargeIn(s.turns.to_bargein_config(), self.voice, self.emit)
        self._heard: str | None = None  # what the user heard of an answer cut by a barge-in
        # Preemptive answers (agent/preempt.py) and the stamps of each turn's stages.
        self._preempt = Preemption(s.turns.preempt_after_s, s.turns.preemptive)
        self._held_answer: Held | None = None
        self._stamps = TurnStamps()  # the turn in progress
        self._answer_stamps: tuple[str, TurnStamps] | None = None  # the answer being given
        self._verdict: PendingVerdict | None = None  # the end-of-turn model on this silence

    # ---- events -------------------------------------------------------------------
    def emit(self, event: ev._Event) -> None:
        held = self._held_answer
        if held is not None and not isinstance(event, ev.TurnCommitted) and held.hold(event):
            return  # a preemptive answer's: published when its turn commits, never if dropped
        if self._answer_stamps is not None and getattr(event, "turn_id", None) == self._answer_stamps[0]:
            self._answer_stamps[1].observe(event, self.voice.stage_stats if self.voice is not None else None)
        self.deps.publish(self._stamper.stamp(event))  # type: ignore[arg-type]

    def start(self) -> None:
        b = self.backend
        self.emit(ev.SessionStarted(model=b.model_name, warning=b.warning))
        self._spawn(self._run_hook("on_session_started"), "started")

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"session-{name}-{self.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run_hook(self, name: str, *args: Any) -> Any:
        """A failing hook is this session's error event, never its end."""
        try:
            return await _call(getattr(self.hooks, name)(self.context, *args))
        except Exception as exc:
            log.exception("session %s: hook failed", self.id)
            self.emit(ev.Error(code="hook_failed", message=f"{type(exc).__name__}: {exc}"))
            return None

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
            probs = await self._vad.process(samples)
            self._pending.append(samples)
            if not probs.size:
                return
            buf = np.concatenate(self._pending)
            used = probs.size * CHUNK
            self._pending = [buf[used:]]
            for i, p in enumerate(probs):
                chunk = buf[i * CHUNK : (i + 1) * CHUNK]
                self._pos += CHUNK
                if p >= self._detector.config.neg_threshold:
                    self._stamps.speech_end = time.monotonic()
                det = self._detector
                if (verdict := self._verdict) is not None and verdict.needed(
                        det.silence_s, CHUNK / turns.SAMPLE_RATE, det.config.min_silence_s_complete):
                    self._verdict = None
                    det.set_verdict(verdict.t, await verdict.result())  # stale: ignored
                for signal in self._detector.feed(chunk, float(p)):
                    await self._on_signal(signal)
                if (start := self._preempt.tick(self._pos / turns.SAMPLE_RATE)) is not None:
                    await self._preempted(start)
                if self._overlap.voice is not None:
                    await self._check_overlap(chunk, float(p))

    async def finish(self) -> None:
        """End of input: a turn in progress commits; wait for its response."""
        await self.commit()
        await self.wait_idle()

    async def wait_idle(self) -> None:
        if self._response is not None:
            await asyncio.shield(self._response)
        if self.voice is not None and not self.voice.realtime:
            await self.voice.wait_idle()  # offline speech is rendered at once: wait for it

    # ---- speech out: barge-in, backchannels, self-echo ---------------------------------
    def _agent_busy(self) -> bool:
        running = self._response is not None and not self._response.done()
        voice = self._overlap.voice  # ours, or the owner's (attach_voice)
        held = self.voice is not None and self.voice.held  # a preemptive answer nobody hears yet
        return running or (voice is not None and voice.active and not held)

    async def _check_overlap(self, chunk: np.ndarray, prob: float) -> None:
        """Speech over the agent's answer pauses its voice, then resumes it (a backchannel) or
        interrupts it (agent/speech/bargein.py); the agent's own voice coming back does neither."""
        if self._overlap.step(chunk, prob, self._pos / turns.SAMPLE_RATE, self._agent_busy()):
            await self._interrupt("barge_in")

    def attach_voice(self, voice: Playout) -> None:
        """The agent's voice is played by the owner (livekit-agents): speech over it is paused,
        judged and cancelled through `voice` as over our own (agent/speech/bargein.py)."""
        self._overlap = BargeIn(self.settings.turns.to_bargein_config(), voice, self.emit)

    async def _interrupt(self, reason: str) -> None:
        """Stop the answer (text and voice); the history keeps only what was heard."""
        assert self._overlap.voice is not None
        report = self._overlap.voice.interrupt()
        heard = report.spoken_text if report is not None else ""
        if self._response is not None and not self._response.done():
            self._heard = heard  # _respond reports it and truncates the history
            self._response.cancel(reason)
            await asyncio.gather(self._response, return_exceptions=True)
        elif report is not None:  # the text was complete, its speech was not
            self.emit(ev.ResponseCancelled(turn_id=report.turn_id or "", reason=reason, spoken_text=heard))
            self.conversation.truncate_last_answer(heard)

    async def _on_signal(self, signal: turns.Signal) -> None:
        backend = self.backend
        if isinstance(signal, turns.SpeechStarted):
            self.emit(ev.SpeechStarted(t=signal.t))
            if self.manual_turns:
                return  # the owner decides about barge-in
            if self._overlap.voice is not None:
                self._overlap.speech_started(signal.t, self._agent_busy())
            elif self._response is not None and not self._response.done():
                self._response.cancel("barge_in")  # the user talks over the answer
        elif isinstance(signal, turns.SpeechStopped):
            self.emit(ev.SpeechStopped(t=signal.t))
            self._overlap.speech_paused(signal.t)
        elif isinstance(signal, turns.SilenceBegan):
            self._overlap.speech_paused(signal.t)
            self._stamps.end_detected = time.monotonic()
            await self._preempted(self._preempt.on_signal(signal, self._may_preempt()))
            if self._eot is not None:  # the model's verdict decides how long this silence must last
                self._verdict = PendingVerdict(signal.t, self._spawn(self._eot.predict(signal.audio), "eot"))
            if self.manual_turns:
                return  # the committed turn will join held parts: no prefill can match it
            turn_id = self._new_turn_id()
            self._speculative = (turn_id, signal.t)
            try:
                self.conversation.add_user(signal.audio, self._take_instruction(peek=True))
            except ValueError:
                return  # the commit reports it
            request = self.conversation.request(self.id, turn_id, self.max_new_tokens, self._tools_block())
            self.conversation.pop_last_user()
            request.speculative = True
            await self._guard(backend.prefill(request))
        elif isinstance(signal, turns.SpeechResumed):
            self._overlap.speech_resumed()
            await self._preempted(self._preempt.on_signal(signal))
            await self._drop_speculative()
        elif isinstance(signal, turns.TurnCommitted):
            self._stamps.commit = time.monotonic()
            await self._preempted(self._preempt.on_signal(signal))
            ignored, cancel = self._overlap.turn_committed(signal.audio, signal.split, self._pos / turns.SAMPLE_RATE)
            if cancel:
                await self._interrupt("barge_in")
            if ignored is not None:
                # A backchannel ("mm-hm") or our own voice: the agent goes on speaking and
                # this is no user turn (bargein.py reports it).
                await self._preempted(Discard())
                await self._drop_speculative()
                return
            if self.manual_turns:
                self._hold(signal)
            else:
                await self._commit(signal)

    async def commit(self) -> bool:
        """End the user's turn now (the owner's turn detection, push-to-talk): speech in
        progress is cut; with `manual_turns` everything held becomes one user turn, answered
        only by `reply()`. Returns whether a turn was committed."""
        async with self._lock:
            flushed = self._detector.flush()
            for signal in flushed:
                await self._on_signal(signal)
            if not self.manual_turns:
                return any(isinstance(s, turns.TurnCommitted) for s in flushed)
            held, self._held = self._held, []
            if not held:
                return False
            audio = np.concatenate([t.audio for t in held])
            await self._commit(turns.TurnCommitted(held[0].start, held[-1].end, audio), respond=False)
            return True

    def _hold(self, turn: turns.TurnCommitted) -> None:
        """Keep speech for the owner's commit(), bounded: the oldest goes first (logged)."""
        self._held.append(turn)
        held_s = sum(t.audio.size for t in self._held) / turns.SAMPLE_RATE
        while held_s > MAX_HELD_S and len(self._held) > 1:
            dropped = self._held.pop(0).audio.size / turns.SAMPLE_RATE
            held_s -= dropped
            self.held_dropped_s += dropped
            log.warning("session %s: %.1f s of uncommitted speech dropped (more than %.0f s held)",
                        self.id, dropped, MAX_HELD_S)

    async def clear(self) -> None:
        """Forget the user's speech not committed yet (held, and the turn in progress)."""
        async with self._lock:
            self._held = []
            for signal in self._detector.flush():
                if not isinstance(signal, turns.TurnCommitted):
                    await self._on_signal(signal)  # speech.stopped; the turn itself is dropped
            await self._preempted(self._preempt.cancel())
            await self._drop_speculative()

    async def reply(self, instructions: str | None = None, *, tools: bool = True) -> str:
        """Answer now rather than on a committed turn: the pending user turn (audio, typed)
        or tool results; with nothing pending, `instructions` become a typed user turn.
        `instructions` join the system prompt of this response only; `tools=False`: no tool
        is offered and nothing the model writes runs (a transcription). Returns its turn_id;
        raises ValueError when there is nothing to answer."""
        await self._preempted(self._preempt.cancel())  # the agent speaks first: no held answer
        await self._stop_response("superseded")
        if not self.conversation.awaiting_reply:
            if not instructions:
                raise ValueError("nothing to answer: no user turn or tool results pending")
            self.conversation.add_user_text(instructions)
            instructions = None
        turn_id = self._new_turn_id()
        self._response = asyncio.create_task(self._respond(turn_id, time.monotonic(), instructions, tools=tools))
        return turn_id

    async def _stop_response(self, reason: str) -> None:
        if self._response is asyncio.current_task():
            return  # a hook or tool of this response (e.g. ctx.say) does not stop it
        if self._response is not None and not self._response.done():
            # Wait for it to stop so its partial answer lands in the history first.
            self._response.cancel(reason)
            await asyncio.gather(self._response, return_exceptions=True)

    async def _commit(self, turn: turns.TurnCommitted, respond: bool = True) -> None:
        spec = self._speculative
        if spec is not None and spec[1] == turn.end and not turn.split:
            turn_id = spec[0]  # the speculative prefill is exactly this turn: reuse it
            self._speculative = None
        else:
            await self._drop_speculative()
            turn_id = self._new_turn_id()
        await self._stop_response("superseded")
        committed_at = time.monotonic()
        stamps, self._stamps = self._stamps, TurnStamps()
        stamps.commit = stamps.commit or committed_at
        self._answer_stamps = (turn_id, stamps)
        user = UserTurn(turn_id, turn.audio, turn.start, turn.end, self._take_instruction())
        direct = await self._run_hook("on_user_turn", user)
        instruction = user.instruction or None
        held = self._held_answer
        if held is not None and (held.turn_id != turn_id or user.skipped or isinstance(direct, str) or not respond
                                 or held.instruction != instruction or held.failed):
            await self._preempted(Discard())  # the hook changed the turn: the held answer is not its answer
            held = None
        if user.skipped:
            await self._guard(self.backend.drop(self.id, turn_id))
            return
        try:
            self.conversation.add_user(turn.audio, instruction)
        except ValueError as exc:  # e.g. an oversized instruction: this turn fails, the session goes on
            await self._preempted(Discard())
            self.emit(ev.Error(code="bad_request", message=str(exc), turn_id=turn_id))
            return
        self.emit(ev.TurnCommitted(turn_id=turn_id, start=turn.start, end=turn.end,
                                   mode="analysis" if instruction else "chat", instruction=instruction))
        if isinstance(direct, str):  # the agent answered it itself: no model
            await self._guard(self.backend.drop(self.id, turn_id))
            self._answer_directly(turn_id, direct)
            return
        if not respond:
            return
        if held is not None:
            self._response = await self._promote(held)
        else:
            self._response = asyncio.create_task(self._respond(turn_id, committed_at))
        if self._wait:
            await self.wait_idle()

    def _answer_directly(self, turn_id: str, text: str) -> None:
        self.emit(ev.ResponseStarted(turn_id=turn_id))
        if self.voice is not None:
            self.voice.begin(turn_id)
            self.voice.say(text)
            self.voice.end()
        if text:
            self.emit(ev.ResponseDelta(turn_id=turn_id, text=text))
        self.conversation.add_assistant(text)
        self.emit(ev.ResponseDone(turn_id=turn_id, text=text, tokens=0, timings={"total": 0.0}))
        self._spawn(self._run_hook("on_response", text), "on-response")

    async def say(self, text: str) -> str:
        """Speak `text` as the agent now (a hook, a tool, a greeting): events and history as if
        the model had said it; the running response, if any, is superseded. Its turn_id."""
        await self._preempted(self._preempt.cancel())  # the agent speaks first: no held answer
        await self._stop_response("superseded")
        turn_id = self._new_turn_id()
        self._answer_directly(turn_id, text)
        return turn_id

    def _take_instruction(self, peek: bool = False) -> str | None:
        text = self._next_instruction or self._instruction
        if not peek:
            self._next_instruction = None
        return text

    def _new_turn_id(self) -> str:
        self._turn_n += 1
        return self._last_turn_id()

    def _last_turn_id(self) -> str:
        return f"{self.id}-t{self._turn_n}"

    async def _drop_speculative(self) -> None:
        """Discard the speculative prefill; its number goes to the next turn, so the turn ids
        users see count 1, 2, 3 (the backend has dropped it before that id is used again)."""
        spec, self._speculative = self._speculative, None
        if spec is None:
            return
        await self._guard(self.backend.drop(self.id, spec[0]))
        if spec[0] == self._last_turn_id():
            self._turn_n -= 1

    # ---- preemptive answers and end of turn ------------------------------------------
    def _may_preempt(self) -> bool:
        """Not while the agent speaks (overlap rules), nor for turns the owner ends, nor for
        files fed faster than real time (nothing to gain), nor with offline speech."""
        offline_voice = self.voice is not None and not self.voice.realtime
        return not (self.manual_turns or self._wait or offline_voice or self._agent_busy() or self.closed)

    async def _preempted(self, action: Start | Promote | Discard | None) -> None:
        """Carry out what `Preemption` decided (Promote is done by `_commit`)."""
        if isinstance(action, Start):
            spec = self._speculative  # the turn id the speculative prefill took
            if spec is None or spec[1] != action.end or self._held_answer is not None:
                return
            request = self._preempt_request(spec[0], action.audio)
            if request is None:
                return
            new = self._held_answer = Held(spec[0], self._take_instruction(peek=True))
            new.task = asyncio.create_task(self._respond(spec[0], 0.0, held=new, request=request))
        elif isinstance(action, Discard) and (old := self._held_answer) is not None:
            if old.task is not None:
                old.task.cancel("preempt_discarded")
                await asyncio.gather(old.task, return_exceptions=True)
            await self._guard(self.backend.drop(self.id, old.turn_id))
            self._held_answer = None  # after the task ended: its last events are held (dropped) too

    def _preempt_request(self, turn_id: str, audio: np.ndarray) -> GenerationRequest | None:
        try:
            self.conversation.add_user(audio, self._take_instruction(peek=True))
        except ValueError:
            return None  # the commit reports it
        request = self.conversation.request(self.id, turn_id, self.max_new_tokens, self._tools_block())
        self.conversation.pop_last_user()
        request.preemptive = True
        return request

    async def _promote(self, held: Held) -> asyncio.Task[None] | None:
        """The turn committed as preempted: lift its priority, publish what it held, play it."""
        self._held_answer = None
        await self._guard(self.backend.promote(self.id, held.turn_id))
        for event in held.release():
            self.emit(event)
        if self.voice is not None:
            self.voice.release()
        return held.task

    def _tools_block(self) -> str | None:
        return self.tools.system_block() if len(self.tools) else None

    async def _guard(self, coro: object) -> None:
        """Speculative work is an optimisation: its failure must not affect the turn."""
        try:
            await coro  # type: ignore[misc]
        except Exception as exc:
            log.debug("speculative step failed: %s", exc)

    # ---- responses ----------------------------------------------------------------
    async def _respond(self, turn_id: str, committed_at: float, instructions: str | None = None,
                       held: Held | None = None, request: GenerationRequest | None = None, tools: bool = True) -> None:
        """Generate the answer; run tool calls and give the model follow-up rounds.
        `held`: a preemptive answer (to `request`), whose events and voice are held until
        its turn commits; it waits for that before anything irreversible (history, tools).
        `tools=False`: no tool is offered and nothing the model writes runs (a transcription)."""
        settings = self.settings
        self.emit(ev.ResponseStarted(turn_id=turn_id))
        if self.voice is not None:
            self.voice.begin(turn_id, held=held is not None)
        said: list[str] = []  # text the user was shown, across rounds
        stats = GenerationStats()
        first_token: float | None = None
        try:
            for round_n in range(settings.max_tool_rounds + 1):
                raw: list[str] = []
                calls: list[ParsedToolCall] = []
                parser = ToolCallParser(calls=tools)
                if request is None or round_n > 0:
                    request = self.conversation.request(self.id, turn_id, self.max_new_tokens,
                                                        self._tools_block() if tools else None, instructions)
                round_stats = GenerationStats()
                try:
                    # aclosing: a cancelled turn closes the stream, which frees the slot.
                    async with aclosing(self.backend.generate(request, round_stats)) as stream:
                        async for delta in stream:
                            if first_token is None:
                                first_token = time.monotonic()
                            raw.append(delta)
                            calls += self._show(turn_id, parser.feed(delta), said)
                    calls += self._show(turn_id, parser.flush(), said)
                    if held is not None:
                        if not calls and self.voice is not None:
                            self.voice.end()  # the last round: its last clause is spoken now, held
                        await held.opened()
                finally:
                    stats.tokens += round_stats.tokens
                    stats.reused_tokens += round_stats.reused_tokens
                    if raw and (held is None or held.committed):
                        self.conversation.add_assistant("".join(raw))
                if not calls or round_n == settings.max_tool_rounds or self.defer_tool_calls:
                    break
                outcomes = await self.tools.execute(calls, settings.tool_timeout_s, self.context)
                outcomes = [await self._tool_result(call, outcome) for call, outcome in zip(calls, outcomes, strict=True)]
                for outcome in outcomes:
                    self.emit(ev.ToolResult(call_id=outcome.call_id, ok=outcome.ok,
                                            result=outcome.result, error=outcome.error))
                self.conversation.add_tool_results(format_tool_responses(outcomes))
        except asyncio.CancelledError as exc:
            if held is not None and not held.committed:  # speech resumed: it never was
                if self.voice is not None:
                    self.voice.discard()
                return
            reason = exc.args[0] if exc.args else "cancelled"
            heard: str | None = None
            if self.voice is not None:
                heard, self._heard = self._heard, None
                if heard is None:  # not a barge-in (superseded, client, close): the voice stops too
                    report = self.voice.interrupt()
                    heard = report.spoken_text if report is not None else ""
                self.conversation.truncate_last_answer(heard)  # keep only what the user heard
            self.emit(ev.ResponseCancelled(turn_id=turn_id, reason=str(reason), spoken_text=heard))
            return
        except InferenceError as exc:
            self.emit(ev.Error(code=exc.code, message=exc.message, turn_id=turn_id))
            if said:  # cut mid-answer (a stream closed, a worker died): the text shown ends the turn,
                # as after a barge-in; `done` would pass a cut answer off as whole (history keeps it)
                self.emit(ev.ResponseCancelled(turn_id=turn_id, reason="backend_error", spoken_text="".join(said)))
            return
        except Exception as exc:  # a bug in one turn must not end the session
            log.exception("response failed")
            self.emit(ev.Error(code="internal", message=str(exc), turn_id=turn_id))
            return
        finally:
            if self.voice is not None:
                self.voice.end()  # the text is complete (or cut): the voice says what it has
        done = time.monotonic()
        if held is not None:
            committed_at = held.committed_at
        timings = {"total": done - committed_at, **stats.timings}
        if first_token is not None:
            timings["first_token"] = max(first_token - committed_at, 0.0)
        text = "".join(said)
        self.emit(ev.ResponseDone(turn_id=turn_id, text=text, tokens=stats.tokens, timings=timings))
        self._spawn(self._run_hook("on_response", text), "on-response")

    async def _tool_result(self, call: ParsedToolCall, outcome: ToolOutcome) -> ToolOutcome:
        replaced = await self._run_hook("on_tool_result", call, outcome)
        return replaced if isinstance(replaced, ToolOutcome) else outcome

    def _show(self, turn_id: str, pieces: list[TextPiece | ParsedToolCall], said: list[str]) -> list[ParsedToolCall]:
        """Text goes to the user as deltas; tool calls are announced and collected."""
        calls = []
        for piece in pieces:
            if isinstance(piece, ParsedToolCall):
                calls.append(piece)
                self.emit(ev.ToolCall(turn_id=turn_id, call_id=piece.call_id, name=piece.name or "",
                                      arguments=piece.arguments or {}))
            elif piece.text:
                said.append(piece.text)
                self.emit(ev.ResponseDelta(turn_id=turn_id, text=piece.text))
                if self.voice is not None:
                    self.voice.say(piece.text)
        return calls

    # ---- commands -----------------------------------------------------------------
    async def handle(self, command: ev.Command) -> None:
        self.last_activity = time.monotonic()
        if isinstance(command, ev.InstructionSet):
            self._next_instruction = command.text or None
        elif isinstance(command, ev.ResponseCancel):
            if self.voice is not None and self._agent_busy():
                await self._interrupt("client")  # the text, or only its speech still playing
            elif self._response is not None and not self._response.done():
                self._response.cancel("client")
        elif isinstance(command, ev.SessionUpdate):
            try:  # instruction.set's rule (half the context); refused, nothing of the update applies
                if command.system_prompt:
                    self.conversation.check_text(command.system_prompt, "system prompt")
            except ValueError as exc:
                self.report_error("bad_request", str(exc))
                return
            if command.system_prompt is not None:
                self.conversation.system_prompt = command.system_prompt or None
            if command.max_new_tokens is not None:
                self.max_new_tokens = command.max_new_tokens
            if command.min_silence_s is not None:
                try:  # it must stay within [min_silence_s_complete, max_silence_s]
                    self._detector.reconfigure(min_silence_s=command.min_silence_s)
                except ValueError as exc:
                    self.report_error("bad_request", str(exc))
        elif isinstance(command, ev.SessionClose):
            await self.close("client")
        elif isinstance(command, ev.Feedback):
            await self._feedback(command)

    async def _feedback(self, command: ev.Feedback) -> None:
        """A rating of one of this session's answers: an event (recorded with `--record`), then the hook."""
        n = command.turn_id.removeprefix(f"{self.id}-t")
        if n == command.turn_id or not n.isdigit() or not 0 < int(n) <= self._turn_n:
            self.report_error("bad_command", f"feedback: no turn {command.turn_id!r} in this session")
            return
        self.emit(ev.FeedbackReceived(turn_id=command.turn_id, rating=command.rating, correction=command.correction))
        await self._run_hook("on_feedback", command)

    def report_error(self, code: str, message: str) -> None:
        self.emit(ev.Error(code=code, message=message))

    async def close(self, reason: str = "closed") -> None:
        if self.closed:
            return
        self.closed = True
        await self._preempted(self._preempt.cancel())
        if self._response is not None and not self._response.done():
            self._response.cancel("session_closed")
            await asyncio.gather(self._response, return_exceptions=True)
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.voice is not None:
            await self.voice.close()
        self._vad.close()
        await self._run_hook("on_session_ended", reason)
        try:
            await self.backend.forget(self.id)
        except Exception as exc:
            log.debug("forget failed: %s", exc)
        self.emit(ev.SessionEnded(reason=reason))
        self.deps.on_closed(self)
