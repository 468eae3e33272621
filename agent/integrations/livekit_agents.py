"""Qwen2-Audio as a livekit-agents `RealtimeModel` (audio in, text out):

    session = AgentSession(llm=QwenRealtimeModel(model="Qwen/Qwen2-Audio-7B-Instruct"), tts=...)

Each `RealtimeSession` is one of our `Session`s on a shared `AgentRuntime` (batched VAD,
turn detector, worker pool or OpenAI backend). Our VAD/turn detector is the "server-side"
turn detection: `speech.started/stopped` → `input_speech_started/stopped`, every response →
`generation_created` (text only: the AgentSession sends it to its TTS). When livekit-agents
takes turns itself (`turn_detection="manual"`, or its own VAD/turn detector), the session runs
with `manual_turns`: `commit_audio()` / `clear_audio()` end or drop the user's turn and
`generate_reply()` answers it.

Tools: livekit-agents runs them. Their schemas go into the `<tools>` block of the prompt; a
`<tool_call>` the model writes ends the response as an `llm.FunctionCall` on the
`function_stream`; AgentActivity executes the `@function_tool` (RunContext, handoffs and the
`function_tools_executed` event work as with any LLM), hands back `FunctionCallOutput`s
through `update_chat_ctx` (→ `<tool_response>` in our conversation) and, since
`auto_tool_reply_generation` is False, calls `generate_reply()` for the follow-up. Running
them inside our Session instead would bypass all of that.

Speech over the agent's voice: after `model.follow(agent_session)` our barge-in decides it as
over our own voice (agent/speech/bargein.py): the AgentSession's audio output is paused at once;
a backchannel ("yeah") resumes it and never reaches livekit — no `input_speech_started`, no
turn, no generation, nothing in the chat context; an interruption is handed to livekit as
`input_speech_started`, which interrupts its speech (and `truncate()` says what was heard).
Without `follow`, livekit-agents is told of every speech at once and interrupts on it.

Qwen2-Audio does not transcribe the user in chat mode (`user_transcription=False`); the chat
context mirrored here holds the text turns, the answers and the tool items, not the audio.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from livekit import rtc
from livekit.agents import llm, utils
from livekit.agents.types import NOT_GIVEN, NotGivenOr

from agent import events as ev
from agent.config import Settings, load_settings
from agent.model.qwen2_audio import SAMPLE_RATE
from agent.runtime import AgentRuntime
from agent.session import Session
from agent.tools import Tool, ToolOutcome, ToolRegistry, format_tool_responses

log = logging.getLogger(__name__)
# The chat context mirrored for livekit keeps this many items (plus leading instructions): our
# Conversation holds the real history under its own token budget; livekit only reads this
# mirror back to append to it, and diffs it against its own with an O(n·m) LCS.
MAX_CHAT_ITEMS = 128
MAX_QUEUED_S = 30.0  # audio waiting for the pipeline (e.g. while the model loads); beyond it new frames are dropped, counted
_Op = Callable[[Session], Awaitable[None]]  # ordered with the audio: commit, clear, reply, …


class QwenRealtimeModel(llm.RealtimeModel):
    """Build from settings (`model=`, `backend=`, `openai_url=`, … as in `agent.config`; the
    runtime starts on first use and closes with `aclose()`), or pass `runtime=` to share one
    already started `AgentRuntime` (one VAD service and worker pool) across many sessions of
    the same event loop; it stays yours to close."""

    def __init__(self, *, runtime: AgentRuntime | None = None, settings: Settings | None = None,
                 config: str | None = None, **options: Any) -> None:
        super().__init__(capabilities=llm.RealtimeCapabilities(
            message_truncation=True, turn_detection=True, user_transcription=False,
            auto_tool_reply_generation=False, audio_output=False, manual_function_calls=False,
            can_disable_turn_detection=True,
            mutable_chat_context=False,  # items are only added: our history cannot drop them
            mutable_instructions=True, mutable_tools=True))
        if runtime is not None and (settings is not None or config or options):
            raise ValueError("pass either runtime= or settings/options, not both")
        self._runtime = runtime
        self._owns_runtime = runtime is None
        # Validated now: a bad option fails where the model is built, not mid-call.
        self._settings = runtime.settings if runtime else settings or load_settings(config, **options)
        self._start: asyncio.Task[AgentRuntime] | None = None
        self._followed: Any = None  # the AgentSession whose voice barge-in pauses (follow())
        self._sessions: weakref.WeakSet[QwenRealtimeSession] = weakref.WeakSet()

    def follow(self, agent_session: Any) -> None:
        """Let speech over `agent_session`'s voice pause it and be judged (backchannel or
        interruption) before livekit-agents hears of it; see the module doc."""
        self._followed = agent_session
        for session in list(self._sessions):
            session._follow(agent_session)

    @property
    def model(self) -> str:
        return self._settings.model if self._settings.backend == "transformers" else self._settings.openai_model or ""

    @property
    def provider(self) -> str:
        return "qwen-voice-agent"

    async def runtime(self) -> AgentRuntime:
        """The shared runtime, started on the first call (all callers wait for the same start)."""
        if not self._owns_runtime:
            assert self._runtime is not None
            return self._runtime
        if self._start is None:
            self._start = asyncio.create_task(self._create_runtime())
        elif self._start.get_loop() is not asyncio.get_running_loop():
            raise RuntimeError("a QwenRealtimeModel's runtime serves one event loop; build one model per loop")
        return await asyncio.shield(self._start)

    async def _create_runtime(self) -> AgentRuntime:
        runtime = AgentRuntime(self._settings)
        await runtime.start()
        self._runtime = runtime
        return runtime

    def session(self, *, turn_detection_disabled: bool = False) -> QwenRealtimeSession:
        session = QwenRealtimeSession(self, manual_turns=turn_detection_disabled)
        self._sessions.add(session)
        if self._followed is not None:
            session._follow(self._followed)
        return session

    async def aclose(self) -> None:
        if self._owns_runtime and self._start is not None:
            start, self._start = self._start, None
            if not start.done():
                start.cancel()
            await asyncio.gather(start, return_exceptions=True)
            if self._runtime is not None:
                runtime, self._runtime = self._runtime, None
                await runtime.close()


@dataclass
class _Generation:
    turn_id: str
    message_id: str = field(default_factory=lambda: utils.shortuuid("msg_"))
    message_ch: utils.aio.Chan[llm.MessageGeneration] = field(default_factory=utils.aio.Chan)
    function_ch: utils.aio.Chan[llm.FunctionCall] = field(default_factory=utils.aio.Chan)
    text_ch: utils.aio.Chan[str] = field(default_factory=utils.aio.Chan)
    text: list[str] = field(default_factory=list)

    def close(self) -> None:
        for ch in (self.text_ch, self.function_ch, self.message_ch):
            ch.close()


class _AgentVoice:
    """The AgentSession's voice as our barge-in sees it (agent.speech.bargein.Playout)."""

    realtime = True

    def __init__(self, agent_session: Any, on_interrupt: Callable[[], None]) -> None:
        self._agent = agent_session
        self._on_interrupt = on_interrupt
        self.turn_id: str | None = None  # the generation it speaks
        self.paused = False
        self.echo_gated = 0
        self.backchannels = 0

    @property
    def active(self) -> bool:
        return self.paused or getattr(self._agent, "agent_state", None) == "speaking"

    @property
    def sounding(self) -> bool:
        return self.active

    def is_echo(self, mic: np.ndarray, mic_rate: int = SAMPLE_RATE) -> bool:
        return False  # LiveKit's clients cancel the echo of what they play

    def _output(self) -> Any:
        out = getattr(getattr(self._agent, "output", None), "audio", None)
        return out if out is not None and getattr(out, "can_pause", False) else None

    def pause(self) -> bool:
        out = self._output()
        if out is None or self.paused:
            return False
        out.pause()
        self.paused = True
        return True

    def resume(self) -> bool:
        out = self._output()
        if not self.paused:
            return False
        self.paused = False
        if out is not None:
            out.resume()
        return True

    def interrupt(self) -> None:
        """An interruption: livekit hears of the speech now and interrupts its own voice."""
        self.paused = False
        self._on_interrupt()

    def note_echo(self) -> None:
        self.echo_gated += 1

    def note_backchannel(self) -> None:
        self.backchannels += 1


