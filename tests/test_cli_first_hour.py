"""The first hour on a stock machine (issue 22, items 9–10): mistakes get one line that says
what to write instead, and an exit code that says what happened — never a traceback, never a
model load before the mistake is reported."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from agent.model.qwen2_audio import to_wav_bytes
from agent.transports.files import EXIT_NO_SPEECH
from tests.test_cli_hardening import GUARD, ROOT, one_line_error, voice_agent


def test_a_port_out_of_range_is_exit_2_with_what_to_write() -> None:
    proc = voice_agent("serve", "--port", "99999")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "99999 is not a port: write 1 to 65535, or 0 for any free one" in proc.stderr


def test_a_port_in_use_is_reported_before_the_model_loads() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # A model that cannot load: had it been loaded first, that would be the error.
        line = one_line_error(voice_agent("serve", "--model", "no-such-org/no-such-model", "--port", str(port),
                                          env={"HF_HUB_OFFLINE": "1"}))
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in line and "--port" in line


def test_schema_into_a_pipe_that_closes_early_is_quiet() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "schema"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None
    head = proc.stdout.read(10)  # `voice-agent schema | head -c 10`
    proc.stdout.close()
    _, err = proc.communicate(timeout=GUARD)
    assert head.startswith(b"{") and b"Traceback" not in err and b"BrokenPipe" not in err, err
    assert proc.returncode == 0


def test_the_livekit_example_shows_its_help_without_loading_anything() -> None:
    proc = subprocess.run([sys.executable, "examples/livekit_room.py", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=GUARD, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
                                                         "VOICE_AGENT_MODEL": "no-such-org/no-such-model"})
    assert proc.returncode == 0 and proc.stdout.startswith("usage: livekit_room.py"), proc.stderr
    assert "LIVEKIT_URL" in proc.stdout and "room" in proc.stdout


def test_a_model_name_that_is_nothing_fails_at_once_with_did_you_mean(speech_two) -> None:
    # HF_HUB_OFFLINE unset: before the fix the hub was asked (and retried) for "tiny-randon".
    line = one_line_error(voice_agent("run", "--model", "tiny-randon", str(speech_two.path)))
    assert "'tiny-randon' is not a model" in line and "(did you mean tiny-random?)" in line, line
    assert "Qwen/Qwen2-Audio-7B-Instruct" in line  # what a hub id looks like


def test_validator_wording_says_what_to_write() -> None:
    line = one_line_error(voice_agent("serve", "--wyoming", "0.0.0.0:10300"))
    assert "wyoming: expected something like tcp://0.0.0.0:10300, not '0.0.0.0:10300'" in line, line
    line = one_line_error(voice_agent("serve", "--max-new-tokens", "0"))
    assert "max_new_tokens: must be 1 or more, not 0" in line and "Input should" not in line, line


def test_a_wav_with_no_speech_is_named_with_its_own_exit_code(tmp_path: Path, speech_two) -> None:
    quiet = tmp_path / "quiet.wav"
    quiet.write_bytes(to_wav_bytes(np.zeros(16000 * 2, np.float32), 16000))
    proc = voice_agent("run", "--model", "tiny-random", str(quiet), str(speech_two.path))
    assert proc.returncode == EXIT_NO_SPEECH, proc.stderr
    assert f"voice-agent: no speech found in {quiet}" in proc.stderr
    assert f"no speech found in {speech_two.path}" not in proc.stderr  # the other file spoke, and ran


def test_max_sessions_is_as_many_as_the_backend_queues() -> None:
    from agent.config import load_settings

    assert load_settings(None).server.max_sessions == load_settings(None).max_queue == 64  # one GPU box: 64
    assert load_settings(None, max_queue=8).server.max_sessions == 8
    assert load_settings(None, server={"max_sessions": 5}).server.max_sessions == 5  # set: as set
