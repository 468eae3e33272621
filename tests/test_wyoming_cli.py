"""`voice-agent serve --wyoming` as a user runs it: a subprocess with tiny-random, the `wyoming`
client library on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from wyoming.asr import Transcript
from wyoming.client import AsyncClient
from wyoming.info import Describe, Info

from tests.mosquitto import free_port
from tests.speech import make_speech
from tests.test_wyoming import pcm16, read_until, send_audio

ROOT = Path(__file__).resolve().parent.parent


def serve(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen([sys.executable, "-m", "agent.cli", "serve", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_line(proc: subprocess.Popen[str], needle: str, timeout: float = 180) -> list[str]:
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if needle in line:
            return lines
    proc.kill()
    raise AssertionError(f"no {needle!r} from voice-agent serve:\n{''.join(lines)}")


async def describe_and_transcribe(uri: str) -> tuple[Info, list[str], str]:
    speech = make_speech([0.5, "turn on the kitchen light", 0.8], "wy-one")
    async with AsyncClient.from_uri(uri, read_timeout=120) as client:
        await client.write_event(Describe().event())
        event = await client.read_event()
        assert event is not None
        info = Info.from_event(event)
    # A client that vanishes mid-stream...
    async with AsyncClient.from_uri(uri, read_timeout=120) as client:
        await send_audio(client, pcm16(speech.samples[: speech.samples.size // 2]))
    # ...and the next connection is served.
    async with AsyncClient.from_uri(uri, read_timeout=120) as client:
        await send_audio(client, pcm16(speech.samples))
        events = await read_until(client, "transcript-stop")
    final = next(e for e in events if e.type == "transcript")
    return info, [e.type for e in events], Transcript.from_event(final).text


def test_serve_wyoming_describes_and_transcribes_with_tiny_random() -> None:
    port = free_port()
    proc = serve("--model", "tiny-random", "--max-new-tokens", "8", "--wyoming", f"tcp://127.0.0.1:{port}",
                 "--host", "127.0.0.1", "--port", "0")
    try:
        lines = wait_for_line(proc, "serving on http://")
        assert any(f"Wyoming on tcp://127.0.0.1:{port}" in line for line in lines), lines
        info, kinds, text = asyncio.run(describe_and_transcribe(f"tcp://127.0.0.1:{port}"))
        assert [p.name for p in info.asr if p.installed] == ["qwen2-audio"]
        assert "en" in info.asr[0].models[0].languages
        assert kinds[-2:] == ["transcript", "transcript-stop"] and text.strip()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err


def test_serve_wyoming_alone_and_bad_uris_fail_clearly() -> None:
    port = free_port()
    proc = serve("--model", "tiny-random", "--wyoming", f"tcp://127.0.0.1:{port}", "--no-http")
    try:
        lines = wait_for_line(proc, "Wyoming on")
        assert not any("serving on http" in line for line in lines)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0

    bad = subprocess.run([sys.executable, "-m", "agent.cli", "serve", "--model", "tiny-random", "--wyoming",
                          "http://127.0.0.1:1"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert bad.returncode == 2 and "wyoming" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
