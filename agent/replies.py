"""A session's replies, run: each `Reply` (agent/reply.py) with its generation task, its
backend calls and its voice.

The session routes signals here and keeps the conversation; this adapter does what the
reply's state machine decides and nothing else. At most two replies are alive at once:

- `pending`: the answer to a turn that may have ended (speculative: prefilled; preemptive:
  generated and spoken, every event kept back), dropped without a trace if the turn goes on;
- `current`: the committed answer being given (or given last: its voice may still play).

Every task it makes is a reply's, reachable from `pending` or `current`, and `close()` ends
them; after `close()` nothing starts and no call reaches the backend (the session forgets
the conversation there next).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from agent import events as ev
from agent.commands import HookRunner
from agent.config import Settings
from agent.context import RunContext
from agent.conversation import Conversation
from agent.inference.base import Backend, GenerationRequest, GenerationStats, InferenceError
from agent.reply import Reply, Stage, TurnIds, TurnStamps
from agent.speech.playback import PlaybackReport
from agent.speech.voice import Voice
from agent.tools import ParsedToolCall, TextPiece, ToolCallParser, ToolOutcome, ToolRegistry, format_tool_responses

log = logging.getLogger(__name__)


class ReplyOwner(Protocol):
    """What replies need of their session (read at each use: tools and limits change)."""

    id: str
    settings: Settings
    backend: Backend
    conversation: Conversation
    tools: ToolRegistry
    defer_tool_calls: bool
    voice: Voice | None
    context: RunContext
    turn_ids: TurnIds
    hook_runner: HookRunner  # the agent's hooks, and tasks the session's close ends

    @property
    def max_new_tokens(self) -> int: ...

    def emit(self, event: ev._Event) -> None: ...



@dataclass(eq=False)
class _Run:
    """A reply and what runs it: its task, and the gate a preemptive answer waits at before
    anything irreversible (history, tool calls), opened when its turn commits."""

    reply: Reply
    task: asyncio.Task[None] | None = None
    gate: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()


class Replies:
    def __init__(self, owner: ReplyOwner) -> None:
        self.owner = owner
        self.pending: _Run | None = None
        self.current: _Run | None = None
        self.closed = False
        self._backend_open = True  # until the close forgets the conversation
        self._tasks: set[asyncio.Task[None]] = set()  # every reply's task until it ends (a close ends them)

    # ---- events ------------------------------------------------------------------
    def route(self, event: ev._Event) -> bool:
        """An event on its way out: whether it goes out now (a preemptive answer's are kept);
        the reply it belongs to stamps it and follows its voice."""
        turn_id = getattr(event, "turn_id", None)
        for run in (self.pending, self.current):
            if run is not None and turn_id is not None and run.reply.turn_id == turn_id:
                if not run.reply.admit(event):
                    return False
                voice = self.owner.voice
                run.reply.observe(event, time.monotonic(), voice.stage_stats if voice is not None else None)
                break
        return True

    @property
    def busy(self) -> bool:
        """The committed answer's text is still being made."""
        return self.current is not None and self.current.running

    async def wait_idle(self) -> None:
        run = self.current
        if run is not None and run.task is not None:
            await asyncio.shield(run.task)

    # ---- a turn that may have ended --------------------------------------------------
    async def speculate(self, turn_id: str, end: float, audio: np.ndarray, instruction: str | None) -> None:
        """Silence began at `end`: a reply to the turn `audio` would be, its prompt prefilled."""
        if self.closed:
            return
        self.pending = _Run(Reply(turn_id, end))
        if (request := self._request(turn_id, audio, instruction)) is not None:
            request.speculative = True
            await self._backend(lambda b: b.prefill(request))

    def preempt(self, end: float, audio: np.ndarray, instruction: str | None) -> None:
        """Silence lasted long enough: the speculative reply to the turn ending at `end`
        generates its answer now, kept back until its turn commits."""
        run = self.pending
        if self.closed or run is None or run.reply.end != end or run.reply.stage is not Stage.SPECULATIVE:
            return
        if (request := self._request(run.reply.turn_id, audio, instruction)) is not None:
            run.reply.preempt(instruction)
            request.preemptive = True
            self._start(run, request)

    def _request(self, turn_id: str, audio: np.ndarray, instruction: str | None) -> GenerationRequest | None:
        """The request the turn ending now would make (None: it cannot be asked; the commit says why)."""
        owner, conversation = self.owner, self.owner.conversation
        try:
            conversation.add_user(audio, instruction)
        except ValueError:
            return None
        request = conversation.request(owner.id, turn_id, owner.max_new_tokens, self.tools_block())
        conversation.pop_last_user()
        return request

    def matching(self, end: float, split: bool) -> Reply | None:
        """The pending reply, if the turn that committed (ending at `end`) is its turn."""
        run = self.pending
        return run.reply if run is not None and run.reply.end == end and not split else None

    async def drop(self) -> Reply | None:
        """The pending reply's turn never came: its answer stops unseen, its prefill is freed."""
        run = self.pending
        if run is None:
            return None
        await self._stop(run, "preempt_discarded")
        run.reply.drop()
        self.pending = None  # after its task ended: its last events were kept, then dropped
        await self._backend(lambda b: b.drop(self.owner.id, run.reply.turn_id))
        return run.reply

    async def drop_pending(self) -> None:
        """Drop the reply to a turn that did not end; its number goes to the next turn, so the
        turn ids users see count 1, 2, 3 (the backend has dropped it before that id is used again)."""
        if (dropped := await self.drop()) is not None:
            self.owner.turn_ids.give_back(dropped.turn_id)

    async def discard(self, turn_id: str) -> None:
        """A committed turn gets no answer from the model (skipped, answered by a hook): its
        prefill is freed."""
        if self.pending is not None and self.pending.reply.turn_id == turn_id:
            await self.drop()
        else:
            await self._backend(lambda b: b.drop(self.owner.id, turn_id))

    async def withdraw(self) -> None:
        """The pending reply's preemptive answer is not wanted (the turn changed, the agent
        speaks first): it stops unseen; the reply stays, speculative."""
        run = self.pending
        if run is None or not run.reply.preemptive:
            return
        await self._stop(run, "preempt_discarded")
        run.reply.withdraw()
        run.task, run.gate = None, asyncio.Event()
        await self._backend(lambda b: b.drop(self.owner.id, run.reply.turn_id))

    # ---- answers the owner asks for (Session.reply, Session.say) ------------------------
    async def reply(self, instructions: str | None, tools: bool) -> str:
        """Answer the pending user turn or tool results, else `instructions` as a typed turn."""
        await self._speak_first()
        conversation = self.owner.conversation
        if not conversation.awaiting_reply:
            if not instructions:
                raise ValueError("nothing to answer: no user turn or tool results pending")
            conversation.add_user_text(instructions)
            instructions = None
        turn_id = self.owner.turn_ids.next()
        self.answer(Reply.committed(turn_id, time.monotonic()), instructions, tools=tools)
        return turn_id

    async def say(self, text: str) -> str:
        """Speak `text` as the agent's answer now."""
        await self._speak_first()
        turn_id = self.owner.turn_ids.next()
        self.answer_directly(Reply.committed(turn_id, time.monotonic()), text)
        return turn_id

    async def _speak_first(self) -> None:
        """The agent speaks first: no preemptive answer, the running one is superseded."""
        await self.withdraw()
        await self.stop("superseded")

    # ---- committed answers -------------------------------------------------------------
    async def give(self, reply: Reply | None, turn_id: str, committed_at: float, stamps: TurnStamps) -> None:
        """Answer the turn that committed: its preemptive answer goes out, or one is made now."""
        if reply is not None and reply.preemptive:
            await self.promote(reply, stamps)
            return
        if reply is None:
            reply = Reply.committed(turn_id, committed_at, stamps)
        else:
            reply.commit(committed_at, stamps)
        self.answer(reply)

    async def promote(self, reply: Reply, stamps: TurnStamps) -> None:
        """The pending reply's turn committed as preempted: publish what it kept, play it."""
        run = self.pending
        if self.closed or run is None or run.reply is not reply:
            return
        self.pending, self.current = None, run
        await self._backend(lambda b: b.promote(self.owner.id, reply.turn_id))
        if self.closed:
            return  # the close stopped it unseen
        withheld = reply.withheld
        for event in reply.promote(time.monotonic(), stamps):
            self.owner.emit(event)
        voice = self.owner.voice
        if withheld and voice is not None and voice.turn_id == reply.turn_id:
            voice.release()
        run.gate.set()

    def answer(self, reply: Reply, instructions: str | None = None, tools: bool = True) -> None:
        """Give the committed `reply` (the pending one, committed, or a new one) its answer."""
        if self.closed:
            return
        run = self.pending if self.pending is not None and self.pending.reply is reply else _Run(reply)
        if run is self.pending:
            self.pending = None
        self.current = run
        run.gate.set()
        self._start(run, instructions=instructions, tools=tools)

    def answer_directly(self, reply: Reply, text: str) -> None:
        """The agent's own words (a hook's answer, `say`): events and history as from the model."""
        if self.closed:
            return
        owner, turn_id = self.owner, reply.turn_id
        if not (self.current is not None and self.current.task is asyncio.current_task()):
            self.current = _Run(reply)  # (said by a hook or tool of the running answer: that one stays current)
        owner.emit(ev.ResponseStarted(turn_id=turn_id))
        if owner.voice is not None:
            owner.voice.begin(turn_id, withheld=reply.begin_voice())
            owner.voice.say(text)
            owner.voice.end()
        if text:
            owner.emit(ev.ResponseDelta(turn_id=turn_id, text=text))
        owner.conversation.add_assistant(text)
        owner.emit(ev.ResponseDone(turn_id=turn_id, text=text, tokens=0, timings={"total": 0.0}))
        reply.finish()
        owner.hook_runner.spawn(owner.hook_runner.run("on_response", text), "on-response")

    async def stop(self, reason: str) -> None:
        """Stop the committed answer and wait for it (its partial answer lands in the history
        first); one stopping itself (a hook or tool of it, e.g. `ctx.say`) goes on."""
        run = self.current
        if run is not None and run.task is not asyncio.current_task():
            await self._stop(run, reason)

    def cancel(self, reason: str) -> None:
        """Cancel the committed answer without waiting (the client's `response.cancel`)."""
        if self.current is not None and self.current.running:
            assert self.current.task is not None
            self.current.reply.cancel(reason)
            self.current.task.cancel(reason)

    async def interrupt(self, reason: str, report: PlaybackReport | None) -> None:
        """Its voice was cut (`report`: what was heard): the answer stops, the history keeps only that."""
        heard = report.spoken_text if report is not None else ""
        run = self.current
        if run is not None and run.running:
            run.reply.heard = heard  # the answer reports it and truncates the history
            await self._stop(run, reason)
        elif report is not None:  # the text was complete, its speech was not
            self.owner.emit(ev.ResponseCancelled(turn_id=report.turn_id or "", reason=reason, spoken_text=heard))
            self.owner.conversation.truncate_last_answer(heard)

    async def close(self) -> None:
        """Stop every reply; nothing starts after this and no call reaches the backend."""
        self.closed = True
        await self.drop()
        if self.current is not None:
            await self._stop(self.current, "session_closed")
        others = [t for t in self._tasks if t is not asyncio.current_task()]  # superseded from within themselves
        for task in others:
            task.cancel("session_closed")
        await asyncio.gather(*others, return_exceptions=True)
        self._backend_open = False

    # ---- internals ---------------------------------------------------------------------
    async def _stop(self, run: _Run, reason: str) -> None:
        """Cancel its task and wait for it to end (never the running task itself: a hook or tool
        of the answer that closes the session lets the answer end on its own)."""
        if run.task is not None and not run.task.done() and run.task is not asyncio.current_task():
            run.reply.cancel(reason)
            run.task.cancel(reason)
            await asyncio.gather(run.task, return_exceptions=True)

    def tools_block(self) -> str | None:
        """The tools' declaration the model sees (in its family's syntax); None without tools."""
        tools = self.owner.tools
        return tools.system_block(self.owner.conversation.family.tool_syntax) if len(tools) else None

    async def _backend(self, call: Callable[[Backend], Awaitable[None]]) -> None:
        """Speculative work is an optimisation: its failure must not affect the turn."""
        if not self._backend_open:
            return
        try:
            await call(self.owner.backend)
        except Exception as exc:
            log.debug("speculative step failed: %s", exc)

    def _start(self, run: _Run, request: GenerationRequest | None = None, instructions: str | None = None,
               tools: bool = True) -> None:
        turn_id = run.reply.turn_id
        run.task = task = asyncio.create_task(self._generate(run, request, instructions, tools),
                                              name=f"reply-{self.owner.id}-{turn_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _generate(self, run: _Run, request: GenerationRequest | None, instructions: str | None,
                        tools: bool) -> None:
        """Generate the answer; run tool calls and give the model follow-up rounds. A preemptive
        answer waits at its gate, once generated, before anything irreversible (history, tools).
        `tools=False`: no tool is offered and nothing the model writes runs (a transcription)."""
        owner, reply = self.owner, run.reply
        turn_id, settings, voice = reply.turn_id, owner.settings, owner.voice
        owner.emit(ev.ResponseStarted(turn_id=turn_id))
        if voice is not None:  # withheld only while it is preemptive: a commit may have come first
            voice.begin(turn_id, withheld=reply.begin_voice())
        said: list[str] = []  # text the user was shown, across rounds
        stats = GenerationStats()
        first_token: float | None = None
        try:
            for round_n in range(settings.max_tool_rounds + 1):
                raw: list[str] = []
                calls: list[ParsedToolCall] = []
                parser = ToolCallParser(calls=tools, syntax=owner.conversation.family.tool_syntax)
                if request is None or round_n > 0:
                    request = owner.conversation.request(owner.id, turn_id, owner.max_new_tokens,
                                                         self.tools_block() if tools else None, instructions)
                round_stats = GenerationStats()
                try:
                    # aclosing: a cancelled turn closes the stream, which frees the slot.
                    async with aclosing(owner.backend.generate(request, round_stats)) as stream:
                        async for delta in stream:
                            if first_token is None:
                                first_token = time.monotonic()
                            raw.append(delta)
                            calls += self._show(turn_id, parser.feed(delta), said)
                    calls += self._show(turn_id, parser.flush(), said)
                    if not reply.writes_history:
                        if not calls and voice is not None:
                            voice.end()  # the last round: its last clause is spoken now, withheld
                        await run.gate.wait()
                finally:
                    stats.tokens += round_stats.tokens
                    stats.reused_tokens += round_stats.reused_tokens
                    if raw and reply.writes_history:
                        owner.conversation.add_assistant("".join(raw))
                if not calls or round_n == settings.max_tool_rounds or owner.defer_tool_calls:
                    break
                outcomes = await owner.tools.execute(calls, settings.tool_timeout_s, owner.context)
                outcomes = [await self._tool_result(call, outcome) for call, outcome in zip(calls, outcomes, strict=True)]
                for outcome in outcomes:
                    owner.emit(ev.ToolResult(call_id=outcome.call_id, ok=outcome.ok,
                                             result=outcome.result, error=outcome.error))
                owner.conversation.add_tool_results(format_tool_responses(outcomes, owner.conversation.family.tool_syntax))
        except asyncio.CancelledError as exc:
            if not reply.writes_history:  # speech resumed: it never was
                if voice is not None:
                    voice.discard()
                return
            reason = exc.args[0] if exc.args else reply.cancel_reason or "cancelled"
            heard: str | None = None
            if voice is not None:
                heard, reply.heard = reply.heard, None
                if heard is None:  # not a barge-in (superseded, client, close): the voice stops too
                    report = voice.interrupt()
                    heard = report.spoken_text if report is not None else ""
                owner.conversation.truncate_last_answer(heard)  # keep only what the user heard
            owner.emit(ev.ResponseCancelled(turn_id=turn_id, reason=str(reason), spoken_text=heard))
            return
        except InferenceError as exc:
            owner.emit(ev.Error(code=exc.code, message=exc.message, turn_id=turn_id))
            if said:  # cut mid-answer (a stream closed, a worker died): the text shown ends the turn,
                # as after a barge-in; `done` would pass a cut answer off as whole (history keeps it)
                owner.emit(ev.ResponseCancelled(turn_id=turn_id, reason="backend_error", spoken_text="".join(said)))
            return
        except Exception as exc:  # a bug in one turn must not end the session
            log.exception("response failed")
            owner.emit(ev.Error(code="internal", message=str(exc), turn_id=turn_id))
            return
        finally:
            reply.finish()
            if voice is not None:
                voice.end()  # the text is complete (or cut): the voice says what it has
        done = time.monotonic()
        committed_at = reply.committed_at or done
        timings = {"total": done - committed_at, **stats.timings}
        if first_token is not None:
            timings["first_token"] = max(first_token - committed_at, 0.0)
        text = "".join(said)
        owner.emit(ev.ResponseDone(turn_id=turn_id, text=text, tokens=stats.tokens, timings=timings))
        owner.hook_runner.spawn(owner.hook_runner.run("on_response", text), "on-response")

    async def _tool_result(self, call: ParsedToolCall, outcome: ToolOutcome) -> ToolOutcome:
        replaced = await self.owner.hook_runner.run("on_tool_result", call, outcome)
        return replaced if isinstance(replaced, ToolOutcome) else outcome

    def _show(self, turn_id: str, pieces: list[TextPiece | ParsedToolCall], said: list[str]) -> list[ParsedToolCall]:
        """Text goes to the user as deltas; tool calls are announced and collected."""
        owner, calls = self.owner, []
        for piece in pieces:
            if isinstance(piece, ParsedToolCall):
                calls.append(piece)
                owner.emit(ev.ToolCall(turn_id=turn_id, call_id=piece.call_id, name=piece.name or "",
                                       arguments=piece.arguments or {}))
            elif piece.text:
                said.append(piece.text)
                owner.emit(ev.ResponseDelta(turn_id=turn_id, text=piece.text))
                if owner.voice is not None:
                    owner.voice.say(piece.text)
        return calls
