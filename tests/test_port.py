"""One server per port: the supervisor binds once and its frontends accept on that socket, so a
second `serve` on a held port is refused, in every mode, before any model loads."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from tests.test_frontends import ROOT, start_serve, stop_serve


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_a_second_serve_on_a_held_port_is_refused(tmp_path: Path) -> None:
    served = await start_serve(tmp_path)
    port = urlsplit(served.url).port
    assert port
    try:
        for processes in ("2", "1"):  # the model (tiny-random) is never loaded: refused first
            second = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "agent.cli", "serve", "--processes", processes,
                                 "--model", "tiny-random", "--port", str(port)],
                cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ})
            assert second.returncode == 2, second.stderr
            assert f"cannot listen on 127.0.0.1:{port}: address already in use" in second.stderr, second.stderr
            assert "serving on" not in second.stderr and "model server" not in second.stderr
        async with aiohttp.ClientSession() as http:  # the first one still answers every connection
            for _ in range(8):
                async with http.get(f"{served.url}/livez", headers={"Connection": "close"}) as r:
                    assert r.status == 200
    finally:
        await asyncio.to_thread(stop_serve, served)
