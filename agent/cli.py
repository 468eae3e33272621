"""`voice-agent`: serve | run | schema | bench."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import sys
from typing import Any, Sequence

BENCHMARKS = ("vad", "inference", "webrtc", "livekit", "mqtt", "soak")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML configuration file")
    p.add_argument("--model", help="auto | tiny-random | random-7b | HUB_ID | PATH (default auto)")
    p.add_argument("--backend", choices=["transformers", "openai"], help="inference backend")
    p.add_argument("--openai-url", help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (vLLM)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--system-prompt")
    p.add_argument("-v", "--verbose", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voice-agent", description="Qwen2-Audio voice agent")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="HTTP server: playground, WebRTC, WHIP, events, metrics")
    _common(serve)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)

    run = sub.add_parser("run", help="run the pipeline over audio files, faster than real time")
    _common(run)
    run.add_argument("files", nargs="+", metavar="FILE")
    run.add_argument("--jsonl", action="store_true", help="one event JSON object per line")
    run.add_argument("--instruction", help="attach this instruction to every turn (audio analysis mode)")

    sub.add_parser("schema", help="print the JSON Schema of all events and commands")

    bench = sub.add_parser("bench", help="benchmarks (ratios measured side by side)")
    bench.add_argument("name", choices=BENCHMARKS)
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark (--json, …)")
    return parser


def load_cli_settings(args: argparse.Namespace, defaults: dict[str, Any] | None = None) -> Any:
    from agent.config import load_settings

    overrides: dict[str, Any] = {**(defaults or {})}
    overrides |= {k: v for k, v in {
        "model": args.model, "backend": args.backend, "openai_url": args.openai_url,
        "max_new_tokens": args.max_new_tokens, "system_prompt": args.system_prompt,
    }.items() if v is not None}
    settings = load_settings(args.config, **overrides)
    if getattr(args, "host", None) is not None:
        settings.server.host = args.host
    if getattr(args, "port", None) is not None:
        settings.server.port = args.port
    return settings


def main(argv: Sequence[str] | None = None, *, agent: Any = None) -> int:
    """The `voice-agent` command; `agent.Agent.cli()` calls it with itself (tools, prompt, hooks)."""
    if agent is None:
        from agent.app import Agent

        agent = Agent()
    system_prompt, defaults = agent.instructions, agent.defaults
    args = build_parser().parse_args(argv)
    if args.command == "schema":
        from agent.events import json_schema

        print(json.dumps(json_schema(), indent=2))
        return 0
    if args.command == "bench":
        module = importlib.import_module(f"benchmarks.{args.name}")
        return int(module.main(args.args) or 0)

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from agent.config import ConfigError

    try:
        settings = load_cli_settings(args, {"system_prompt": system_prompt, **(defaults or {})})
    except ConfigError as exc:
        print(f"voice-agent: {exc}", file=sys.stderr)
        return 2
    if args.command == "run":
        from agent.transports.files import run_files

        return asyncio.run(run_files(settings, args.files, instruction=args.instruction, jsonl=args.jsonl,
                                     runtime_options=agent.runtime_options()))
    try:
        from agent.server.app import serve
    except ImportError:
        print("voice-agent: serve is not available yet (the HTTP/WebRTC server is not built); "
              "use `voice-agent run FILE`", file=sys.stderr)
        return 2
    return asyncio.run(serve(settings, runtime_options=agent.runtime_options()))


if __name__ == "__main__":
    sys.exit(main())
