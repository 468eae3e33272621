"""`voice-agent eval SUITE.yaml [--model A --model B …]` and `voice-agent eval --compare A.json B.json`.

With several `--model`s the suite runs on each in turn (one runtime each) and the reports go
side by side: the text summary, `--json` ({"models": [report, …]}) and `--html` (one page).

Exit status: 0 every case passed; 1 a case failed (each named with why; with --compare: a
case that passed in A fails in B); 2 a bad suite, configuration or report, or nothing could start.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_FAILED = 1
EXIT_BAD = 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("suite", nargs="?", metavar="SUITE.yaml", help="the suite to run")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="compare two --json reports instead of running: what got better or worse (default: run the suite)")
    p.add_argument("--json", action="store_true",
                   help="print the JSON report (one object) on stdout, the summary on stderr (default: the summary)")
    p.add_argument("--junit", metavar="FILE", help="JUnit XML for CI systems (default: none)")
    p.add_argument("--html", metavar="FILE", help="an HTML report: table, audio players, latency plots (default: none)")
    p.add_argument("--concurrency", type=int, metavar="N", help="cases at once (default: the suite's, else 4)")


def _load_agent(spec: str, suite_path: Path) -> Any:
    """`FILE.py:NAME` (relative to the suite) or `module:NAME`."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise ValueError(f"agent {spec!r}: expected FILE.py:NAME or module:NAME")
    if target.endswith(".py"):
        path = Path(target) if Path(target).is_absolute() else suite_path.parent / target
        loader = importlib.util.spec_from_file_location(f"_eval_agent_{path.stem}", path)
        if loader is None or loader.loader is None or not path.is_file():
            raise ValueError(f"agent {spec!r}: no file {path}")
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    agent = getattr(module, name, None)
    if agent is None or not hasattr(agent, "runtime_options"):
        raise ValueError(f"agent {spec!r}: {name} is not an agent.Agent")
    return agent


def _settings(args: argparse.Namespace, suite: Any, defaults: dict[str, Any],
              load_cli_settings: Callable[[argparse.Namespace, dict[str, Any]], Any]) -> tuple[Any, bool]:
    """The configuration: the suite's `config:` over the agent's defaults, flags over both
    (`load_cli_settings`: the command line's own loader, handed down by agent.cli).
    Returns (settings, scripted)."""
    config = dict(suite.config)
    for key in ("script", "record"):  # paths in the suite are relative to it
        if isinstance(config.get(key), str):
            config[key] = str(suite.resolve(config[key]))
    merged = {**defaults, **config}
    backend = args.backend or merged.get("backend")
    scripted = backend == "scripted"
    if scripted and not (args.script or merged.get("script")):
        # The cases' own `scripted:` answers stand in for a script file.
        merged["backend"] = "transformers"
        args = argparse.Namespace(**{**vars(args), "backend": None})
    return load_cli_settings(args, merged), scripted


