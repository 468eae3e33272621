"""Sessions driven the way transports drive them: audio in, commands in, events out."""

import importlib.util
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from agent import events as ev
from agent.config import load_settings
from agent.inference.base import InferenceError
from agent.inference.scripted import ScriptedBackend
from agent.runtime import AgentRuntime
from agent.tools import tool

ROOT = Path(__file__).resolve().parent.parent


@tool
def set_light(room: str, on: bool) -> str:
    """Switch a light."""
    return f"{room} light {'on' if on else 'off'}"


async def make_runtime(backend, tools=()):
    runtime = AgentRuntime(load_settings(None, model="tiny-random"), backend=backend, tools=list(tools))
    await runtime.start()
    return runtime


async def feed(session, samples, piece=8000):
    for i in range(0, samples.size, piece):
        await session.push_audio(samples[i : i + piece])


def drain(sub) -> list:
    out = []
    while not sub.queue.empty():
        out.append(sub.queue.get_nowait())
    return out


async def test_tool_call_round_trip_never_leaks_markup(speech_two):
    backend = ScriptedBackend(['Sure. <tool_call>{"name": "set_light", "arguments": {"room": "kitchen", "on": true}}'
                               '</tool_call>', "Done: the light is on."], chunk=4)
    runtime = await make_runtime(backend, [set_light])
    sub = runtime.bus.subscribe()
    session = runtime.create_session(wait_for_responses=True)
    half = int(3.2 * 16000)  # only the first utterance
    await feed(session, speech_two.samples[:half])
    await session.finish()
    events = drain(sub)
    await runtime.close()
    calls = [e for e in events if isinstance(e, ev.ToolCall)]
    results = [e for e in events if isinstance(e, ev.ToolResult)]
    assert [(c.name, c.arguments) for c in calls] == [("set_light", {"room": "kitchen", "on": True})]
    assert results[0].ok and results[0].result == "kitchen light on" and results[0].call_id == calls[0].call_id
    deltas = "".join(e.text for e in events if isinstance(e, ev.ResponseDelta))
    assert "<tool" not in deltas and "set_light" not in deltas
    done = [e for e in events if isinstance(e, ev.ResponseDone)]
    assert len(done) == 1 and done[0].text == deltas == "Sure. Done: the light is on."
    first, second = backend.requests
    assert "<tools>" in first.messages[0]["content"] and '"set_light"' in first.messages[0]["content"]
    assert "<tool_response>" in json.dumps(second.messages[-1]) and "kitchen light on" in json.dumps(second.messages[-1])


async def test_bad_tool_calls_go_back_to_the_model_as_errors(speech_two):
    backend = ScriptedBackend(['<tool_call>{"name": "set_light", "arguments": {"room": 3}}</tool_call>'
                               '<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call>'
                               "<tool_call>{not json</tool_call>", "Sorry."])
    runtime = await make_runtime(backend, [set_light])
    sub = runtime.bus.subscribe()
    session = runtime.create_session(wait_for_responses=True)
    await feed(session, speech_two.samples[: int(3.2 * 16000)])
    await session.finish()
    events = drain(sub)
    await runtime.close()
    results = [e for e in events if isinstance(e, ev.ToolResult)]
    assert [r.ok for r in results] == [False, False, False]
    assert "bad arguments" in results[0].error and "unknown tool" in results[1].error and "JSON" in results[2].error
    assert "unknown tool" in json.dumps(backend.requests[1].messages[-1])
    assert [e.text for e in events if isinstance(e, ev.ResponseDone)] == ["Sorry."]


async def test_chat_and_analysis_turns_mix_in_one_session(speech_two):
    backend = ScriptedBackend(["one", "two"])
    runtime = await make_runtime(backend)
    sub = runtime.bus.subscribe()
    session = runtime.create_session(wait_for_responses=True)
    split = int(3.2 * 16000)
    await feed(session, speech_two.samples[:split])
    await runtime.send_command(session.id, ev.parse_command({"type": "instruction.set", "text": "What emotion?"}))
    await feed(session, speech_two.samples[split:])
    await session.finish()
    events = drain(sub)
    await runtime.close()
    turns = [e for e in events if isinstance(e, ev.TurnCommitted)]
    assert [(t.mode, t.instruction) for t in turns] == [("chat", None), ("analysis", "What emotion?")]
    last = backend.requests[1].messages
    assert last[-1]["content"] == [{"type": "audio", "audio": 1}, {"type": "text", "text": "What emotion?"}]
    assert last[0]["content"] == [{"type": "audio", "audio": 0}] and last[1] == {"role": "assistant", "content": "one"}


async def test_speculative_prefill_is_reused_by_the_committed_turn(speech_two):
    backend = ScriptedBackend(["a", "b"])
    runtime = await make_runtime(backend)
    sub = runtime.bus.subscribe()
    session = runtime.create_session(wait_for_responses=True)
    await feed(session, speech_two.samples)
    await session.finish()
    events = drain(sub)
    await runtime.close()
    committed = [e.turn_id for e in events if isinstance(e, ev.TurnCommitted)]
    prefilled = [r.turn_id for r in backend.prefills]
    # Every committed turn was prefilled before it committed, under the same id; the
    # prefills of pauses inside an utterance were dropped when speech resumed, and their
    # numbers were given to the next prefill: the turns users see are t1, t2.
    assert committed == [f"{session.id}-t1", f"{session.id}-t2"]
    assert len(prefilled) > 2 and set(prefilled) == set(committed)  # pauses inside the utterances
    assert len(backend.dropped) == len(prefilled) - 2
    assert all(r.speculative for r in backend.prefills)
    spec = [r for r in backend.prefills if r.turn_id == committed[0]][-1]
    np.testing.assert_array_equal(spec.audios[-1], backend.requests[0].audios[-1])


