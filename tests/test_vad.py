"""The batched VAD service against silero-vad's own per-stream model."""

import asyncio

import numpy as np
import pytest
import torch
from silero_vad import load_silero_vad

from agent.vad import CHUNK, BatchedSilero, VADService
from tests.speech import make_speech


def reference_probs(samples: np.ndarray) -> np.ndarray:
    model = load_silero_vad()
    model.reset_states()
    with torch.inference_mode():
        return np.array([float(model(torch.from_numpy(samples[i : i + CHUNK]), 16000))
                         for i in range(0, samples.size - CHUNK + 1, CHUNK)])


@pytest.fixture(scope="module")
def speeches():
    return [make_speech([0.3 * i, "turn on the kitchen light", 0.7, "and the hallway too", 0.5], f"vad{i}")
            for i in range(3)]


def test_batched_forward_equals_silero_per_stream(speeches):
    model = BatchedSilero()
    n = min(s.samples.size for s in speeches) // CHUNK
    states = [model.new_state() for _ in speeches]
    got = np.stack([model.forward(np.stack([s.samples[i * CHUNK:(i + 1) * CHUNK] for s in speeches]), states)
                    for i in range(n)], axis=1)
    for row, speech in zip(got, speeches):
        ref = reference_probs(speech.samples)[:n]
        assert ref.max() > 0.9  # there is speech in it: the comparison means something
        np.testing.assert_allclose(row, ref, atol=1e-4)


async def test_service_streams_join_leave_and_buffer_odd_sizes(speeches):
    service = VADService(max_batch=2)  # smaller than the number of streams: rotation is exercised
    await service.start()
    try:
        async def run(samples: np.ndarray, sizes: list[int], stop_after: int | None = None):
            stream = service.open_stream()
            out, i, k = [], 0, 0
            while i < samples.size and (stop_after is None or i < stop_after):
                size = sizes[k % len(sizes)]
                out.append(await stream.process(samples[i:i + size]))
                i, k = i + size, k + 1
            stream.close()
            return np.concatenate(out)

        s = speeches[0].samples
        quitter = asyncio.create_task(run(speeches[1].samples, [700], stop_after=16000))
        full, odd = await asyncio.gather(run(s, [4000]), run(s, [1, 513, 1023, 2048]))
        await quitter
        ref = reference_probs(s)
        np.testing.assert_allclose(full, ref, atol=1e-4)
        np.testing.assert_allclose(odd, ref[: odd.size], atol=1e-4)
        assert odd.size >= ref.size - 1
        assert service.stats["mean_batch_size"] > 1  # streams really were batched together
    finally:
        await service.close()
