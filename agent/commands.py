"""What a session does besides routing audio: the agent's hooks, run as tasks a close ends,
and the client's commands that change how it answers (instruction.set, session.update,
feedback). Neither calls back into the session: each is given what it changes."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from agent import events as ev
from agent import turns
from agent.context import AgentHooks, RunContext
from agent.conversation import Conversation
from agent.reply import TurnIds

log = logging.getLogger(__name__)

Emit = Callable[[ev._Event], None]


async def _call(result: Any) -> Any:
    """Hooks may be plain or async methods."""
    return await result if inspect.isawaitable(result) else result


class HookRunner:
    """One session's hooks and the tasks it starts for them (and for others: `spawn`)."""

    def __init__(self, hooks: AgentHooks, context: RunContext, session_id: str, emit: Emit) -> None:
        self.hooks = hooks
        self.context = context
        self.session_id = session_id
        self.emit = emit
        self.closed = False  # from here no task starts
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any] | None:
        """A task the close ends; none once closed."""
        if self.closed:
            coro.close()
            return None
        task = asyncio.create_task(coro, name=f"session-{name}-{self.session_id}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def run(self, name: str, *args: Any) -> Any:
        """A failing hook is this session's error event, never its end."""
        try:
            return await _call(getattr(self.hooks, name)(self.context, *args))
        except Exception as exc:
            log.exception("session %s: hook failed", self.session_id)
            self.emit(ev.Error(code="hook_failed", message=f"{type(exc).__name__}: {exc}"))
            return None

    async def close(self) -> None:
        """End every task but the caller's (a hook may close its own session)."""
        self.closed = True
        tasks = [t for t in self.tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Commands:
    """The client's commands that change this session's answers: the instruction for the next
    turn, session.update (system prompt, token limit, end-of-turn silence), feedback."""

    def __init__(self, conversation: Conversation, detector: turns.TurnDetector, turn_ids: TurnIds,
                 hooks: HookRunner, max_new_tokens: int, instruction: str | None) -> None:
        self.conversation = conversation
        self.detector = detector
        self.turn_ids = turn_ids
        self.hooks = hooks
        self.max_new_tokens = max_new_tokens
        self.instruction = instruction  # every turn's (analysis mode throughout)
        self.next_instruction: str | None = None  # instruction.set: the next turn's

    def take_instruction(self, peek: bool = False) -> str | None:
        text = self.next_instruction or self.instruction
        if not peek:
            self.next_instruction = None
        return text

    async def handle(self, command: ev.Command) -> None:
        if isinstance(command, ev.InstructionSet):
            self.next_instruction = command.text or None
        elif isinstance(command, ev.SessionUpdate):
            self.update(command)
        elif isinstance(command, ev.Feedback):
            await self.feedback(command)

    def _error(self, code: str, message: str) -> None:
        self.hooks.emit(ev.Error(code=code, message=message))

    def update(self, command: ev.SessionUpdate) -> None:
        try:  # instruction.set's rule (half the context); refused, nothing of the update applies
            if command.system_prompt:
                self.conversation.check_text(command.system_prompt, "system prompt")
        except ValueError as exc:
            self._error("bad_request", str(exc))
            return
        if command.system_prompt is not None:
            self.conversation.system_prompt = command.system_prompt or None
        if command.max_new_tokens is not None:
            self.max_new_tokens = command.max_new_tokens
        if command.min_silence_s is not None:
            try:  # it must stay within [min_silence_s_complete, max_silence_s]
                self.detector.reconfigure(min_silence_s=command.min_silence_s)
            except ValueError as exc:
                self._error("bad_request", str(exc))

    async def feedback(self, command: ev.Feedback) -> None:
        """A rating of one of this session's answers: an event (recorded with `--record`), then the hook."""
        if not self.turn_ids.issued(command.turn_id):
            self._error("bad_command", f"feedback: no turn {command.turn_id!r} in this session")
            return
        self.hooks.emit(ev.FeedbackReceived(turn_id=command.turn_id, rating=command.rating,
                                            correction=command.correction))
        await self.hooks.run("on_feedback", command)