async def test_barge_in_cancels_the_running_response(speech_two):
    backend = ScriptedBackend(["a long answer " * 200], chunk=2, delay=0.01)
    runtime = await make_runtime(backend)
    sub = runtime.bus.subscribe()
    session = runtime.create_session()  # live: no waiting for responses
    await feed(session, speech_two.samples)
    await session.finish()
    events = drain(sub)
    await runtime.close()
    cancelled = [e for e in events if isinstance(e, ev.ResponseCancelled)]
    assert cancelled and cancelled[0].reason == "barge_in"
    turns = [e.turn_id for e in events if isinstance(e, ev.TurnCommitted)]
    assert cancelled[0].turn_id == turns[0]
    kinds = [type(e) for e in events]
    assert kinds.index(ev.ResponseCancelled) > kinds.index(ev.SpeechStarted, kinds.index(ev.TurnCommitted))


class FailingBackend(ScriptedBackend):
    def __init__(self):
        super().__init__(["recovered"])
        self.calls = 0

    async def generate(self, request, stats=None):
        self.calls += 1
        if self.calls == 1:
            raise InferenceError("busy", "inference queue is full (64 waiting)")
        async for piece in super().generate(request, stats):
            yield piece


async def test_busy_backend_gives_an_error_event_and_the_session_goes_on(speech_two):
    runtime = await make_runtime(FailingBackend())
    sub = runtime.bus.subscribe()
    session = runtime.create_session(wait_for_responses=True)
    await feed(session, speech_two.samples)
    await session.finish()
    events = drain(sub)
    await runtime.close()
    errors = [e for e in events if isinstance(e, ev.Error)]
    assert len(errors) == 1 and errors[0].code == "busy" and errors[0].turn_id
    assert [e.text for e in events if isinstance(e, ev.ResponseDone)] == ["recovered"]


async def test_commands_and_bad_command_reports(speech_two):
    runtime = await make_runtime(ScriptedBackend([]))
    sub = runtime.bus.subscribe()
    session = runtime.create_session()
    await runtime.send_command(session.id, ev.parse_command({"type": "session.update", "max_new_tokens": 7}))
    assert session.max_new_tokens == 7
    runtime.report_error(session.id, "bad_command", "payload is not JSON")
    with pytest.raises(KeyError):
        await runtime.send_command("nope", ev.ResponseCancel())
    await runtime.send_command(session.id, ev.SessionClose())
    events = drain(sub)
    await runtime.close()
    assert any(isinstance(e, ev.Error) and e.code == "bad_command" and e.session_id == session.id for e in events)
    assert isinstance(events[-1], ev.SessionEnded) and events[-1].reason == "client"
    assert runtime.sessions == {}


async def test_custom_tools_example_runs_its_tool(speech_two):
    spec = importlib.util.spec_from_file_location("custom_tools", ROOT / "examples" / "custom_tools.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    backend = ScriptedBackend(['<tool_call>{"name": "set_light", "arguments": {"room": "hall", "on": true}}'
                               '</tool_call>', "The hall light is on.",
                               '<tool_call>{"name": "current_time", "arguments": {"timezone": "UTC"}}</tool_call>',
                               "It is late."])
    out = io.StringIO()
    code = await example.agent.run_files([str(speech_two.path)], jsonl=True, out=out, backend=backend)
    assert code == 0
    events = [ev.parse_event(line) for line in out.getvalue().splitlines()]
    results = [e for e in events if isinstance(e, ev.ToolResult)]
    assert example.LIGHTS == {"hall": True}
    assert results[0].result == "the hall light is on" and results[1].ok and ":" in results[1].result
    assert "You are a friendly home assistant" in backend.requests[0].messages[0]["content"]


async def test_oversized_instruction_fails_the_turn_not_the_session(speech_two):
    with pytest.raises(Exception, match="8192"):
        ev.parse_command({"type": "instruction.set", "text": "x" * 100_000})  # refused at the door
    backend = ScriptedBackend(["fine"])
    runtime = await make_runtime(backend)
    sub = runtime.bus.subscribe()
    session = runtime.create_session(instruction="x" * 100_000, wait_for_responses=True)
    await feed(session, speech_two.samples)
    await session.finish()
    await session.close()
    events = drain(sub)
    await runtime.close()
    errors = [e for e in events if isinstance(e, ev.Error)]
    assert len(errors) == 2 and all(e.code == "bad_request" and "over the limit" in e.message for e in errors)
    assert backend.requests == [] and isinstance(events[-1], ev.SessionEnded)


async def test_a_system_prompt_that_crowds_out_history_is_reported(caplog):
    small = await make_runtime(ScriptedBackend([]), [set_light])
    await small.close()
    assert "context tokens" not in caplog.text
    runtime = AgentRuntime(load_settings(None, model="tiny-random", context_tokens=1000,
                                         system_prompt="You know these devices: " + "lamp " * 200),
                           backend=ScriptedBackend([]), tools=[set_light])
    await runtime.start()
    await runtime.close()
    (taken,) = re.findall(r"take (\d+) of the 1000 context tokens", caplog.text)
    assert int(taken) > 1000


async def test_events_after_session_ended_are_counted_on_metrics():
    from agent.server.metrics import Metrics

    runtime = await make_runtime(ScriptedBackend(["Hi."]))
    session = runtime.create_session()
    await session.close("test")
    session.emit(ev.Error(code="late", message="after the end"))  # e.g. a task that outlived the close
    session.emit(ev.Error(code="late", message="again"))
    assert session.events_dropped == 2 and runtime.session_totals["events_dropped"] == 2
    text = Metrics(runtime, lambda: 0).render()[0].decode()
    await runtime.close()
    assert "voice_agent_session_events_dropped_total 2.0" in text
