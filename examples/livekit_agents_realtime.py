"""A livekit-agents worker whose brain is Qwen2-Audio, through our pipeline.

    export LIVEKIT_URL=wss://… LIVEKIT_API_KEY=… LIVEKIT_API_SECRET=…
    python examples/livekit_agents_realtime.py dev

The model hears the caller's audio directly (no STT) and answers in text; give the session
a TTS plugin (`tts=`) to speak the answers, without one they reach the room as text
(transcription stream). `VOICE_AGENT_*` settings apply (`VOICE_AGENT_BACKEND=openai`,
`VOICE_AGENT_OPENAI_URL=…` to use a vLLM server instead of the local worker pool).
"""

from __future__ import annotations

import os
from livekit.agents import (Agent, AgentSession, JobContext, JobProcess, RunContext, WorkerOptions, cli,
                            function_tool, room_io)

from plugins.livekit.realtime import QwenRealtimeModel

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


def build_model() -> QwenRealtimeModel:
    return QwenRealtimeModel(model=os.environ.get("VOICE_AGENT_MODEL", "Qwen/Qwen2-Audio-7B-Instruct"))


def prewarm(proc: JobProcess) -> None:
    # One model per worker process: its runtime (VAD + inference pool) starts with the first
    # job and serves every later job of this process, which keeps one event loop.
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
