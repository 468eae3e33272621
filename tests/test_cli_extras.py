"""What a new user meets after `make demo`, which installs only the `server` extra (issue 27,
item 4): a command that needs another extra says which and how to install it, with a nonzero exit
and no traceback; an agent script works without a `__main__` guard and exits with its status."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.test_cli_hardening import GUARD, ROOT, one_line_error


def without(tmp_path: Path, *packages: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    """`python -m agent.cli ARGS` as if `packages` were not installed."""
    shim = tmp_path / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text("import sys\n" + "".join(f"sys.modules[{p!r}] = None\n" for p in packages))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), str(ROOT)]), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True,
                          timeout=GUARD, env=env, cwd=ROOT)


def test_serve_wyoming_without_the_extra_names_it(tmp_path: Path) -> None:
    line = one_line_error(without(tmp_path, "wyoming", args=["serve", "--wyoming", "tcp://127.0.0.1:0",
                                                             "--model", "no-such-org/no-such-model", "--port", "0"]))
    assert "the `wyoming` extra" in line and "pip install -e '.[wyoming]'" in line, line


def test_eval_without_the_extra_names_it(tmp_path: Path) -> None:
    line = one_line_error(without(tmp_path, "jiwer", args=["eval", "examples/eval/smoke.yaml", "--backend", "scripted"]))
    assert "jiwer is missing" in line and "pip install -e '.[eval]'" in line, line


AGENT = '''
from agent import Agent, RunContext, tool

@tool
def add_item(ctx: RunContext, item: str) -> str:
    """Add an item to the shopping list."""
    return item

Agent(instructions="You keep the shopping list.", tools=[add_item], model="tiny-random", max_new_tokens=4).cli()
'''


def test_an_agent_script_needs_no_main_guard_and_exits_with_its_status(tmp_path: Path, speech_two) -> None:
    script = tmp_path / "my_agent.py"
    script.write_text(AGENT)  # no `if __name__ == "__main__":`: the workers are spawned processes
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run([sys.executable, str(script), "run", str(speech_two.path)], capture_output=True, text=True,
                        timeout=GUARD * 2, env=env)
    assert ok.returncode == 0 and "Traceback" not in ok.stderr, ok.stderr
    assert "user turn" in ok.stdout, ok.stdout
    bad = subprocess.run([sys.executable, str(script), "run", str(tmp_path / "missing.wav")], capture_output=True,
                         text=True, timeout=GUARD, env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
