"""A livekit-agents worker whose brain is Qwen2-Audio, through our pipeline.

    voice-agent serve-model --model Qwen/Qwen2-Audio-7B-Instruct --listen unix://$XDG_RUNTIME_DIR/voice-agent/model.sock
    export LIVEKIT_URL=wss://… LIVEKIT_API_KEY=… LIVEKIT_API_SECRET=…
    python examples/livekit_agents_realtime.py dev

`QWEN_OPENAI_URL` points the jobs elsewhere: another socket, `http://host:8000/v1` for a
pool server on another machine (then with `QWEN_OPENAI_API_KEY`, a token of its `--token-file`), or a vLLM
server (`vllm serve Qwen/Qwen2-Audio-7B-Instruct --limit-mm-per-prompt '{"audio": 5}'
--enable-prefix-caching`) — the same wire.

The model hears the caller's audio directly (no STT) and answers in text; give the session
a TTS plugin (`tts=`) to speak the answers, without one they reach the room as text
(transcription stream).

livekit-agents runs every job (room) in a process of its own, so the 7B model lives in one
shared model server — our inference pool behind `voice-agent serve-model`, reached by our
`openai` backend — not in each job process: every job's turns are batched together on the
one GPU pool, and each conversation's KV stays there between its turns (the session id is
its conversation key; the job's end frees it). The job process keeps the VAD, turns and
the conversation. Workers scale out: each registers with the LiveKit server, which
dispatches rooms across them.
"""

from __future__ import annotations

import os

from livekit.agents import (
    Agent,
    AgentSession,
    JobContext,
    JobProcess,
    RunContext,
    WorkerOptions,
    cli,
    function_tool,
    room_io,
)

from agent.integrations.livekit_agents import QwenRealtimeModel

LIGHTS: dict[str, bool] = {}


@function_tool
async def set_light(context: RunContext, room: str, on: bool) -> str:
    """Switch the light in a room on or off.

    Args:
        room: the room, e.g. "kitchen"
        on: true to switch the light on, false to switch it off
    """
    LIGHTS[room] = on
    return f"the {room} light is {'on' if on else 'off'}"


def build_agent() -> Agent:
    return Agent(instructions="You are a friendly home assistant. Answer in one or two short sentences.",
                 tools=[set_light])


# `voice-agent serve-model --listen` it: a private directory (the server refuses one others can
# write, such as /tmp itself, since the socket needs no token).
MODEL_SERVER = f"unix://{os.environ.get('XDG_RUNTIME_DIR') or os.path.expanduser('~/.cache')}/voice-agent/model.sock"


def build_model() -> QwenRealtimeModel:
    return QwenRealtimeModel(backend="openai", openai_url=os.environ.get("QWEN_OPENAI_URL", MODEL_SERVER),
                             openai_api_key=os.environ.get("QWEN_OPENAI_API_KEY"))


def prewarm(proc: JobProcess) -> None:
    # Settings are validated here, while the process waits for a job; the runtime (VAD and
    # the model server's client) starts with the job.
    proc.userdata["model"] = build_model()


async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()
    session = AgentSession(llm=ctx.proc.userdata["model"])  # add tts=… to speak the answers
    # Without a TTS the answers go out as text, so the session publishes no audio track.
    await session.start(agent=build_agent(), room=ctx.room, room_options=room_io.RoomOptions(audio_output=False))


def worker_options() -> WorkerOptions:
    return WorkerOptions(entrypoint_fnc=entrypoint, prewarm_fnc=prewarm)


if __name__ == "__main__":
    cli.run_app(worker_options())
