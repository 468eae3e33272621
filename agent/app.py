"""`Agent`: the dozen-line way to build your own voice agent.

    from agent import Agent, RunContext, tool

    @tool
    def set_light(ctx: RunContext, room: str, on: bool) -> str:
        "Switch the light of a room."
        ctx.userdata[room] = on
        return f"{room} light {'on' if on else 'off'}"

    class Home(Agent):
        def create_userdata(self):
            return {}

        async def on_user_turn(self, ctx, turn):
            ...  # change turn.instruction, turn.skip(), or return a text to answer directly

    Home(instructions="You control the lights.", tools=[set_light]).cli()

Hooks (`on_session_started`, `on_user_turn`, `on_response`, `on_tool_result`, `on_feedback`,
`on_session_ended`) are methods to override; each gets the session's `RunContext`
(`session_id`, `userdata`, `conversation`, `say`, `emit`, `update_instructions`,
`update_tools`). `cli()` gives the agent the `voice-agent` commands (`serve`, `run FILE…`);
`run_files` / `runtime` are there for programs and tests.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO

from agent.config import Settings, load_settings
from agent.context import AgentHooks


class Agent(AgentHooks):
    def __init__(self, instructions: str | None = None, tools: Sequence[Any] = (), *,
                 config: str | None = None, description: str | None = None, **settings: Any) -> None:
        """`settings` are configuration keys (model="tiny-random", max_new_tokens=64, …);
        `description` is what `--help` says of this agent (default: its class docstring)."""
        self.instructions = instructions
        self.tools = list(tools)
        self.config = config
        self.description = description
        self.defaults = settings

    def settings(self, **overrides: Any) -> Settings:
        return load_settings(self.config, **{"system_prompt": self.instructions, **self.defaults, **overrides})

    def cli(self, argv: Sequence[str] | None = None) -> int:
        """The `voice-agent` commands for this agent. From the command line (`argv` None) it
        exits with the command's status; with `argv` it returns it (programs, tests).

        The inference workers are spawned processes that import the script's main module
        again (as `__mp_main__`): there `cli()` does nothing, so a script needs no
        `if __name__ == "__main__":` guard (one does no harm)."""
        if _spawned_child_importing_main():
            return 0
        from agent.cli import main

        status = main(argv, agent=self)
        if argv is None:
            sys.exit(status)
        return status

    async def run_files(self, paths: Sequence[str], *, instruction: str | None = None, jsonl: bool = False,
                        out: TextIO = sys.stdout, **runtime_options: Any) -> int:
        from agent.transports.files import run_files

        return await run_files(self.settings(), paths, instruction=instruction, jsonl=jsonl, out=out,
                               runtime_options=self.runtime_options(**runtime_options))

    def runtime_options(self, **overrides: Any) -> dict[str, Any]:
        """What an `AgentRuntime` needs of this agent: its tools and its hooks."""
        return {"tools": self.tools, "hooks": self, **overrides}

    def runtime(self, **runtime_options: Any) -> Any:
        """An `AgentRuntime` with this agent's tools and hooks; `await runtime.start()` before use."""
        from agent.runtime import AgentRuntime

        return AgentRuntime(self.settings(), **self.runtime_options(**runtime_options))


def _spawned_child_importing_main() -> bool:
    """True while a `multiprocessing` spawned child is still starting: it re-runs the parent's
    script (as `__mp_main__`) to unpickle its target. multiprocessing's own "bootstrapping
    phase" check reads the same flag."""
    import multiprocessing

    return bool(getattr(multiprocessing.current_process(), "_inheriting", False))