class QwenRealtimeSession(llm.RealtimeSession):
    def __init__(self, model: QwenRealtimeModel, *, manual_turns: bool = False) -> None:
        super().__init__(model)
        self._model = model
        self._manual = manual_turns
        self._chat_ctx = llm.ChatContext.empty()
        self._chat_trimmed = False  # older items were let go: livekit may still send them
        self._first_event_type: str | None = None
        self._tools = llm.ToolContext.empty()
        self._tool_choice: llm.ToolChoice | None = None
        self._registry = ToolRegistry()
        # Audio and state changes in the order livekit made them (a reply after its tool results).
        self._input: asyncio.Queue[np.ndarray | _Op] = asyncio.Queue()
        self._queued_samples = 0  # audio in _input: capped, so a stalled pipeline cannot pile it up
        self.dropped_samples = 0
        self._tasks: set[asyncio.Task[Any]] = set()  # fire-and-forget, referenced until done
        self._session: Session | None = None
        self._generations: dict[str, _Generation] = {}
        self._reply_futures: dict[str, asyncio.Future[llm.GenerationCreatedEvent]] = {}  # by turn_id
        self._unanswered: set[asyncio.Future[llm.GenerationCreatedEvent]] = set()  # failed if we end
        self._resampler: rtc.AudioResampler | None = None
        self._latest_message_id: str | None = None  # truncate() applies to this answer only,
        self._latest_called_tools = False  # and not when it called tools
        self._resampler_rate = 0
        self._voice: _AgentVoice | None = None  # with model.follow(): the AgentSession's voice
        self._kept_back: list[str] = []  # speech events kept from livekit while barge-in decides
        self._main = asyncio.create_task(self._run(), name="QwenRealtimeSession")

    # ---- state -----------------------------------------------------------------------
    @property
    def chat_ctx(self) -> llm.ChatContext:
        return self._chat_ctx.copy()

    @property
    def tools(self) -> llm.ToolContext:
        return self._tools.copy()

    async def update_instructions(self, instructions: str) -> None:
        self._enqueue(lambda s: s.handle(ev.SessionUpdate(system_prompt=instructions)))

    async def update_chat_ctx(self, chat_ctx: llm.ChatContext) -> None:
        """New items reach our conversation: typed user turns, assistant text, tool results.
        Removals are ignored (`mutable_chat_context=False`)."""
        chat_ctx = self._known_tail(chat_ctx)
        diff = llm.utils.compute_chat_ctx_diff(self._chat_ctx, chat_ctx)
        added = [item for _, item_id in diff.to_create if (item := chat_ctx.get_by_id(item_id)) is not None]
        self._chat_ctx = chat_ctx.copy()
        self._bound_chat_ctx()
        outputs = [i for i in added if isinstance(i, llm.FunctionCallOutput)]

        async def apply(session: Session) -> None:
            conv = session.conversation
            for item in added:
                if isinstance(item, llm.ChatMessage) and item.text_content:
                    if item.role == "user":
                        conv.add_user_text(item.text_content)
                    elif item.role == "assistant":
                        conv.add_assistant(item.text_content)
            if outputs:  # one <tool_response> turn per tool round, in call order
                conv.add_tool_results(format_tool_responses([
                    ToolOutcome(o.call_id, o.name, not o.is_error, result=o.output,
                                error=o.output if o.is_error else None) for o in outputs], conv.family.tool_syntax))

        if added:
            self._enqueue(apply)

    async def update_tools(self, tools: list[llm.Tool]) -> None:
        self._tools = llm.ToolContext(tools)
        self._registry = _schema_registry(self._tools)
        self._enqueue(self._apply_tools)

    def update_options(self, *, tool_choice: NotGivenOr[llm.ToolChoice | None] = NOT_GIVEN) -> None:
        # Qwen has no tool_choice; "none" (e.g. livekit's last tool step) hides the tools.
        if utils.is_given(tool_choice):
            self._tool_choice = tool_choice
            self._enqueue(self._apply_tools)

    async def _apply_tools(self, session: Session) -> None:
        session.tools = ToolRegistry() if self._tool_choice == "none" else self._registry

    # ---- input -----------------------------------------------------------------------
    def push_audio(self, frame: rtc.AudioFrame) -> None:
        """Any rate and channel count → 16 kHz mono float32."""
        pcm = np.frombuffer(frame.data, dtype=np.int16)
        if frame.num_channels > 1:
            pcm = pcm.reshape(-1, frame.num_channels).mean(axis=1).astype(np.int16)
        if frame.sample_rate != SAMPLE_RATE:
            if self._resampler is None or self._resampler_rate != frame.sample_rate:
                self._resampler = rtc.AudioResampler(frame.sample_rate, SAMPLE_RATE, num_channels=1)
                self._resampler_rate = frame.sample_rate
            out = self._resampler.push(rtc.AudioFrame(pcm.tobytes(), frame.sample_rate, 1, pcm.size))
            pcm = np.concatenate([np.frombuffer(f.data, dtype=np.int16) for f in out]) if out else pcm[:0]
        if not pcm.size:
            return
        if self._queued_samples + pcm.size > MAX_QUEUED_S * SAMPLE_RATE:
            if not self.dropped_samples:
                log.warning("realtime session: the pipeline is %.0f s behind; dropping audio", MAX_QUEUED_S)
            self.dropped_samples += pcm.size
            return
        self._queued_samples += pcm.size
        self._input.put_nowait(pcm.astype(np.float32) / 32768.0)

    def push_video(self, frame: rtc.VideoFrame) -> None:
        pass  # audio-only model

    def commit_audio(self) -> None:
        async def commit(session: Session) -> None:
            await session.commit()

        self._enqueue(commit)

    def clear_audio(self) -> None:
        self._enqueue(lambda s: s.clear())

    # ---- responses -------------------------------------------------------------------
    def generate_reply(self, *, instructions: NotGivenOr[str] = NOT_GIVEN,
                       tool_choice: NotGivenOr[llm.ToolChoice] = NOT_GIVEN,
                       tools: NotGivenOr[list[llm.Tool]] = NOT_GIVEN) -> asyncio.Future[llm.GenerationCreatedEvent]:
        """Answers the pending user turn or tool results; with nothing pending, the
        instructions are the user's turn (Qwen2-Audio only answers user turns)."""
        fut: asyncio.Future[llm.GenerationCreatedEvent] = asyncio.get_running_loop().create_future()
        self._unanswered.add(fut)
        fut.add_done_callback(self._unanswered.discard)

        async def reply(session: Session) -> None:
            if fut.done():  # cancelled by livekit before its turn came
                return
            try:
                turn_id = await session.reply(instructions if utils.is_given(instructions) else None)
            except ValueError as exc:
                fut.set_exception(llm.RealtimeError(str(exc)))
                return
            # Registered before the response task first runs, so before its response.started.
            self._reply_futures[turn_id] = fut
            fut.add_done_callback(lambda f: self.interrupt() if f.cancelled() else None)

        self._enqueue(reply)
        return fut

    def interrupt(self) -> None:
        if self._session is not None:  # our response.cancel command path, not queued behind audio
            task = asyncio.create_task(self._session.handle(ev.ResponseCancel()))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def truncate(self, *, message_id: str, modalities: list[Literal["text", "audio"]], audio_end_ms: int,
                 audio_transcript: NotGivenOr[str] = NOT_GIVEN) -> None:
        """livekit-agents cut the speech of an answer (barge-in): `audio_transcript` is what the
        user heard, and our history keeps just that. Only the latest answer, and not one that
        called tools (its call and the tool's output must stay paired)."""
        if not utils.is_given(audio_transcript) or message_id != self._latest_message_id \
                or self._latest_called_tools:
            return
        heard = audio_transcript

        async def apply(session: Session) -> None:
            await session.wait_idle()  # the interrupted response puts its text in first
            session.conversation.truncate_last_answer(heard)

        self._enqueue(apply)
        item = self._chat_ctx.get_by_id(message_id)
        if isinstance(item, llm.ChatMessage):
            item.content = [heard]

    def _follow(self, agent_session: Any) -> None:
        voice = self._voice = _AgentVoice(agent_session, self._release_speech)

        async def attach(session: Session) -> None:
            session.attach_voice(voice)

        self._enqueue(attach)

    def _release_speech(self) -> None:
        """Speech kept back while it was judged is an interruption (or a turn): livekit hears of it."""
        kept, self._kept_back = self._kept_back, []
        for kind in kept:
            if kind == "started":
                self.emit("input_speech_started", llm.InputSpeechStartedEvent())
            else:
                self.emit("input_speech_stopped", llm.InputSpeechStoppedEvent(user_transcription_enabled=False))

    async def aclose(self) -> None:
        self._main.cancel()
        await asyncio.gather(self._main, return_exceptions=True)

    # ---- internals -------------------------------------------------------------------
    def _bound_chat_ctx(self) -> None:
        if len(self._chat_ctx.items) > MAX_CHAT_ITEMS:
            self._chat_ctx.truncate(max_items=MAX_CHAT_ITEMS)
            self._chat_trimmed = True

    def _known_tail(self, chat_ctx: llm.ChatContext) -> llm.ChatContext:
        """Once the mirror was trimmed, what livekit sends from before our oldest kept item is
        old, not new: cut it off, so it is neither added to the conversation twice nor diffed."""
        if not self._chat_trimmed:
            return chat_ctx
        oldest = next((item.id for item in self._chat_ctx.items
                       if not (isinstance(item, llm.ChatMessage) and item.role in ("system", "developer"))), None)
        start = next((i for i, item in enumerate(chat_ctx.items) if item.id == oldest), None)
        if not start:  # not there (livekit replaced its context), or nothing to cut
            return chat_ctx
        return llm.ChatContext(chat_ctx.items[start:])

    def _enqueue(self, op: Callable[[Session], Awaitable[Any]]) -> None:
        self._input.put_nowait(op)  # type: ignore[arg-type]

    async def _run(self) -> None:
        try:
            runtime = await self._model.runtime()
        except Exception as exc:
            log.exception("the Qwen runtime did not start")
            self._error(exc, recoverable=False)
            self._fail_replies(f"the Qwen runtime did not start: {exc}")
            return
        # open_session: the subscription exists before the session, so session.started is seen.
        session, sub = runtime.open_session(manual_turns=self._manual, queue_size=65536)
        session.defer_tool_calls = True  # livekit-agents runs the tools (module docstring)
        session.tools = self._registry
        self._session = session
        pump = asyncio.create_task(self._pump(sub))
        try:
            while True:
                item = await self._input.get()
                try:
                    if isinstance(item, np.ndarray):
                        self._queued_samples -= item.size
                        await session.push_audio(item)
                    else:
                        await item(session)
                except Exception as exc:  # one bad step must not end the call
                    log.exception("realtime session step failed")
                    self._error(exc, recoverable=True)
        finally:
            await session.close("closed")
            await asyncio.sleep(0)  # let the pump see session.ended
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
            sub.close()
            for gen in self._generations.values():
                gen.close()
            self._fail_replies("the realtime session is closed")

    def _fail_replies(self, message: str) -> None:
        for fut in list(self._unanswered):
            if not fut.done():
                fut.set_exception(llm.RealtimeError(message))

    async def _pump(self, sub: Any) -> None:
        """Our events → livekit's."""
        async for event in sub:
            if self._first_event_type is None:
                self._first_event_type = event.type  # session.started, by open_session (tests check)
            if isinstance(event, ev.SpeechStarted) and not self._manual:
                if self._voice is not None and self._voice.active:
                    self._kept_back = ["started"]  # over the agent's voice: livekit hears of it if it interrupts
                else:
                    self.emit("input_speech_started", llm.InputSpeechStartedEvent())
            elif isinstance(event, ev.SpeechStopped) and not self._manual:
                if self._kept_back:
                    self._kept_back.append("stopped")
                else:
                    self.emit("input_speech_stopped", llm.InputSpeechStoppedEvent(user_transcription_enabled=False))
            elif isinstance(event, ev.SpeechBackchannel):
                self._kept_back = []  # a backchannel: livekit never hears of it, no turn, no generation
            elif isinstance(event, ev.TurnCommitted):
                self._release_speech()  # a turn after all (the agent stopped meanwhile)
            elif isinstance(event, ev.ResponseStarted):
                self._start_generation(event.turn_id)
            elif isinstance(event, ev.ResponseDelta) and (gen := self._generations.get(event.turn_id)):
                gen.text.append(event.text)
                gen.text_ch.send_nowait(event.text)
            elif isinstance(event, ev.ToolCall) and (gen := self._generations.get(event.turn_id)):
                call = llm.FunctionCall(call_id=event.call_id, name=event.name,
                                        arguments=json.dumps(event.arguments))
                self._chat_ctx.items.append(call)
                self._bound_chat_ctx()
                self._latest_called_tools |= gen.message_id == self._latest_message_id
                gen.function_ch.send_nowait(call)
            elif isinstance(event, (ev.ResponseDone, ev.ResponseCancelled)):
                self._end_generation(event.turn_id)
            elif isinstance(event, ev.Error):
                self._error(RuntimeError(f"{event.code}: {event.message}"), recoverable=True)
                if event.turn_id:
                    self._end_generation(event.turn_id)

    def _start_generation(self, turn_id: str) -> None:
        gen = self._generations[turn_id] = _Generation(turn_id)
        if self._voice is not None:
            self._voice.turn_id = turn_id
        self._latest_message_id, self._latest_called_tools = gen.message_id, False
        modalities: asyncio.Future[list[Literal["text", "audio"]]] = asyncio.get_running_loop().create_future()
        modalities.set_result(["text"])
        audio_ch: utils.aio.Chan[rtc.AudioFrame] = utils.aio.Chan()
        audio_ch.close()  # text only
        gen.message_ch.send_nowait(llm.MessageGeneration(message_id=gen.message_id, text_stream=gen.text_ch,
                                                         audio_stream=audio_ch, modalities=modalities))
        gen.message_ch.close()  # one message per response
        event = llm.GenerationCreatedEvent(message_stream=gen.message_ch, function_stream=gen.function_ch,
                                           user_initiated=False, response_id=turn_id)
        fut = self._reply_futures.pop(turn_id, None)
        if fut is not None:
            if fut.done():  # livekit gave up on this reply and interrupt() stops it: nobody reads it
                return
            event.user_initiated = True
            fut.set_result(event)
        self.emit("generation_created", event)

    def _end_generation(self, turn_id: str) -> None:
        gen = self._generations.pop(turn_id, None)
        if gen is None:
            return
        if gen.text:
            self._chat_ctx.add_message(role="assistant", content="".join(gen.text), id=gen.message_id)
            self._bound_chat_ctx()
        gen.close()

    def _error(self, exc: Exception, *, recoverable: bool) -> None:
        self.emit("error", llm.RealtimeModelError(timestamp=time.time(), label=self._model.label,
                                                  error=exc, recoverable=recoverable))


def _run_by_livekit(**_: Any) -> None:
    # A schema-only stand-in: with defer_tool_calls our Session never runs tools itself.
    raise RuntimeError("livekit-agents runs this tool")


def _schema_registry(tools: llm.ToolContext) -> ToolRegistry:
    """The agent's function tools as our prompt's `<tools>` block (schemas made by livekit)."""
    registry = ToolRegistry()
    for fn in tools.function_tools.values():
        if isinstance(fn, llm.RawFunctionTool):
            schema = dict(fn.info.raw_schema)
        else:
            schema = llm.utils.build_legacy_openai_schema(fn)["function"]
        stub = Tool(_run_by_livekit, name=schema["name"], description=schema.get("description") or "")
        stub.parameters = schema.get("parameters") or {"type": "object", "properties": {}}
        registry.add(stub)
    return registry
