r"""A voice agent in a LiveKit room: everyone who speaks there gets their own session.

    LIVEKIT_URL=ws://127.0.0.1:7880 LIVEKIT_API_KEY=devkey LIVEKIT_API_SECRET=secret \
        .venv/bin/python examples/livekit_room.py [ROOM]

Answers appear in LiveKit clients as transcriptions (`lk.transcription`); every event is a
JSON data packet on `voice-agent.events`, commands go to `voice-agent.commands`.
"""

import argparse
import asyncio
import os
import signal
import sys

from agent import Agent


def build(room: str = "voice-agent") -> Agent:
    livekit = {"url": os.environ.get("LIVEKIT_URL", "ws://127.0.0.1:7880"), "room": room,
               "api_key": os.environ.get("LIVEKIT_API_KEY", "devkey"),
               "api_secret": os.environ.get("LIVEKIT_API_SECRET", "secret")}
    return Agent(instructions="You are a friendly voice assistant in a LiveKit room.", plugins={"livekit": livekit})


async def serve(agent: Agent) -> int:
    runtime = agent.runtime()  # no HTTP server: the room is the only way in
    try:
        await runtime.start()
        if "livekit" in runtime.plugins.failed:  # the host disabled it; without it there is nothing to do
            print(f"livekit_room: {runtime.plugins.failed['livekit']}", file=sys.stderr)
            return 2
        print("livekit_room: in the room; Ctrl-C to leave", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        return 0
    finally:
        await runtime.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("room", nargs="?", default="voice-agent", help="the room to join (default: voice-agent)")
    raise SystemExit(asyncio.run(serve(build(parser.parse_args().room))))
