"""Smart Turn v3.2 (pipecat-ai, BSD-2): an audio end-of-turn model on a Whisper-tiny encoder.

The ONNX file ships beside this module (`smart-turn-v3.2-cpu.onnx`, 8.7 MB, copied unchanged
from the pipecat-ai 1.14.0 wheel; origin and licence in `LICENSE.smart-turn`): nothing is
downloaded at run time. Input, as pipecat feeds it: the last 8 s of 16 kHz audio, zero-padded
at the front, as Whisper log-mel features (80 × 800, waveform normalised first); output:
P(turn complete). transformers' `WhisperFeatureExtractor` computes the features (equal to
pipecat's own numpy extractor within 5e-5, and the same probabilities to 4 decimals).
"""

from __future__ import annotations

import importlib.resources
from typing import Any

import numpy as np

from agent.model.qwen2_audio import SAMPLE_RATE

MODEL_FILE = "smart-turn-v3.2-cpu.onnx"
WINDOW = 8 * SAMPLE_RATE  # the model sees the last 8 s


def window(audio: np.ndarray) -> np.ndarray:
    """The last 8 s, zero-padded at the front to exactly 8 s."""
    audio = np.asarray(audio, np.float32).reshape(-1)[-WINDOW:]
    return np.pad(audio, (WINDOW - audio.size, 0)) if audio.size < WINDOW else audio


class SmartTurn:
    """`EndOfTurnModel`: loads on construction (the service constructs it on its thread)."""

    name = "smart-turn"

    def __init__(self, threads: int = 1) -> None:
        import onnxruntime
        from transformers import WhisperFeatureExtractor

        self._features = WhisperFeatureExtractor(feature_size=80)
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        path = importlib.resources.files("agent.eot").joinpath(MODEL_FILE)
        with importlib.resources.as_file(path) as file:
            self._session: Any = onnxruntime.InferenceSession(str(file), sess_options=opts,
                                                              providers=["CPUExecutionProvider"])
        self.predict([np.zeros(SAMPLE_RATE, np.float32)])  # the first run allocates: not on a user's turn

    def features(self, clips: list[np.ndarray]) -> np.ndarray:
        """float32 [B, 80, 800]."""
        out = self._features([window(c) for c in clips], sampling_rate=SAMPLE_RATE, return_tensors="np",
                             padding="max_length", max_length=WINDOW, truncation=True, do_normalize=True,
                             device="cpu")
        return np.asarray(out["input_features"], np.float32)

    def predict(self, clips: list[np.ndarray]) -> np.ndarray:
        if not clips:
            return np.zeros(0, np.float32)
        (probs,) = self._session.run(None, {"input_features": self.features(clips)})
        return np.asarray(probs, np.float32).reshape(-1)
