"""The public agent API: hooks, RunContext, per-session state and tools, driven by audio."""

import asyncio
import importlib.util
from pathlib import Path
from typing import Any

import pytest

from agent import Agent, RunContext, UserTurn, tool
from agent import events as ev
from agent.inference.scripted import ScriptedBackend
from agent.tools import ToolOutcome

ROOT = Path(__file__).resolve().parent.parent
CALL = '<tool_call>{{"name": "{name}", "arguments": {args}}}</tool_call>'


def call(name: str, args: str = "{}") -> str:
    return CALL.format(name=name, args=args)


async def talk(runtime: Any, samples: Any, **options: Any) -> tuple[Any, list[ev.Event]]:
    """One session fed `samples` to the end; its events."""
    session, events = runtime.open_session(wait_for_responses=True, **options)
    for i in range(0, samples.size, 8000):
        await session.push_audio(samples[i : i + 8000])
    await session.finish()
    await session.close("end_of_file")
    out = []
    async for event in events:
        out.append(event)
        if isinstance(event, ev.SessionEnded):
            break
    events.close()
    return session, out


def load_example(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_context_is_not_in_the_schema() -> None:
    @tool
    def note(ctx: RunContext, text: str) -> str:
        """Take a note."""
        return text

    assert list(note.schema()["function"]["parameters"]["properties"]) == ["text"]
    assert note.context_param == "ctx"


class AddsTheTurn(ScriptedBackend):
    """Answers each user turn with an add_item call naming that turn, each tool result with "ok"."""

    async def generate(self, request: Any, stats: Any = None) -> Any:
        self.requests.append(request)
        content = request.messages[-1]["content"]
        text = content if isinstance(content, str) else "".join(p.get("text", "") for p in content)
        yield "ok" if "<tool_response>" in text else call("add_item", f'{{"item": "{request.turn_id}"}}')


async def test_per_session_state_example_keeps_two_sessions_apart(speech_two) -> None:
    example = load_example("per_session_state")
    runtime = example.agent.runtime(backend=AddsTheTurn([]))
    await runtime.start()
    try:  # two sessions at once: one with two turns, one with one
        (a, a_events), (b, b_events) = await asyncio.gather(talk(runtime, speech_two.samples),
                                                            talk(runtime, speech_two.samples[: int(3.2 * 16000)]))
    finally:
        await runtime.close()
    assert a.context.userdata["items"] == [f"{a.id}-t1", f"{a.id}-t2"]
    assert b.context.userdata["items"] == [f"{b.id}-t1"]
    assert (a.context.userdata["turns"], b.context.userdata["turns"]) == (2, 1)
    results = [e for e in a_events + b_events if isinstance(e, ev.ToolResult)]
    assert len(results) == 3 and all(r.ok for r in results)


class Recorder(Agent):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls: list[tuple[str, Any]] = []

    def create_userdata(self) -> dict:
        return {"n": 0}

    async def on_session_started(self, ctx: RunContext) -> None:
        self.calls.append(("started", ctx.session_id))

    async def on_user_turn(self, ctx: RunContext, turn: UserTurn) -> str | None:
        ctx.userdata["n"] += 1
        self.calls.append(("turn", turn.turn_id))
        if ctx.userdata["n"] == 1:
            turn.instruction = "What is the speaker's emotion?"  # analysis mode for this turn
            return None
        return "I answered that myself."  # no model

    async def on_response(self, ctx: RunContext, text: str) -> None:
        self.calls.append(("response", text))

    async def on_tool_result(self, ctx: RunContext, call: Any, result: Any) -> Any:
        self.calls.append(("tool", call.name))
        return ToolOutcome(result.call_id, result.name, True, result="replaced by the hook")

    async def on_session_ended(self, ctx: RunContext, reason: str) -> None:
        self.calls.append(("ended", reason))


async def test_hooks_change_the_mode_answer_directly_and_see_everything(speech_two) -> None:
    @tool
    def ping() -> str:
        """Ping."""
        return "pong"

    agent = Recorder(tools=[ping])
    backend = ScriptedBackend([call("ping"), "calm."])
    runtime = agent.runtime(backend=backend)
    await runtime.start()
    try:
        session, events = await talk(runtime, speech_two.samples)
    finally:
        await runtime.close()
    kinds = [k for k, _ in agent.calls]
    assert kinds[0] == "started" and kinds[-1] == "ended"
    assert kinds.count("turn") == 2 and ("tool", "ping") in agent.calls
    committed = [e for e in events if isinstance(e, ev.TurnCommitted)]
    assert [c.mode for c in committed] == ["analysis", "chat"]
    assert committed[0].instruction == "What is the speaker's emotion?"
    # The first turn went to the model (two rounds: tool call, then the answer); the second did not.
    assert len(backend.requests) == 2
    assert "replaced by the hook" in backend.requests[1].messages[-1]["content"][0]["text"]
    done = [e for e in events if isinstance(e, ev.ResponseDone)]
    assert [d.text for d in done] == ["calm.", "I answered that myself."]
    assert ("response", "I answered that myself.") in agent.calls
    assert ("ended", "end_of_file") in agent.calls


async def test_skip_leaves_a_turn_unanswered_and_out_of_history(speech_two) -> None:
    class Skipper(Agent):
        async def on_user_turn(self, ctx: RunContext, turn: UserTurn) -> str | None:
            turn.skip()
            return None

    backend = ScriptedBackend([])
    runtime = Skipper().runtime(backend=backend)
    await runtime.start()
    try:
        session, events = await talk(runtime, speech_two.samples)
    finally:
        await runtime.close()
    assert backend.requests == [] and not session.conversation.awaiting_reply
    assert not any(isinstance(e, (ev.TurnCommitted, ev.ResponseStarted)) for e in events)


async def test_tools_and_instructions_change_per_session(speech_two) -> None:
    @tool
    def lights() -> str:
        """Lights."""
        return "on"

    @tool
    def music() -> str:
        """Music."""
        return "playing"

    class Switcher(Agent):
        async def on_session_started(self, ctx: RunContext) -> None:
            if ctx.session_id == "music":
                ctx.update_tools([music])
                ctx.update_instructions("You play music.")

    backend = ScriptedBackend([])
    runtime = Switcher(instructions="You control lights.", tools=[lights]).runtime(backend=backend)
    await runtime.start()
    try:
        half = speech_two.samples[: int(3.2 * 16000)]
        music_session, _ = await _talk_with_id(runtime, "music", half)
        light_session, _ = await _talk_with_id(runtime, "lights", half)
    finally:
        await runtime.close()
    by_session = {r.session_id: r for r in backend.requests}
    system_music = by_session["music"].messages[0]["content"]
    system_lights = by_session["lights"].messages[0]["content"]
    assert system_music.startswith("You play music.") and '"music"' in system_music and '"lights"' not in system_music
    assert system_lights.startswith("You control lights.") and '"lights"' in system_lights
    assert len(runtime.tools) == 1  # the agent-wide registry is untouched


async def _talk_with_id(runtime: Any, session_id: str, samples: Any) -> tuple[Any, list[ev.Event]]:
    session, events = runtime.open_session(session_id, wait_for_responses=True)
    await asyncio.sleep(0)  # on_session_started runs first
    for i in range(0, samples.size, 8000):
        await session.push_audio(samples[i : i + 8000])
    await session.finish()
    await session.close("end_of_file")
    events.close()
    return session, []


async def test_a_failing_hook_is_an_error_event_not_the_end(speech_two) -> None:
    class Broken(Agent):
        async def on_user_turn(self, ctx: RunContext, turn: UserTurn) -> str | None:
            raise RuntimeError("oops")

    runtime = Broken().runtime(backend=ScriptedBackend(["fine"]))
    await runtime.start()
    try:
        _, events = await talk(runtime, speech_two.samples[: int(3.2 * 16000)])
    finally:
        await runtime.close()
    errors = [e for e in events if isinstance(e, ev.Error)]
    assert errors and errors[0].code == "hook_failed" and "oops" in errors[0].message
    assert any(isinstance(e, ev.ResponseDone) and e.text == "fine" for e in events)


@pytest.mark.parametrize("name", ["per_session_state", "custom_tools"])
def test_examples_import_without_side_effects(name: str) -> None:
    module = load_example(name)
    assert isinstance(module.agent, Agent)
