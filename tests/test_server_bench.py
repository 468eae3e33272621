"""`bench webrtc` runs end to end and ends with one JSON object carrying peers_per_core."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_bench_webrtc_json_last_line() -> None:
    out = subprocess.run([sys.executable, "-m", "agent.bench.webrtc", "--peers", "2", "--seconds", "1", "--json"],
                         capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["peers_per_core"] > 0 and result["measured_at_peers"] == 2
    webrtc = next(r for r in result["runs"] if r["path"] == "webrtc")
    assert webrtc["frames"] > 0 and webrtc["dropped"] == 0
    assert any("peers one core holds" in line for line in lines)
