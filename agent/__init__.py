"""qwen-voice-agent: an asynchronous voice-agent framework built around Qwen2-Audio.

    from agent import Agent, RunContext, tool

Importing has no side effects: models and services load when an agent starts.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.app import Agent
    from agent.context import RunContext, UserTurn
    from agent.tools import tool

__all__ = ["Agent", "RunContext", "UserTurn", "tool"]

_LAZY = {"Agent": "agent.app", "RunContext": "agent.context", "UserTurn": "agent.context", "tool": "agent.tools"}


def __getattr__(name: str) -> Any:
    # Lazy: `import agent.events` must not pull in torch.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
