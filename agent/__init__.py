"""qwen-voice-agent: an asynchronous voice-agent framework built around Qwen2-Audio.

    from agent import Agent, tool

Importing has no side effects: models and services load when an agent starts.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.app import Agent
    from agent.tools import tool

__all__ = ["Agent", "tool"]


def __getattr__(name: str) -> Any:
    # Lazy: `import agent.events` must not pull in torch.
    if name == "Agent":
        from agent.app import Agent

        return Agent
    if name == "tool":
        from agent.tools import tool

        return tool
    raise AttributeError(name)
