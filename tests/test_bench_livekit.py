"""`voice-agent bench livekit` runs end to end and ends with one JSON object (no timing asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_bench_livekit_json_last_line() -> None:
    out = subprocess.run([sys.executable, "-m", "agent.cli", "bench", "livekit", "--json", "--seconds", "1",
                          "--participants", "1,2"],
                         capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["benchmark"] == "livekit"
    assert result["participants_per_core"] > 0 and result["overhead_ratio"] > 0
    assert result["dropped_frames"] == 0 and result["measured_at_participants"] in (1, 2)
    assert set(result["cpu_per_participant"]) == {"1", "2"}
    assert all(v > 0 for v in result["cpu_per_participant"].values())
    runs = {(r["participants"], r["path"]): r for r in result["runs"]}
    assert set(runs) == {(n, p) for n in (1, 2) for p in ("livekit", "senders", "direct")}
    for (n, path), r in runs.items():
        assert r["cpu_cores"] > 0 and r["dropped_frames"] == 0, r
        assert r["audio_s"] > 0.5 * n, r  # the audio got through (loose: the machine may be busy)
    assert any("participants one core holds" in line for line in lines)
