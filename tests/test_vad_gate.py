"""The silence gate, the backend switch and bad input of the batched VAD, on real speech."""

from __future__ import annotations

import asyncio
import sys

import numpy as np
import pytest
import torch

from agent.vad import CHUNK, CONTEXT, SPLIT_MIN_SILENT, BatchedSilero, VADService
from tests.speech import Speech, make_speech
from tests.test_vad import TOL, reference_probs

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gappy() -> Speech:
    """Speech, 3 s of digital silence, speech: the gate fires for most of the gap, and what
    the model remembers from it decides the probabilities when speech comes back."""
    return make_speech([0.4, "turn on the kitchen light", 3.0, "and the hallway too", 0.6], "gate")


@pytest.fixture(scope="module")
def torch_only() -> BatchedSilero:
    return BatchedSilero(onnx_below=0)  # one runtime for every batch: results compare exactly


@pytest.fixture(scope="module")
def model() -> BatchedSilero:
    return BatchedSilero()


def ticks(samples: np.ndarray, streams: int, shift: int) -> list[np.ndarray]:
    """Input rows [streams, 64 + 512] per tick; stream i starts `i * shift` chunks late."""
    padded = [np.concatenate([np.zeros(i * shift * CHUNK, np.float32), samples]) for i in range(streams)]
    n = min(p.size for p in padded) // CHUNK
    chunks = np.stack([p[: n * CHUNK].reshape(n, CHUNK) for p in padded], axis=1)  # [ticks, B, 512]
    context = np.concatenate([np.zeros((1, streams, CONTEXT), np.float32), chunks[:-1, :, -CONTEXT:]])
    return list(np.concatenate([context, chunks], axis=2))


def compare(model: BatchedSilero, rows: list[np.ndarray]) -> tuple[float, float, int, int]:
    """Gated (`step`) against the whole network on every row (`run`), tick by tick, each
    path carrying its own state: (max prob diff, max state diff, rows gated, gated ticks)."""
    b = rows[0].shape[0]
    full = gated = np.zeros((2, b, 128), np.float32)
    worst_p = worst_s = 0.0
    skipped = gated_ticks = 0
    for x in rows:
        p_full, full = model.run(x, full)
        p_gated, gated, silent = model.step(x, gated)
        worst_p = max(worst_p, float(np.abs(p_full - p_gated).max()))
        worst_s = max(worst_s, float(np.abs(full - gated).max()))
        skipped += silent
        gated_ticks += silent > 0
    return worst_p, worst_s, skipped, gated_ticks


def test_gate_is_exact_for_one_stream(torch_only: BatchedSilero, gappy: Speech):
    rows = ticks(gappy.samples, 1, 0)
    worst_p, worst_s, skipped, _ = compare(torch_only, rows)
    assert skipped > 60  # most of the 3 s gap (94 chunks) ran without the encoder
    assert worst_p == 0.0 and worst_s == 0.0  # the same ops on the same numbers


def test_gate_is_exact_when_a_batch_is_split(torch_only: BatchedSilero, gappy: Speech):
    # 96 streams, staggered: in many ticks some rows are silent and the rest are speech.
    rows = ticks(gappy.samples, 96, 1)
    worst_p, worst_s, skipped, gated_ticks = compare(torch_only, rows)
    assert gated_ticks > 10 and skipped >= gated_ticks * SPLIT_MIN_SILENT
    # The loud rows ran in a smaller batch, whose kernels round differently (measured: 4e-6 on
    # a probability, 8e-5 on an LSTM cell value of up to ~20, i.e. a few float32 ulps).
    assert worst_p < 1e-5 and worst_s < 2e-4