async def _run(args: argparse.Namespace, suite: Any, settings: Any, scripted: bool,
               runtime_options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    from agent.eval.report import summarise
    from agent.eval.run import CaseScriptedBackend, run_suite
    from agent.inference.scripted import load_script
    from agent.runtime import AgentRuntime

    backend = None
    options = dict(runtime_options)
    if scripted:
        backend = CaseScriptedBackend(suite, load_script(settings.script) if settings.script else None)
        options["backend"] = backend
    runtime = AgentRuntime(settings, **options)
    try:
        await runtime.start()
        results, audios = await run_suite(suite, runtime, backend, args.concurrency)
    finally:
        await runtime.close()
    name = "scripted" if scripted else settings.backend
    return summarise(suite.name, results, name, runtime.backend.model_name), audios


def _write(path: str, data: str | bytes) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        p.write_bytes(data)
    else:
        p.write_text(data)


def _compare(args: argparse.Namespace) -> int:
    from agent.eval.report import compare, compare_text

    reports = []
    for path in args.compare:
        try:
            report = json.loads(Path(path).read_text())
            if not isinstance(report, dict) or "cases" not in report or "latency" not in report:
                raise ValueError("not a `voice-agent eval --json` report")
        except (OSError, ValueError) as exc:
            print(f"voice-agent eval: {path}: {exc}", file=sys.stderr)
            return EXIT_BAD
        reports.append(report)
    diff = compare(reports[0], reports[1])
    if args.json:
        print(json.dumps(diff))
    print(compare_text(diff), file=sys.stderr if args.json else sys.stdout)
    return EXIT_FAILED if diff["broken_cases"] else 0


def run_eval(args: argparse.Namespace, load_cli_settings: Callable[[argparse.Namespace, dict[str, Any]], Any], *,
             agent: Any = None) -> int:
    models = args.model if isinstance(args.model, list) else [args.model]
    if len(models) > 1 and not args.compare:
        return _run_models(args, models, load_cli_settings, agent)
    args = argparse.Namespace(**{**vars(args), "model": models[0]})
    return _run_one(args, load_cli_settings, agent)


def _run_models(args: argparse.Namespace, models: list[str], load_cli_settings: Callable[..., Any],
                agent: Any) -> int:
    """The suite on each model in turn; the reports side by side."""
    from agent.eval.models_report import models_html, models_text

    reports: list[dict[str, Any]] = []
    audios: dict[str, Any] = {}
    for model in models:
        # each run's own summary goes to stderr; the side-by-side one is the result
        one = argparse.Namespace(**{**vars(args), "model": model, "json": False, "html": None, "junit": None,
                                    "inner": True})
        status, report, clips = _evaluate(one, load_cli_settings, agent)
        if report is None:
            print(f"voice-agent eval: model {model}: nothing ran", file=sys.stderr)
            return status
        report["model_arg"] = model
        reports.append(report)
        audios = audios or clips
    if args.html:
        _write(args.html, models_html(reports, audios))
    if args.json:
        print(json.dumps({"models": reports}))
    print(models_text(reports), file=sys.stderr if args.json else sys.stdout)
    return EXIT_FAILED if any(r["failed"] for r in reports) else 0


def _run_one(args: argparse.Namespace, load_cli_settings: Callable[..., Any], agent: Any) -> int:
    if args.compare:
        return _compare(args)
    return _evaluate(args, load_cli_settings, agent)[0]


def _evaluate(args: argparse.Namespace, load_cli_settings: Callable[..., Any], agent: Any,
              ) -> tuple[int, dict[str, Any] | None, dict[str, Any]]:
    """Run the suite once: (exit status, its report or None when nothing ran, case audio)."""
    import asyncio

    from agent.config import ConfigError
    from agent.eval.report import html_report, junit_xml, text_report
    from agent.eval.suite import SuiteError, load_suite
    from agent.inference.base import InferenceError

    if not args.suite:
        print("voice-agent eval: give a SUITE.yaml (or --compare A.json B.json)", file=sys.stderr)
        return EXIT_BAD, None, {}
    try:
        suite = load_suite(args.suite)
        if agent is None and suite.agent:
            agent = _load_agent(suite.agent, suite.path)
        defaults = {"system_prompt": agent.instructions, **agent.defaults} if agent is not None else {}
        settings, scripted = _settings(args, suite, defaults, load_cli_settings)
    except (SuiteError, ValueError, ConfigError) as exc:
        print(f"voice-agent eval: {exc}", file=sys.stderr)
        return EXIT_BAD, None, {}
    runtime_options = agent.runtime_options() if agent is not None else {}
    try:
        import jiwer  # noqa: F401
        import matplotlib  # noqa: F401
        import whisper_normalizer  # noqa: F401
    except ImportError as exc:
        print(f"voice-agent eval: {exc.name} is missing: eval needs the `eval` extra (jiwer, whisper-normalizer, "
              "matplotlib): pip install -e '.[eval]' in a checkout (or pip install 'qwen-voice-agent[eval]')",
              file=sys.stderr)
        return EXIT_BAD, None, {}
    try:
        report, audios = asyncio.run(_run(args, suite, settings, scripted, runtime_options))
    except (SuiteError, InferenceError, ValueError, OSError) as exc:
        print(f"voice-agent eval: cannot run: {exc}", file=sys.stderr)
        return EXIT_BAD, None, {}
    if args.junit:
        _write(args.junit, junit_xml(report))
    if args.html:
        _write(args.html, html_report(report, audios))
    if args.json:
        print(json.dumps(report))
    print(text_report(report), file=sys.stderr if args.json or getattr(args, "inner", False) else sys.stdout)
    failed = [r for r in report["cases"] if not r["passed"]]
    if failed:
        print(f"voice-agent eval: {len(failed)} of {report['total']} cases failed: "
              + "; ".join(f"{r['id']}: {r['failures'][0]}" for r in failed), file=sys.stderr)
        return EXIT_FAILED, report, audios
    return 0, report, audios
