"""The livekit-agents RealtimeModel adapter: real speech as 48 kHz stereo rtc.AudioFrames
(what LiveKit delivers), our VAD/turns/backends behind it, livekit-agents' own AgentSession
in front of it."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from livekit import rtc
from livekit.agents import Agent, AgentSession, RunContext, function_tool, io, llm
from livekit.agents.voice.turn import TurnHandlingOptions

from agent import events as ev
from agent.config import load_settings
from agent.inference.scripted import ScriptedBackend
from agent.integrations.livekit_agents import QwenRealtimeModel, QwenRealtimeSession
from agent.runtime import AgentRuntime

ROOT = Path(__file__).resolve().parent.parent
FIRST = int(3.2 * 16000)  # speech_two: the first utterance and the pause after it


def frames_48k_stereo(samples: np.ndarray, ms: int = 10, channels: int = 2) -> list[rtc.AudioFrame]:
    pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16)
    resampler = rtc.AudioResampler(16000, 48000)
    out = resampler.push(rtc.AudioFrame(pcm.tobytes(), 16000, 1, pcm.size)) + resampler.flush()
    up = np.concatenate([np.frombuffer(f.data, dtype=np.int16) for f in out])
    stereo = np.repeat(up[:, None], channels, axis=1)
    n = 48 * ms
    return [rtc.AudioFrame(stereo[i : i + n].tobytes(), 48000, channels, len(stereo[i : i + n]))
            for i in range(0, len(stereo), n)]


async def until(cond: Callable[[], bool], timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)


async def scripted_runtime(outputs: list[str], **kw: Any) -> tuple[AgentRuntime, ScriptedBackend]:
    backend = ScriptedBackend(outputs, **kw)
    runtime = AgentRuntime(load_settings(None, model="tiny-random"), backend=backend)
    await runtime.start()
    return runtime, backend


class Recorder:
    """livekit events of one RealtimeSession, generations read to the end."""

    def __init__(self, session: llm.RealtimeSession) -> None:
        self.kinds: list[str] = []
        self.generations: list[dict[str, Any]] = []
        self.errors: list[Any] = []
        self.tasks: set[asyncio.Task[None]] = set()
        for kind in ("input_speech_started", "input_speech_stopped"):
            session.on(kind, lambda _e, k=kind: self.kinds.append(k))
        session.on("generation_created", self._created)
        session.on("error", self.errors.append)

    def _created(self, event: llm.GenerationCreatedEvent) -> None:
        self.kinds.append("generation_created")
        self.generations.append(g := {"event": event, "text": "", "calls": [], "done": False})
        task = asyncio.create_task(self._read(event, g))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _read(self, event: llm.GenerationCreatedEvent, g: dict[str, Any]) -> None:
        async def calls() -> None:
            async for call in event.function_stream:
                g["calls"].append(call)

        task = asyncio.create_task(calls())
        async for message in event.message_stream:
            assert await message.modalities == ["text"]
            async for delta in message.text_stream:
                g["text"] += delta
        await task
        g["done"] = True


# ---- the Session hooks the adapter uses -----------------------------------------------

async def test_manual_turns_commit_clear_and_reply(speech_two: Any) -> None:
    runtime, backend = await scripted_runtime(["first answer"])
    sub = runtime.bus.subscribe()
    session = runtime.create_session(manual_turns=True)
    await session.push_audio(speech_two.samples[:FIRST])  # a whole utterance and its silence
    await session.clear()
    await session.push_audio(speech_two.samples[FIRST:])
    assert await session.commit() is True and await session.commit() is False
    turn_id = await session.reply()
    await session.wait_idle()
    with pytest.raises(ValueError, match="nothing to answer"):
        await session.reply()
    await runtime.close()
    events = [sub.queue.get_nowait() for _ in range(sub.queue.qsize())]
    turns = [e for e in events if isinstance(e, ev.TurnCommitted)]
    # The cleared first utterance never became a turn; the second did, and only reply() answered it.
    assert len(turns) == 1 and turns[0].start > 3.5
    assert [type(e).__name__ for e in events].count("SpeechStarted") == 2
    assert len(backend.requests) == 1 and backend.prefills == []
    assert [e.turn_id for e in events if isinstance(e, ev.ResponseDone)] == [turn_id]
    start, end = speech_two.segments[1]
    assert abs(backend.requests[0].audios[-1].size / 16000 - (end - start)) < 0.6


async def test_reply_with_instructions_and_deferred_tool_calls() -> None:
    runtime, backend = await scripted_runtime(['Hi! <tool_call>{"name": "set_light", "arguments": {"on": true}}'
                                               '</tool_call>', "after"])
    sub = runtime.bus.subscribe()
    session = runtime.create_session()
    session.defer_tool_calls = True
    await session.reply("Greet the user.")  # nothing pending: the instructions are the turn
    await session.wait_idle()
    session.conversation.add_tool_results("<tool_response>ok</tool_response>")
    await session.reply("Be brief.")
    await session.wait_idle()
    await runtime.close()
    events = [sub.queue.get_nowait() for _ in range(sub.queue.qsize())]
    assert [(e.name, e.arguments) for e in events if isinstance(e, ev.ToolCall)] == [("set_light", {"on": True})]
    assert not any(isinstance(e, ev.ToolResult) for e in events)  # deferred: nobody ran it here
    assert [e.text for e in events if isinstance(e, ev.ResponseDone)] == ["Hi! ", "after"]
    first, second = backend.requests
    assert first.messages[-1] == {"role": "user", "content": [{"type": "text", "text": "Greet the user."}]}
    assert second.messages[0]["content"].endswith("\n\nBe brief.") and "Be brief." not in json.dumps(first.messages)
    assert "<tool_response>ok" in json.dumps(second.messages[-1])


# ---- the RealtimeSession, driven directly -----------------------------------------------

async def test_speech_turns_become_generations(speech_two: Any) -> None:
    runtime, backend = await scripted_runtime(["one answer", "two answer"])
    model = QwenRealtimeModel(runtime=runtime)
    session = model.session()
    rec = Recorder(session)
    for frame in frames_48k_stereo(speech_two.samples):
        session.push_audio(frame)
    await until(lambda: len(rec.generations) == 2 and all(g["done"] for g in rec.generations))
    await session.aclose()
    await model.aclose()
    await runtime.close()
    assert rec.kinds == ["input_speech_started", "input_speech_stopped", "generation_created"] * 2
    assert [g["text"] for g in rec.generations] == ["one answer", "two answer"]
    assert not any(g["event"].user_initiated for g in rec.generations) and not rec.errors
    # 48 kHz stereo became 16 kHz mono: each turn's audio lies near the spoken segment.
    for request, (start, end) in zip(backend.requests, speech_two.segments):
        assert abs(request.audios[-1].size / 16000 - (end - start)) < 0.6
    assert [m.text_content for m in session.chat_ctx.messages() if m.role == "assistant"] == ["one answer", "two answer"]


async def interrupt_the_first_answer(model: QwenRealtimeModel, samples: np.ndarray) -> Recorder:
    """Speak, let the answer start, interrupt it; returns once its text stream has ended."""
    session = model.session()
    rec = Recorder(session)
    for frame in frames_48k_stereo(samples):
        session.push_audio(frame)
    await until(lambda: bool(rec.generations) and len(rec.generations[0]["text"]) > 0)
    session.interrupt()
    await until(lambda: rec.generations[0]["done"])
    await session.aclose()
    return rec


async def test_interrupt_stops_a_long_generation(speech_two: Any) -> None:
    long = "word " * 400
    runtime, _ = await scripted_runtime([long], chunk=2, delay=0.01)
    sub = runtime.bus.subscribe()
    rec = await interrupt_the_first_answer(QwenRealtimeModel(runtime=runtime), speech_two.samples[:FIRST])
    await runtime.close()
    text = rec.generations[0]["text"]
    assert long.startswith(text) and len(text) < len(long)
    events = [sub.queue.get_nowait() for _ in range(sub.queue.qsize())]
    assert [e.reason for e in events if isinstance(e, ev.ResponseCancelled)] == ["client"]


async def test_generate_reply_and_typed_user_input() -> None:
    runtime, backend = await scripted_runtime(["Hello there.", "It is sunny."])
    model = QwenRealtimeModel(runtime=runtime)
    session = model.session()
    rec = Recorder(session)
    await session.update_instructions("You are terse.")
    with pytest.raises(llm.RealtimeError, match="nothing to answer"):
        await session.generate_reply()  # no user turn yet, no instructions to make one
    generation = await session.generate_reply(instructions="Greet the user.")
    assert generation.user_initiated
    chat = session.chat_ctx
    chat.add_message(role="user", content="How is the weather?")  # AgentSession.generate_reply(user_input=…)
    await session.update_chat_ctx(chat)
    second = await session.generate_reply()
    await until(lambda: len(rec.generations) == 2 and all(g["done"] for g in rec.generations))
    await session.aclose()
    await runtime.close()
    assert [g["text"] for g in rec.generations] == ["Hello there.", "It is sunny."]
    assert rec.generations[1]["event"] is second
    last = backend.requests[1].messages
    assert last[0] == {"role": "system", "content": "You are terse."}
    assert last[1:] == [{"role": "user", "content": [{"type": "text", "text": "Greet the user."}]},
                        {"role": "assistant", "content": "Hello there."},
                        {"role": "user", "content": [{"type": "text", "text": "How is the weather?"}]}]


async def test_a_runtime_that_cannot_start_fails_replies_and_reports() -> None:
    model = QwenRealtimeModel(model="no-such-org/no-such-model")
    session = model.session()
    rec = Recorder(session)
    with pytest.raises(llm.RealtimeError, match="no-such-org/no-such-model"):
        await session.generate_reply(instructions="hi")
    await session.aclose()
    await model.aclose()
    assert len(rec.errors) == 1 and not rec.errors[0].recoverable


async def test_update_tools_puts_livekit_schemas_in_the_prompt() -> None:
    runtime, backend = await scripted_runtime(["ok", "ok"])
    session = QwenRealtimeModel(runtime=runtime).session()
    await session.update_tools([switch])
    await session.generate_reply(instructions="hi")
    session.update_options(tool_choice="none")  # what livekit sends at its last tool step
    await session.generate_reply(instructions="again")
    await until(lambda: len(backend.requests) == 2)
    await session.aclose()
    await runtime.close()
    system = backend.requests[0].messages[0]["content"]
    tools = json.loads(system.split("<tools>\n")[1].split("\n</tools>")[0])
    assert tools["function"]["name"] == "switch" and set(tools["function"]["parameters"]["properties"]) == {"room", "on"}
    assert tools["function"]["description"].startswith("Switch the light")
    assert "<tools>" not in json.dumps(backend.requests[1].messages)


# ---- livekit-agents' own AgentSession in front of it ------------------------------------

@function_tool
async def switch(context: RunContext, room: str, on: bool) -> str:
    """Switch the light in a room on or off."""
    SWITCHED.append((room, on))
    return f"the {room} light is {'on' if on else 'off'}"


SWITCHED: list[tuple[str, bool]] = []


class FrameInput(io.AudioInput):
    """LiveKit's audio input, from a list of frames, then silence of the line."""

    def __init__(self, frames: list[rtc.AudioFrame]) -> None:
        super().__init__(label="speech")
        self._frames = iter(frames)

    async def __anext__(self) -> rtc.AudioFrame:
        await asyncio.sleep(0.001)  # hand the loop over, as a real track does
        frame = next(self._frames, None)
        if frame is None:
            await asyncio.Event().wait()  # the caller stays on the line
        return frame  # type: ignore[return-value]