def test_gate_matches_across_runtimes(model: BatchedSilero, gappy: Speech):
    # Small batches run on onnxruntime, silent ones on the torch decoder: the two runtimes
    # carry one state between them and still give silero-vad's own probabilities.
    assert model.backend(1) == "onnxruntime" and model.backend(256) == "torchscript"
    state = np.zeros((2, 1, 128), np.float32)
    got, skipped = [], 0
    for x in ticks(gappy.samples, 1, 0):
        p, state, silent = model.step(x, state)
        got.append(p[0])
        skipped += silent
    assert skipped > 60
    ref = reference_probs(gappy.samples)
    np.testing.assert_allclose(np.array(got), ref[: len(got)], atol=TOL)
    t = (np.arange(ref.size) + 0.5) * CHUNK / 16000
    after = (t > gappy.segments[1][0] + 0.3) & (t < gappy.segments[1][1] - 0.3)
    assert np.array(got)[after].mean() > 0.5  # speech after the gap is found


def test_without_onnxruntime_every_batch_runs_on_torchscript(monkeypatch, gappy: Speech):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    model = BatchedSilero()
    assert model.backend(1) == "torchscript"
    states = [model.new_state()]
    n = 40
    got = [model.forward(gappy.samples[i * CHUNK : (i + 1) * CHUNK][None], states)[0] for i in range(n)]
    np.testing.assert_allclose(got, reference_probs(gappy.samples)[:n], atol=TOL)


async def test_service_gates_silence_and_matches_silero(gappy: Speech):
    service = VADService()
    await service.start()
    try:
        streams = [service.open_stream() for _ in range(80)]
        audio = [np.concatenate([np.zeros(i * CHUNK, np.float32), gappy.samples]) for i in range(80)]
        got = await asyncio.gather(*(s.process(a) for s, a in zip(streams, audio, strict=True)))
        for i in (0, 41, 79):
            np.testing.assert_allclose(got[i], reference_probs(audio[i]), atol=TOL, err_msg=f"stream {i}")
        stats = service.stats
        assert stats["silent_chunks"] > 2000  # the gate really ran in the service
        assert stats["failed_chunks"] == 0
    finally:
        await service.close()


async def test_non_finite_samples_fail_that_call_only(gappy: Speech):
    service = VADService()
    await service.start()
    try:
        s = gappy.samples[: 40 * CHUNK]
        bad, good = service.open_stream(), service.open_stream()
        broken = s[10 * CHUNK : 13 * CHUNK].copy()
        broken[700] = np.nan  # in chunk 11
        calls = [asyncio.ensure_future(bad.process(s[: 10 * CHUNK])), asyncio.ensure_future(bad.process(broken)),
                 asyncio.ensure_future(good.process(s))]
        first, failed, other = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(failed, ValueError) and "finite" in str(failed)
        assert isinstance(first, np.ndarray) and isinstance(other, np.ndarray)
        ref = reference_probs(s)
        np.testing.assert_allclose(first, ref[:10], atol=TOL)
        np.testing.assert_allclose(other, ref, atol=TOL)  # the stream in the same ticks is untouched
        # The bad chunk left no trace: the stream has seen chunks 0-10 and 12 (the call's
        # finite chunks ran), as if chunk 11 had never been sent.
        rest = await bad.process(s[13 * CHUNK :])
        without = reference_probs(np.concatenate([s[: 11 * CHUNK], s[12 * CHUNK :]]))
        np.testing.assert_allclose(rest, without[12:], atol=TOL)
        assert service.stats["failed_chunks"] == 1
        with pytest.raises(ValueError):
            await bad.process(np.full(CHUNK, np.inf, np.float32))
    finally:
        await service.close()


async def test_reused_slot_starts_from_silence(gappy: Speech):
    service = VADService()
    await service.start()
    try:
        s = gappy.samples[: 60 * CHUNK]
        ref = reference_probs(s)
        for _ in range(3):  # the same slot, three streams in a row
            stream = service.open_stream()
            np.testing.assert_allclose(await stream.process(s), ref, atol=TOL)
            stream.close()
        many = [service.open_stream() for _ in range(40)]  # the slot arrays grow while in use
        got = await asyncio.gather(*(m.process(s) for m in many))
        for g in got:
            np.testing.assert_allclose(g, ref, atol=TOL)
    finally:
        await service.close()
