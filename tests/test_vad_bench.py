"""`voice-agent bench vad --json`: the last line is one JSON object with every promised key."""

from __future__ import annotations

import json

import pytest

from agent.bench import vad as bench

pytestmark = pytest.mark.timeout(300)

STREAMS = {"1", "8", "64", "256"}


def test_bench_vad_json_keys(capsys):
    assert bench.main(["--json", "--seconds", "0.01", "--repeats", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("us_per_stream_chunk", "livekit_us_per_stream_chunk", "silero_us_per_stream_chunk",
                "service_us_per_stream_chunk", "ratio_vs_livekit", "ratio_vs_silero", "best_batch",
                "realtime_streams_per_core"):  # the keys from before the service figures
        assert key in result
    for key in ("service_us_by_streams", "service_ratio_vs_livekit_by_streams", "livekit_us_by_streams",
                "service_over_bare_by_streams", "service_dithered_us_by_streams"):
        assert set(result[key]) == STREAMS, key
        assert all(v > 0 for v in result[key].values()), key
    assert result["service_ratio_vs_livekit"] == result["service_ratio_vs_livekit_by_streams"]["256"]
    assert result["service_mean_batch_by_streams"] == {"1": 1.0, "8": 8.0, "64": 64.0, "256": 256.0}
    assert 0.2 < result["digital_silence_fraction"] < 0.6  # the pauses between the sentences
    assert result["backend_by_batch"]["1"] == "onnxruntime" and result["backend_by_batch"]["256"] == "torchscript"