class TextCapture(io.TextOutput):
    def __init__(self) -> None:
        super().__init__(label="capture", next_in_chain=None)
        self.text = ""

    async def capture_text(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        self.text += "|"


async def run_agent_session(model: QwenRealtimeModel, agent: Agent, frames: list[rtc.AudioFrame],
                            done: Callable[[list[tuple[str, Any]]], bool]) -> tuple[list[tuple[str, Any]], str]:
    session = AgentSession(llm=model)
    seen: list[tuple[str, Any]] = []
    for kind in ("function_tools_executed", "conversation_item_added", "error"):
        session.on(kind, lambda e, k=kind: seen.append((k, e)))
    session.input.audio = FrameInput(frames)
    session.output.transcription = text = TextCapture()
    await session.start(agent=agent)
    try:
        await until(lambda: done(seen) and session.agent_state == "listening", timeout=80)
    finally:
        await session.aclose()
    return seen, text.text


def answers(seen: list[tuple[str, Any]]) -> list[str]:
    return [e.item.text_content for k, e in seen
            if k == "conversation_item_added" and getattr(e.item, "role", None) == "assistant"]


async def test_agent_session_runs_its_function_tool_and_speaks_the_answers(speech_two: Any) -> None:
    SWITCHED.clear()
    runtime, backend = await scripted_runtime([
        'Sure. <tool_call>{"name": "switch", "arguments": {"room": "kitchen", "on": true}}</tool_call>',
        "Done, it is on.", "Sunny."])
    model = QwenRealtimeModel(runtime=runtime)
    agent = Agent(instructions="You control the lights.", tools=[switch])
    seen, text = await run_agent_session(model, agent, frames_48k_stereo(speech_two.samples),
                                         lambda s: len(answers(s)) == 3)
    await runtime.close()
    assert SWITCHED == [("kitchen", True)]  # livekit ran the user's @function_tool
    executed = [e for k, e in seen if k == "function_tools_executed"]
    assert len(executed) == 1 and executed[0].function_calls[0].name == "switch"
    assert executed[0].function_call_outputs[0].output == "the kitchen light is on"
    assert answers(seen) == ["Sure. ", "Done, it is on.", "Sunny."]
    assert text == "Sure. |Done, it is on.|Sunny.|"  # what a TTS would have been given
    assert not [e for k, e in seen if k == "error"]
    first, follow_up, second = backend.requests
    assert first.messages[0]["content"].startswith("You control the lights.") and '"switch"' in first.messages[0]["content"]
    assert "the kitchen light is on" in json.dumps(follow_up.messages[-1])  # the result went back to the model
    assert [m["content"] for m in second.messages[1:] if m["role"] == "user"][-1] == [{"type": "audio", "audio": 1}]


async def test_manual_turn_detection_commits_on_commit_user_turn(speech_two: Any) -> None:
    runtime, backend = await scripted_runtime(["both heard"])
    sub = runtime.bus.subscribe()
    session = AgentSession(llm=QwenRealtimeModel(runtime=runtime),
                           turn_handling=TurnHandlingOptions(turn_detection="manual"))
    seen: list[tuple[str, Any]] = []
    session.on("conversation_item_added", lambda e: seen.append(("conversation_item_added", e)))
    session.input.audio = FrameInput(frames_48k_stereo(speech_two.samples, channels=1))
    await session.start(agent=Agent(instructions="Listen."))
    rt_session = session._activity.realtime_llm_session  # type: ignore[union-attr]
    assert isinstance(rt_session, QwenRealtimeSession) and rt_session._manual  # livekit took the turns
    await until(lambda: sum(isinstance(e, ev.SpeechStopped) for e in list(sub.queue._queue)) == 2)  # type: ignore[attr-defined]
    assert backend.requests == []  # pauses end no turn: livekit decides
    session.commit_user_turn()  # push-to-talk released: commit_audio() + generate_reply()
    await until(lambda: answers(seen) == ["both heard"])
    await session.aclose()
    await runtime.close()
    events = [sub.queue.get_nowait() for _ in range(sub.queue.qsize())]
    turns = [e for e in events if isinstance(e, ev.TurnCommitted)]
    (_, first_end), (second_start, _) = speech_two.segments
    assert len(turns) == 1 and turns[0].start < first_end and turns[0].end > second_start  # both, one turn
    assert len(backend.requests) == 1


@pytest.mark.slow
async def test_agent_session_with_the_tiny_random_pool(speech_two: Any) -> None:
    model = QwenRealtimeModel(model="tiny-random", max_new_tokens=8)
    runtime = await model.runtime()  # started lazily, once
    assert await model.runtime() is runtime and model.model == "tiny-random"
    sub = runtime.bus.subscribe()
    def answered(s: list[tuple[str, Any]]) -> bool:  # our answer done, and livekit has added it (a race otherwise)
        done = [e for e in list(sub.queue._queue) if isinstance(e, ev.ResponseDone)]  # type: ignore[attr-defined]
        return bool(done) and (bool(answers(s)) or not done[0].text)

    seen, text = await run_agent_session(
        model, Agent(instructions="Be brief."), frames_48k_stereo(speech_two.samples[:FIRST]), answered)
    await model.aclose()
    events = [sub.queue.get_nowait() for _ in range(sub.queue.qsize())]
    done = [e for e in events if isinstance(e, ev.ResponseDone)]
    assert [type(e) for e in events if isinstance(e, (ev.SpeechStarted, ev.TurnCommitted))] == [ev.SpeechStarted, ev.TurnCommitted]
    assert len(done) == 1 and done[0].tokens > 0
    # The model's own words reached livekit's transcription output, unchanged.
    assert text == done[0].text + "|" and answers(seen) == ([done[0].text] if done[0].text else [])
    assert runtime.sessions == {}


async def test_example_worker_is_built_from_our_model(speech_two: Any) -> None:
    spec = importlib.util.spec_from_file_location("livekit_agents_realtime", ROOT / "examples" / "livekit_agents_realtime.py")
    example = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(example)  # type: ignore[union-attr]
    options = example.worker_options()
    assert options.entrypoint_fnc is example.entrypoint and options.prewarm_fnc is example.prewarm
    proc = type("Proc", (), {"userdata": {}})()
    example.prewarm(proc)
    model = proc.userdata["model"]
    assert isinstance(model, QwenRealtimeModel) and model._start is None  # nothing started yet
    assert model._settings.backend == "openai"  # one shared vLLM server, not a 7B model per job process
    assert model.capabilities.turn_detection and not model.capabilities.audio_output
    await model.aclose()
    # The example's agent and tool, in a real AgentSession (no room here) on a scripted runtime.
    runtime, backend = await scripted_runtime([
        '<tool_call>{"name": "set_light", "arguments": {"room": "hall", "on": true}}</tool_call>', "It is on."])
    seen, _ = await run_agent_session(QwenRealtimeModel(runtime=runtime), example.build_agent(),
                                      frames_48k_stereo(speech_two.samples[:FIRST]),
                                      lambda s: answers(s) == ["It is on."])
    await runtime.close()
    assert example.LIGHTS == {"hall": True}
    assert "friendly home assistant" in backend.requests[0].messages[0]["content"]


async def test_audio_waiting_for_a_stalled_pipeline_is_capped(speech_two: Any) -> None:
    from agent.integrations import livekit_agents as realtime

    gate = asyncio.Event()
    runtime, _ = await scripted_runtime(["ok"])

    class Stalled(QwenRealtimeModel):
        async def runtime(self) -> AgentRuntime:  # the runtime takes long to come up
            await gate.wait()
            return runtime

    model = Stalled(runtime=runtime)
    rt_session = model.session()
    frames = frames_48k_stereo(np.tile(speech_two.samples, 6))  # ~40 s of audio, nobody consuming
    for frame in frames:
        rt_session.push_audio(frame)
    cap = realtime.MAX_QUEUED_S * 16000
    assert rt_session._queued_samples <= cap and rt_session.dropped_samples > 0
    assert rt_session._queued_samples + rt_session.dropped_samples >= 6 * speech_two.samples.size - 16000
    gate.set()  # once the pipeline runs, what was kept is consumed
    await until(lambda: rt_session._queued_samples == 0)
    await rt_session.aclose()
    await runtime.close()


@pytest.mark.slow
async def test_interrupt_stops_the_tiny_random_model(speech_two: Any) -> None:
    model = QwenRealtimeModel(model="tiny-random", max_new_tokens=2000)
    runtime = await model.runtime()
    backend = runtime.backend
    generate, prefill = backend.generate, backend.prefill

    def long_answer(request: Any) -> Any:
        request.extra["min_new_tokens"] = request.max_new_tokens  # random weights: no early EOS
        return request

    backend.generate = lambda request, stats=None: generate(long_answer(request), stats)  # type: ignore[method-assign]
    backend.prefill = lambda request: prefill(long_answer(request))  # type: ignore[method-assign]
    sub = runtime.bus.subscribe()
    rec = await interrupt_the_first_answer(model, speech_two.samples[:FIRST])
    await model.aclose()
    events = [sub.queue.get_nowait() for _ in range(sub.queue.qsize())]
    cancelled = [e for e in events if isinstance(e, ev.ResponseCancelled)]
    assert [e.reason for e in cancelled] == ["client"] and not any(isinstance(e, ev.ResponseDone) for e in events)
    deltas = "".join(e.text for e in events if isinstance(e, ev.ResponseDelta))
    assert rec.generations[0]["text"] == deltas  # livekit got every word the model said, and no more


async def test_truncate_keeps_what_the_user_heard_of_an_interrupted_answer(speech_two: Any) -> None:
    long = "word " * 400
    runtime, backend = await scripted_runtime([long, "next answer"], chunk=2, delay=0.01)
    session = QwenRealtimeModel(runtime=runtime).session()
    assert session._model.capabilities.message_truncation
    rec = Recorder(session)
    for frame in frames_48k_stereo(speech_two.samples[:FIRST]):
        session.push_audio(frame)
    await until(lambda: bool(rec.generations) and len(rec.generations[0]["text"]) > 20)
    session.interrupt()  # barge-in: livekit stops the speech, then says how much was played
    await until(lambda: rec.generations[0]["done"])
    (answer,) = [m for m in session.chat_ctx.messages() if m.role == "assistant"]
    session.truncate(message_id="msg_not_the_latest", modalities=["text"], audio_end_ms=900,
                     audio_transcript="ignored")
    session.truncate(message_id=answer.id, modalities=["text"], audio_end_ms=900, audio_transcript="word word")
    for frame in frames_48k_stereo(speech_two.samples[FIRST:]):
        session.push_audio(frame)
    await until(lambda: len(rec.generations) == 2 and rec.generations[1]["done"])
    await session.aclose()
    await runtime.close()
    history = backend.requests[1].messages
    assert [m["content"] for m in history if m["role"] == "assistant"] == ["word word"]
    assert [m.text_content for m in session.chat_ctx.messages() if m.role == "assistant"] == ["word word",
                                                                                              "next answer"]


class _PausableOutput:
    can_pause = True

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pause(self) -> None:
        self.calls.append("pause")

    def resume(self) -> None:
        self.calls.append("resume")


class _FollowedAgentSession:
    """What model.follow() reads of livekit's AgentSession: its state and its audio output."""

    def __init__(self) -> None:
        self.agent_state = "listening"
        self.output = type("Output", (), {"audio": _PausableOutput()})()


async def test_followed_a_yeah_pauses_and_resumes_livekits_voice_and_never_reaches_it(make_speech_fixture: Any) -> None:
    long = ("A long answer. " * 40).strip()
    runtime, backend = await scripted_runtime([long, "Sure, I will wait."], delay=0.005)
    model = QwenRealtimeModel(runtime=runtime)
    agent = _FollowedAgentSession()
    model.follow(agent)
    session = model.session()
    rec = Recorder(session)
    audio = agent.output.audio

    def push(parts: list[str | float]) -> None:
        for frame in frames_48k_stereo(make_speech_fixture(parts).samples):
            session.push_audio(frame)

    push([0.5, "turn on the kitchen light", 1.0])
    await until(lambda: len(rec.generations) == 1 and rec.generations[0]["done"])
    agent.agent_state = "speaking"  # livekit's TTS speaks the answer (its text is all there)
    push([0.5, "yeah", 1.5])
    await until(lambda: audio.calls == ["pause", "resume"])
    push([1.0])
    await until(lambda: session._queued_samples == 0)
    assert rec.kinds.count("input_speech_started") == 1  # the question's only: livekit never heard the yeah
    assert len(rec.generations) == 1 and backend.requests and len(backend.requests) == 1
    push([0.3, "wait, stop, I have another question for you", 1.5])
    await until(lambda: len(rec.generations) == 2)
    assert audio.calls == ["pause", "resume", "pause"]
    assert rec.kinds.count("input_speech_started") == 2  # the interruption reached livekit, which cuts its voice
    await until(lambda: rec.generations[1]["done"])
    # the answer once, whole (livekit's truncate() would say how much was heard), then the next
    assert [m.text_content for m in session.chat_ctx.messages() if m.role == "assistant"] == [long, "Sure, I will wait."]
    await session.aclose()
    await runtime.close()
