"""`RunContext`: what hooks and tools see of the session they run in.

A tool that declares a parameter of type `RunContext` gets it injected; the parameter is
left out of the JSON schema the model sees.

    @tool
    def add_item(ctx: RunContext, item: str) -> str:
        "Add an item to the user's shopping list."
        ctx.userdata.setdefault("list", []).append(item)
        return f"{len(ctx.userdata['list'])} items"
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from agent.conversation import Conversation
from agent.events import Event, Feedback


class SessionHandle(Protocol):
    """What a RunContext needs of its session (a Protocol: no import of agent.session)."""

    id: str
    conversation: Conversation

    async def say(self, text: str) -> str: ...

    def emit(self, event: Event) -> None: ...

    def set_tools(self, tools: Sequence[Any]) -> None: ...

    async def handle(self, command: Any) -> None: ...


@dataclass
class UserTurn:
    """A committed user turn as `Agent.on_user_turn` sees it. Change `instruction` to switch
    the mode (analysis with one, chat without), or call `skip()` to leave it unanswered."""

    turn_id: str
    audio: np.ndarray  # 16 kHz mono float32
    start: float
    end: float
    instruction: str | None = None
    skipped: bool = False

    def skip(self) -> None:
        self.skipped = True


class RunContext:
    def __init__(self, session: SessionHandle, userdata: Any) -> None:
        self._session = session
        self.userdata = userdata  # per-session state, made by `Agent.create_userdata()`

    @property
    def session_id(self) -> str:
        return self._session.id

    @property
    def conversation(self) -> Conversation:
        """The history so far (user audio and instructions, answers, tool results)."""
        return self._session.conversation

    async def say(self, text: str) -> str:
        """Answer with `text` as if the model had said it (events, history); its turn_id."""
        return await self._session.say(text)

    def emit(self, event: Event) -> None:
        """Publish an event on this session (it gets the session id and the next seq)."""
        self._session.emit(event)

    async def feedback(self, turn_id: str, rating: str, correction: str | None = None) -> None:
        """Rate an answer of this session as a client's `feedback` command would (recorded with `--record`)."""
        await self._session.handle(Feedback.model_validate({"turn_id": turn_id, "rating": rating,
                                                            "correction": correction}))

    def update_instructions(self, instructions: str | None) -> None:
        """This session's system prompt from its next response on (None: the model's default)."""
        self._session.conversation.system_prompt = instructions

    def update_tools(self, tools: Sequence[Any]) -> None:
        """Replace this session's tools (functions or `Tool`s) from its next response on."""
        self._session.set_tools(tools)


class AgentHooks:
    """The overridable steps of a conversation; `agent.Agent` is one. Each may be a plain or
    an async method; keep them quick (they run in the session's audio path)."""

    def create_userdata(self) -> Any:
        """Per-session state, given to hooks and tools as `ctx.userdata`."""
        return {}

    async def on_session_started(self, ctx: RunContext) -> None:
        """The session has started (its `session.started` event is out)."""

    async def on_user_turn(self, ctx: RunContext, turn: UserTurn) -> str | None:
        """A user turn was committed. Change `turn.instruction`, call `turn.skip()`, or return
        a text to answer it directly without the model; None lets the model answer."""
        return None

    async def on_response(self, ctx: RunContext, text: str) -> None:
        """An answer is complete (`response.done`); `text` is what the user was shown."""

    async def on_tool_result(self, ctx: RunContext, call: Any, result: Any) -> Any:
        """A tool call finished (`call`: the parsed call, `result`: its outcome). Return a
        replacement outcome, or None to keep it."""
        return None

    async def on_feedback(self, ctx: RunContext, feedback: Any) -> None:
        """A person rated an answer (`feedback` command: `turn_id`, `rating` up|down, `correction`)."""

    async def on_session_ended(self, ctx: RunContext, reason: str) -> None:
        """The session has ended (before `session.ended` goes out)."""
