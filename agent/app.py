"""`Agent`: the dozen-line way to build your own voice agent.

    from agent import Agent, tool

    @tool
    def set_light(room: str, on: bool) -> str:
        "Switch the light of a room."
        return f"{room} light {'on' if on else 'off'}"

    Agent(instructions="You control the lights.", tools=[set_light]).cli()

`cli()` gives the agent the `voice-agent` commands (`serve`, `run FILE…`) with its own
instructions and tools; `run_files` / `runtime` are there for programs and tests.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO

from agent.config import Settings, load_settings


class Agent:
    def __init__(self, instructions: str | None = None, tools: Sequence[Any] = (), *,
                 config: str | None = None, **settings: Any) -> None:
        """`settings` are configuration keys (model="tiny-random", max_new_tokens=64, …)."""
        self.instructions = instructions
        self.tools = list(tools)
        self.config = config
        self.defaults = settings

    def settings(self, **overrides: Any) -> Settings:
        return load_settings(self.config, **{"system_prompt": self.instructions, **self.defaults, **overrides})

    def cli(self, argv: Sequence[str] | None = None, *, description: str | None = None) -> int:
        """`python my_agent.py serve | run FILE…`; `--help` shows `description` (e.g. the
        program's `__doc__`) and this agent's tools."""
        from agent.cli import main

        return main(argv, tools=self.tools, system_prompt=self.instructions, defaults=self.defaults,
                    description=description, prog=None)

    async def run_files(self, paths: Sequence[str], *, instruction: str | None = None, jsonl: bool = False,
                        out: TextIO = sys.stdout, **runtime_options: Any) -> int:
        from agent.filerun import run_files

        return await run_files(self.settings(), paths, instruction=instruction, jsonl=jsonl, out=out,
                               runtime_options={"tools": self.tools, **runtime_options})

    def runtime(self, **runtime_options: Any) -> Any:
        """An `AgentRuntime` with this agent's tools; `await runtime.start()` before use."""
        from agent.runtime import AgentRuntime

        return AgentRuntime(self.settings(), tools=self.tools, **runtime_options)
