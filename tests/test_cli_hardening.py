"""`voice-agent` as a new user meets it: messages, help, exit codes and pipes (issue 15, items 3–6)."""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent import events as ev
from agent.cli import build_parser
from agent.config import load_settings
from agent.transports.files import EXIT_BROKEN_PIPE, EXIT_FAILED_TURNS, run_files
from tests.mosquitto import free_port

ROOT = Path(__file__).resolve().parent.parent
GUARD = 120  # seconds: a hang fails the test instead of stalling the run (not a timing assert)


def voice_agent(*args: str, env: dict[str, str] | None = None, timeout: float = GUARD) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}  # the CLI decides
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**environ, **(env or {})})


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2 and proc.stdout == "", (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_input_mistakes_get_one_clear_line(tmp_path: Path, speech_two) -> None:
    wav = str(speech_two.path)
    line = one_line_error(voice_agent("run", "--model", "/nonexistent", wav))
    assert "/nonexistent: no such directory" in line and "Repo id" not in line
    assert f"{tmp_path}: is a directory" in one_line_error(voice_agent("run", "--model", "tiny-random", str(tmp_path)))
    missing = tmp_path / "agent.yaml"
    line = one_line_error(voice_agent("run", "--config", str(missing), wav))
    assert line == f"voice-agent: {missing}: no such file or directory"  # the path once
    missing.write_text("turns:\n  a: [1\n")
    line = one_line_error(voice_agent("run", "--config", str(missing), wav))
    assert line.startswith(f"voice-agent: {missing}, line 3, column 1: ") and line.count("line") == 1
    line = one_line_error(voice_agent("run", wav, env={"VOICE_AGENT_WORKRES": "2"}))
    assert "VOICE_AGENT_WORKRES (did you mean VOICE_AGENT_WORKERS?)" in line
    text = tmp_path / "notes.wav"
    text.write_text("not audio\n" * 50)
    line = one_line_error(voice_agent("run", "--model", "tiny-random", str(text)))
    assert line == f"voice-agent: {text}: cannot decode audio (invalid data found when processing input)"


def _options(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _options(sub)
        elif not isinstance(action, argparse._HelpAction):
            yield parser.prog, action


def test_every_option_has_help_and_shows_its_default() -> None:
    seen = 0
    for prog, action in _options(build_parser()):
        assert action.help, f"{prog} {action.dest}: no help"
        if action.option_strings:
            assert "default: " in action.help, f"{prog} {action.option_strings}"
            seen += 1
    assert seen >= 12
    # the defaults shown are the real ones, and an agent's own defaults win
    assert "longest answer, in tokens (default: 256)" in _help("run")
    assert "longest answer, in tokens (default: 64)" in _help("run", defaults={"max_new_tokens": 64})
    assert "any free one (default: 8080)" in _help("serve")


def _help(command: str, **kwargs) -> str:
    parser = build_parser(**kwargs)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return " ".join(sub.choices[command].format_help().split())  # unwrapped


@pytest.mark.parametrize("example, expected", [
    ("custom_tools.py", ["A voice agent with two tools.", "set_light(room, on): Switch the light"]),
    ("per_session_state.py", ["shopping-list agent", "add_item(item): Add an item"]),
    ("home_assistant.py", ["Talk to your house", "HassTurnOn"]),
])
def test_an_examples_help_shows_its_description_and_tools(example: str, expected: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "HA_TOKEN"}  # --help needs no token
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / example), "--help"], capture_output=True,
                          text=True, timeout=GUARD, env={**env, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: {example}")
    for text in expected:
        assert text in proc.stdout


def test_a_closed_pipe_stops_the_run_quietly(tmp_path: Path, speech_two) -> None:
    """`voice-agent run --jsonl f.wav | head -1`: the run stops at the next write, no traceback."""
    script = tmp_path / "slow.yaml"  # long, slowly streamed answers: the run outlasts the reader
    script.write_text(f"turns: ['{'word ' * 200}']\ndefault: '{'more ' * 200}'\nchunk: 1\ndelay_s: 0.05\n")
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--backend", "scripted", "--script",
                             str(script), "--jsonl", str(speech_two.path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    proc.stdout.close()  # what `head -1` does after its line
    try:
        _, err = proc.communicate(timeout=GUARD)  # before the fix: never returned, spinning a core
    finally:
        proc.kill()
    assert ev.parse_event(first).type == "session.started"
    assert proc.returncode == EXIT_BROKEN_PIPE and err == "", err


async def test_an_unreachable_openai_server_fails_the_run(speech_two) -> None:
    settings = load_settings(None, backend="openai", openai_url=f"http://127.0.0.1:{free_port()}/v1")
    out = io.StringIO()
    assert await run_files(settings, [str(speech_two.path)], jsonl=True, out=out) == EXIT_FAILED_TURNS
    errors = [e for e in map(ev.parse_event, out.getvalue().splitlines()) if isinstance(e, ev.Error)]
    assert len(errors) == 2 and {e.code for e in errors} == {"backend_unavailable"}


@pytest.mark.slow
def test_weights_progress_bar_only_with_verbose(tmp_path: Path, make_speech_fixture) -> None:
    wav = str(make_speech_fixture([0.3, "hi", 0.5], "bar").path)
    quiet = voice_agent("run", "--model", "tiny-random", "--max-new-tokens", "2", wav)
    assert quiet.returncode == 0, quiet.stderr
    assert "Loading weights" not in quiet.stderr and "it/s" not in quiet.stderr
    loud = voice_agent("run", "-v", "--model", "tiny-random", "--max-new-tokens", "2", wav)
    assert loud.returncode == 0 and "Loading weights" in loud.stderr
