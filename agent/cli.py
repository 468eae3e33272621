"""`voice-agent`: serve | run | eval | data | export | schema | model | bench."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

BENCHMARKS = ("vad", "inference", "webrtc", "livekit", "tts", "mqtt", "soak", "turns", "model_server", "latency", "bargein", "restart")
DESCRIPTION = "Qwen2-Audio voice agent: audio in, text answers and tool calls out."


def _default(defaults: dict[str, Any], key: str) -> str:
    """The value a setting has when the flag is not given (an agent's own defaults first;
    a config file or VOICE_AGENT_* variable may still change it)."""
    from agent.config import Settings

    value = defaults.get(key, Settings.model_fields[key].default)
    return "none" if value is None else str(value)


def _common(p: argparse.ArgumentParser, defaults: dict[str, Any], many_models: bool = False) -> None:
    d = lambda key: _default(defaults, key)  # noqa: E731
    p.add_argument("--config", metavar="FILE", help="YAML configuration file; VOICE_AGENT_* variables and "
                   "these flags override it (default: none)")
    p.add_argument("--model", action="append" if many_models else "store",
                   help="auto (the real model on a GPU, else tiny-random) | tiny-random | random-7b | "
                   "tiny-random-qwen2.5-omni | tiny-random-voxtral | HUB_ID | DIRECTORY"
                   + ("; repeat it to run the suite on each model, side by side" if many_models else "")
                   + f" (default: {d('model')})")
    p.add_argument("--backend", choices=["transformers", "openai", "scripted"],
                   help="transformers: local worker processes; openai: an OpenAI-compatible server (vLLM); "
                   f"scripted: replay the answers of --script, no model (default: {d('backend')})")
    p.add_argument("--script", metavar="FILE.yaml", help="answers for --backend scripted, one entry per turn, "
                   f"tool calls included (default: {d('script')})")
    p.add_argument("--openai-url", metavar="URL", help="the OpenAI-compatible server for --backend openai "
                   f"(default: {d('openai_url')})")
    p.add_argument("--openai-model", metavar="NAME", help="the model to ask the --openai-url server for "
                   "(default: the one model it serves)")
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help=f"longest answer, in tokens (default: {d('max_new_tokens')})")
    prompt = "the agent's instructions" if defaults.get("system_prompt") else "the model's own"
    p.add_argument("--system-prompt", metavar="TEXT", help=f"the system prompt (default: {prompt})")
    p.add_argument("--tts", metavar="ENGINE", help="speak answers: espeak | piper | openai | none "
                   f"(default: {(defaults.get('tts') or {}).get('engine', 'none')})")
    p.add_argument("--tts-voice", metavar="VOICE", help="the TTS engine's voice: espeak name, Piper .onnx path, "
                   "server voice (default: the engine's own)")
    p.add_argument("--record", metavar="DIR", help="record every turn (the user's audio, the prompt history, the "
                   "answer, tool calls, feedback) into DIR: it stores people's voices (default: off)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log progress at INFO, with model loading progress bars (default: warnings only)")


def build_parser(*, description: str | None = None, prog: str | None = "voice-agent",
                 tools: Sequence[Any] = (), defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    defaults = defaults or {}
    parser = argparse.ArgumentParser(prog=prog, description=description or DESCRIPTION, epilog=_tools_text(tools),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="HTTP server: playground, WebRTC, WHIP, events, metrics",
                           description="Serve the browser playground at /, WebRTC and WHIP sessions, "
                           "WebSocket events, /healthz and /metrics.")
    _common(serve, defaults)
    server = defaults.get("server") or {}
    serve.add_argument("--host", help=f"address to listen on (default: {server.get('host', '127.0.0.1')})")
    serve.add_argument("--port", type=_port, help=f"port to listen on, 0: any free one (default: {server.get('port', 8080)})")
    serve.add_argument("--wyoming", metavar="URI", help="also serve the Wyoming protocol (Home Assistant), "
                       f"e.g. tcp://0.0.0.0:10300 (default: {_default(defaults, 'wyoming')})")
    serve.add_argument("--no-http", action="store_true",
                       help="no HTTP server, e.g. only --wyoming (default: HTTP on)")
    serve.add_argument("--processes", type=_positive, metavar="N", help="media frontend processes around one model "
                       "server; 1: a single process (default: the cores available, at most 8)")

    run = sub.add_parser("run", help="run the pipeline over audio files, faster than real time",
                         description="Each file is one session, fed faster than real time; the transcript "
                         "(or, with --jsonl, every event) goes to stdout. Exit status: 0 ok, 1 some turn "
                         "failed, 2 bad input or nothing could start, 3 a file had no speech in it.")
    _common(run, defaults)
    run.add_argument("files", nargs="+", metavar="FILE", help="audio files, any format FFmpeg reads")
    run.add_argument("--jsonl", action="store_true",
                     help="print every event as one JSON object per line (default: a readable transcript)")
    run.add_argument("--instruction", metavar="TEXT", help="attach this instruction to every turn: audio "
                     "analysis instead of voice chat (default: none)")
    run.add_argument("--speak-dir", metavar="DIR", help="with --tts: write each spoken answer as DIR/<turn_id>.wav "
                     "(default: none)")

    evaluate = sub.add_parser("eval", help="run an evaluation suite: pass/fail per case, WER, tool-call accuracy, "
                              "latency", description="Run a suite of audio cases through the live pipeline and "
                              "check what happens. Exit status: 0 all passed, 1 a case failed, 2 bad input.")
    _common(evaluate, defaults, many_models=True)
    from agent.eval.cli import add_arguments

    add_arguments(evaluate)

    data = sub.add_parser("data", help="recordings (--record DIR): list sessions, delete them",
                          description="List or delete what --record DIR stored (people's voices).")
    actions = data.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="the recorded sessions: id, start, turns, ratings, model")
    deleting = actions.add_parser("delete", help="remove sessions' recordings: rows and audio files")
    deleting.add_argument("sessions", nargs="+", metavar="SESSION", help="session ids (see `data list`)")
    for p in (listing, deleting):
        p.add_argument("--dir", metavar="DIR", help="the recording (default: `record` of --config or VOICE_AGENT_RECORD)")
        p.add_argument("--config", metavar="FILE", help="YAML configuration file (default: none)")

    export = sub.add_parser("export", help="recorded feedback as training data (dpo pairs, sft rows)",
                            description="Turn a recording's rated answers into training rows: dpo (rated down "
                            "vs. its correction, or an answer rated up to the same audio) or sft (rated up).")
    export.add_argument("kind", choices=["dpo", "sft"], help="preference pairs or supervised rows")
    export.add_argument("dir", metavar="DIR", help="the recording (what --record DIR wrote)")
    export.add_argument("out", metavar="OUT", help="output directory")
    export.add_argument("--format", required=True, choices=["llamafactory", "ms-swift"], help="the trainer's row format (default: none, required)")
    export.add_argument("--with-corrections", action="store_true",
                        help="sft: corrections of answers rated down are rows too (default: only answers rated up)")
    model = sub.add_parser("serve-model", help="the inference pool as an OpenAI-compatible model server",
                           description="Serve the inference pool (workers, batching, KV reuse) on the OpenAI "
                           "chat-completions wire, for `--backend openai --openai-url URL` clients: "
                           "POST /v1/chat/completions, /v1/models, /healthz, /metrics.")
    _model_server_options(model, defaults)

    sub.add_parser("schema", help="print the JSON Schema of all events and commands",
                   description="Print the JSON Schema of all events and commands.")

    model = sub.add_parser("model", help="model checkpoints: save one to a directory; the families",
                           description="Save a model (the tiny random ones included) as a checkpoint directory "
                           "that a server of its family loads, e.g. vLLM: `voice-agent model save tiny-random DIR`.")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    save = model_sub.add_parser("save", help="write config, weights, tokenizer, processor and chat template to DIR")
    save.add_argument("name", help="tiny-random | tiny-random-qwen2.5-omni | tiny-random-voxtral | random-7b | "
                      "HUB_ID | DIRECTORY")
    save.add_argument("directory", metavar="DIR", help="where to write it (new or empty)")
    model_sub.add_parser("families", help="the supported model families side by side (a markdown table)")

    bench = sub.add_parser("bench", help="benchmarks (ratios measured side by side)",
                           description="Benchmarks that print side-by-side ratios; --json for one JSON line.")
    bench.add_argument("name", choices=BENCHMARKS, help="which benchmark")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark (--json, …; default: none)")
    return parser


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _model_server_options(p: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    d = lambda key: _default(defaults, key)  # noqa: E731
    p.add_argument("--config", metavar="FILE", help="YAML configuration file; VOICE_AGENT_* variables and "
                   "these flags override it (default: none)")
    p.add_argument("--model", help=f"as for serve (default: {d('model')})")
    p.add_argument("--workers", type=int, metavar="N", help="worker processes (default: one per GPU, else 1)")
    p.add_argument("--max-batch", type=int, metavar="N", help=f"requests decoded together per worker "
                   f"(default: {d('max_batch')})")
    p.add_argument("--max-queue", type=int, metavar="N", help=f"requests in flight before HTTP 429 "
                   f"(default: {d('max_queue')})")
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help=f"answer length when a request gives no max_tokens (default: {d('max_new_tokens')})")
    p.add_argument("--listen", metavar="URI", help="tcp://HOST:PORT or unix:///PATH "
                   "(default: tcp://127.0.0.1:8000, model_server.listen)")
    p.add_argument("--token-file", metavar="FILE", help="bearer tokens clients must send, one per line, each "
                   "client's conversations its own; required beyond loopback (default: none, model_server.token_file; "
                   "or VOICE_AGENT_MODEL_SERVER__TOKEN)")
    p.add_argument("--token", help="deprecated: a token on the command line is visible to every user in `ps`; "
                   "use --token-file or VOICE_AGENT_MODEL_SERVER__TOKEN (default: none)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO (default: warnings only)")
    p.set_defaults(backend=None, script=None, openai_url=None, system_prompt=None)  # not a model server's


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port: write 1 to 65535, or 0 for any free one")
    return port


def _missing_extra(settings: Any) -> str | None:
    """What `serve` needs that is not installed, said with how to install it (before any model loads)."""
    import importlib.util

    if settings.wyoming and importlib.util.find_spec("wyoming") is None:
        return ("--wyoming needs the wyoming package, the `wyoming` extra: pip install -e '.[wyoming]' in a "
                "checkout (or pip install 'qwen-voice-agent[wyoming]')")
    return None


def _tools_text(tools: Sequence[Any]) -> str | None:
    if not tools:
        return None
    lines = ["tools:"]
    for t in tools:
        name = getattr(t, "name", None) or getattr(t, "__name__", repr(t))
        params = ", ".join((getattr(t, "parameters", None) or {}).get("properties", {}))
        description = getattr(t, "description", None) or ""
        lines.append(f"  {name}({params})" + (f": {description}" if description else ""))
    return "\n".join(lines)


def load_cli_settings(args: argparse.Namespace, defaults: dict[str, Any] | None = None) -> Any:
    from agent.config import load_settings

    overrides: dict[str, Any] = {**(defaults or {})}
    overrides |= {k: v for k, v in {
        "model": args.model, "backend": args.backend, "script": args.script, "openai_url": args.openai_url,
        "openai_model": getattr(args, "openai_model", None),
        "max_new_tokens": args.max_new_tokens, "system_prompt": args.system_prompt,
        "wyoming": getattr(args, "wyoming", None), "record": getattr(args, "record", None),
        "workers": getattr(args, "workers", None), "max_batch": getattr(args, "max_batch", None),
        "max_queue": getattr(args, "max_queue", None),
    }.items() if v is not None}
    tts = getattr(args, "tts", None)
    voice = getattr(args, "tts_voice", None)
    if tts is not None or voice is not None:
        # Merged over the file's `tts:` section (the flag wins for the keys it names).
        from agent.config import read_yaml_section

        section = dict(read_yaml_section(args.config, "tts"))
        overrides["tts"] = section | {k: v for k, v in {"engine": tts, "voice": voice}.items() if v is not None}
    settings = load_settings(args.config, **overrides)
    if getattr(args, "host", None) is not None:
        settings.server.host = args.host
    if getattr(args, "port", None) is not None:
        settings.server.port = args.port
    if getattr(args, "no_http", False):
        settings.server.http = False
    if getattr(args, "processes", None) is not None:
        settings.server.processes = args.processes
    return settings


def main(argv: Sequence[str] | None = None, *, agent: Any = None) -> int:
    """The `voice-agent` command; `agent.Agent.cli()` calls it with itself (tools, prompt,
    hooks, description), and `--help` then names the program and shows its tools."""
    system_prompt, defaults = (agent.instructions, agent.defaults) if agent is not None else (None, {})
    runtime_options: dict[str, Any] = agent.runtime_options() if agent is not None else {}
    defaults = {"system_prompt": system_prompt, **defaults}
    if agent is not None:
        description = agent.description or type(agent).__doc__
        parser = build_parser(description=description, prog=None, tools=agent.tools, defaults=defaults)
    else:
        parser = build_parser(defaults=defaults)
    args = parser.parse_args(argv)
    if args.command == "schema":
        from agent.events import json_schema
        from agent.transports.files import silence_broken_pipe

        try:
            print(json.dumps(json_schema(), indent=2), flush=True)
        except BrokenPipeError:  # `| head`: the reader has what it wanted
            silence_broken_pipe(sys.stdout)
        return 0
    if args.command == "model":
        from agent.inference.models import ModelLoadError, save

        if args.model_command == "families":
            from agent.model.family import markdown_table

            print(markdown_table())
            return 0
        try:
            print(save(args.name, args.directory))
        except ModelLoadError as exc:
            print(f"voice-agent: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "bench":
        module = importlib.import_module(f"agent.bench.{args.name}")
        return int(module.main(args.args) or 0)
    if args.command in ("data", "export"):
        from agent.record.cli import run_data, run_export

        return run_data(args) if args.command == "data" else run_export(args)

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.verbose:
        # Weight-loading progress bars (transformers, huggingface_hub) in this process and
        # the inference workers, which inherit the environment; a user's own setting wins.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if args.command == "eval":  # the suite's own configuration joins in: it loads the settings itself
        from agent.eval.cli import run_eval

        return run_eval(args, load_cli_settings, agent=agent)
    from agent.config import ConfigError

    try:
        settings = load_cli_settings(args, defaults)
    except ConfigError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
    if args.command == "run":
        from agent.transports.files import run_files

        if args.speak_dir and settings.tts.engine == "none":
            print("voice-agent: --speak-dir needs a TTS engine (--tts espeak, or tts.engine in the config)",
                  file=sys.stderr)
            return 2
        return asyncio.run(run_files(settings, args.files, instruction=args.instruction, jsonl=args.jsonl,
                                     runtime_options=runtime_options, speak_dir=args.speak_dir))
    if args.command == "serve-model":
        from agent.server.model_server import run_model_server

        if args.token:
            print("voice-agent: warning: --token is visible to every user of this machine (ps); use --token-file "
                  "or VOICE_AGENT_MODEL_SERVER__TOKEN", file=sys.stderr)
        return asyncio.run(run_model_server(settings, args.listen, args.token, token_file=args.token_file))
    missing = _missing_extra(settings)
    if missing:
        print(f"voice-agent: {missing}", file=sys.stderr)
        return 2
    from agent.server.frontends import serve_processes

    return serve_processes(settings, runtime_options, config=args.config)


if __name__ == "__main__":
    sys.exit(main())
