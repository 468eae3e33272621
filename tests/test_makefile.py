"""The Makefile on a fresh checkout (issue 22), with a stand-in interpreter so nothing is
installed: the virtual environment's `bin/python` is a symlink to the "system" interpreter, as
`python3 -m venv` makes it, and the Makefile must never touch that file; `make demo`'s install
is the package with its server extra only, one short line per step, the output in a log."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OLD = 946684800  # 2000-01-01: the system interpreter's mtime, which must stay as it is

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    system = tmp_path / "system"
    system.mkdir()
    # The "system interpreter": records what it is asked (pip installs), fails on request.
    interp = system / "python3.11"
    interp.write_text('#!/bin/sh\necho "$@" >> "$CALLS"\n'
                      'if [ -n "$FAIL" ]; then echo "pip: error: resolution impossible"; exit 1; fi\n'
                      'echo "Collecting torch... Downloading... Installing..."\n')
    # `python3 -m venv DIR`, as the real one does it: DIR/bin/python is a symlink.
    python3 = system / "python3"
    python3.write_text(f'#!/bin/sh\nmkdir -p "$3/bin" && ln -sf {interp} "$3/bin/python"\n')
    for script in (interp, python3):
        script.chmod(0o755)
    os.utime(interp, (OLD, OLD))
    return tmp_path


def make(checkout: Path, *targets: str, fail: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CALLS": str(checkout / "calls"), **({"FAIL": "1"} if fail else {})}
    # No apt here: empty package lists (CI's `make test` installs them for real).
    return subprocess.run(["make", "-C", str(checkout), f"PYTHON={checkout / 'system' / 'python3'}",
                           "APT_PACKAGES=", "DEMO_APT_PACKAGES=", *targets],
                          capture_output=True, text=True, timeout=60, env=env)


def calls(checkout: Path) -> list[str]:
    path = checkout / "calls"
    return path.read_text().splitlines() if path.exists() else []


def test_the_demo_installs_only_what_it_needs_and_never_touches_the_system_interpreter(checkout: Path) -> None:
    out = make(checkout, ".venv/.pip-stamp")  # what `make demo` installs before serving
    assert out.returncode == 0, out.stdout + out.stderr
    assert (checkout / "system" / "python3.11").stat().st_mtime == OLD  # the symlink was not followed
    installs = calls(checkout)
    assert any(c.endswith('-e .[server]') for c in installs), installs
    assert not any("[test]" in c for c in installs), installs  # no test extras for a demo
    lines = out.stdout.strip().splitlines()
    assert len(lines) <= 4 and not any("Collecting" in line for line in lines), out.stdout
    assert "Collecting torch" in (checkout / ".venv" / "install.log").read_text()  # the full output

    again = make(checkout, ".venv/.pip-stamp")  # stamps are ours and newer: nothing to redo
    assert again.returncode == 0 and calls(checkout) == installs, again.stdout

    make(checkout, "setup")  # the test extras come with `make setup` / `make test`
    assert calls(checkout)[-1].endswith("-e .[test]")


def test_a_failed_install_shows_the_log_tail_and_where_the_full_log_is(checkout: Path) -> None:
    out = make(checkout, ".venv/.pip-stamp", fail=True)
    assert out.returncode != 0
    assert "resolution impossible" in out.stdout and ".venv/install.log" in out.stdout, out.stdout


def test_readme_commands_work_as_written_after_make() -> None:
    """Stock Debian has no `python`, and outside the venv `agent` cannot be imported: a command
    that runs a script names the venv's interpreter (or the README says to activate it first)."""
    readme = (ROOT / "README.md").read_text()
    assert ". .venv/bin/activate" in "\n".join(readme.splitlines()[:15])  # said up front, with `make`
    # A command that runs a script comes after the tour has activated the venv (tests/test_readme.py
    # runs the tour's blocks in order).
    activated = readme.index("```bash\n. .venv/bin/activate\n")
    bare = [m.start() for m in re.finditer(r"(?<![\w/.-])python3? (?:examples/|my_agent)\S*", readme)]
    assert bare and min(bare) > activated, (bare, activated)
    assert "tests/.ha-cache" in readme and "570 MB" in readme and "docker-compose" in readme


def test_the_cpu_torch_wheel_can_be_asked_for(checkout: Path) -> None:
    """PyPI's torch for Linux x86_64 is the CUDA build: the README says how to take the CPU wheel."""
    url = "https://download.pytorch.org/whl/cpu"
    env = {**os.environ, "CALLS": str(checkout / "calls")}
    out = subprocess.run(["make", "-C", str(checkout), f"PYTHON={checkout / 'system' / 'python3'}", "APT_PACKAGES=",
                          "DEMO_APT_PACKAGES=", f"TORCH_INDEX_URL={url}", ".venv/.pip-stamp"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert any(c.endswith(f"install torch==2.13.0 --index-url {url}") for c in calls(checkout)), calls(checkout)
    assert f"make demo TORCH_INDEX_URL={url}" in (ROOT / "README.md").read_text()
