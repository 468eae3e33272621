"""A voice agent with two tools.

    python examples/custom_tools.py serve            # talk to it in the browser playground
    python examples/custom_tools.py run speech.wav   # or feed it audio files
"""

from datetime import datetime
from zoneinfo import ZoneInfo

from agent import Agent, tool

LIGHTS: dict[str, bool] = {}


@tool
def set_light(room: str, on: bool) -> str:
    """Switch the light in a room on or off."""
    LIGHTS[room] = on
    return f"the {room} light is {'on' if on else 'off'}"


@tool
async def current_time(timezone: str = "UTC") -> str:
    """The current time in an IANA timezone such as Europe/Paris."""
    return datetime.now(ZoneInfo(timezone)).strftime("%H:%M")


agent = Agent(instructions="You are a friendly home assistant. Use the tools to act.",
              tools=[set_light, current_time], description=__doc__)

if __name__ == "__main__":
    raise SystemExit(agent.cli())
