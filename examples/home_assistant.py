"""Talk to your house: a voice agent that controls Home Assistant.

    export HA_URL=http://homeassistant.local:8123
    export HA_TOKEN=<long-lived access token>   # Home Assistant → your profile → Security
    python examples/home_assistant.py serve            # speak in the browser playground
    python examples/home_assistant.py run command.wav  # or feed it audio files

No GPU? `--backend scripted --script examples/scripts/home_assistant.yaml` replays a scripted
tool call instead of running the model; the call still goes to your Home Assistant.

The agent gets HassTurnOn / HassTurnOff / HassLightSet / HassClimateSetTemperature /
HassGetState for the allowed domains, and the current states in its system prompt.
"""

import os
import sys

from agent import Agent


def home_assistant_agent(url: str, token: str, domains: tuple[str, ...] = ("light", "switch", "fan", "climate")) -> Agent:
    return Agent(
        instructions="You are the voice of this house. Use the Home Assistant tools to act, "
                     "then say in one short sentence what you did.",
        plugins={"homeassistant": {"url": url, "token": token, "allow_domains": list(domains)}},
        description=__doc__,
    )


if __name__ == "__main__":
    token = os.environ.get("HA_TOKEN", "")
    if not token and not {"-h", "--help"} & set(sys.argv[1:]):
        print("home_assistant.py: set HA_TOKEN to a long-lived access token (and HA_URL to your Home Assistant)",
              file=sys.stderr)
        sys.exit(2)
    agent = home_assistant_agent(os.environ.get("HA_URL", "http://homeassistant.local:8123"), token)
    sys.exit(agent.cli())
