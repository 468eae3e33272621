"""The batched VAD service against silero-vad's own per-stream model, on real speech."""

from __future__ import annotations

import asyncio
import functools
import random
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
from silero_vad import load_silero_vad

from agent.vad import CHUNK, BatchedSilero, VADService
from tests.speech import Speech, make_speech, two_utterances

TOL = 1e-4
pytestmark = pytest.mark.timeout(120)  # a service that stops ticking hangs: fail instead


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def silero_model():
    with warnings.catch_warnings():  # torch.jit.load is deprecated in torch 2.9+, still works
        warnings.simplefilter("ignore", DeprecationWarning)
        return load_silero_vad()


def reference_probs(samples: np.ndarray) -> np.ndarray:
    """silero-vad's own stateful single-stream model, chunk by chunk."""
    model = silero_model()
    model.reset_states()
    with torch.inference_mode():
        return np.array([float(model(torch.from_numpy(samples[i : i + CHUNK]), 16000))
                         for i in range(0, samples.size - CHUNK + 1, CHUNK)], np.float32)


@pytest.fixture(scope="module")
def two() -> Speech:
    return two_utterances()


@pytest.fixture(scope="module")
def speeches(two: Speech) -> list[Speech]:
    return [two] + [make_speech([0.3 * i, "turn on the kitchen light", 0.7, "and the hallway too", 0.5], f"vad{i}")
                    for i in range(1, 3)]


@pytest.fixture(scope="module")
def model() -> BatchedSilero:
    return BatchedSilero()


def alone(model: BatchedSilero, samples: np.ndarray) -> np.ndarray:
    """One stream through our model with no other stream in the batch."""
    state = model.new_state()
    n = samples.size // CHUNK
    return np.array([model.forward(samples[i * CHUNK : (i + 1) * CHUNK][None], [state])[0] for i in range(n)],
                    np.float32)


def test_import_has_no_side_effects():
    code = "import sys, agent.vad; assert 'torch' not in sys.modules and 'silero_vad' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_new_state_shape(model: BatchedSilero):
    s = model.new_state()
    assert s.state.shape == (2, 1, 128) and not s.state.any()
    assert s.context.shape == (64,) and not s.context.any()


def test_batched_forward_equals_silero_per_stream(model: BatchedSilero, speeches: list[Speech]):
    n = min(s.samples.size for s in speeches) // CHUNK
    states = [model.new_state() for _ in speeches]
    got = np.stack([model.forward(np.stack([s.samples[i * CHUNK : (i + 1) * CHUNK] for s in speeches]), states)
                    for i in range(n)], axis=1)
    assert got.dtype == np.float32 and got.shape == (len(speeches), n)
    for row, speech in zip(got, speeches, strict=True):
        ref = reference_probs(speech.samples)[:n]
        assert ref.max() > 0.9 and ref.min() < 0.1  # speech and silence: the comparison means something
        np.testing.assert_allclose(row, ref, atol=TOL)


def test_speech_found_where_it_was_placed(model: BatchedSilero, two: Speech):
    probs = alone(model, two.samples)
    t = (np.arange(probs.size) + 0.5) * CHUNK / 16000
    for start, end in two.segments:  # the middle of each utterance is speech, the gaps are not
        assert probs[(t > start + 0.3) & (t < end - 0.3)].mean() > 0.5
    assert probs[t < two.segments[0][0] - 0.1].max() < 0.5
    assert probs[(t > two.segments[0][1] + 0.4) & (t < two.segments[1][0] - 0.1)].max() < 0.5


def test_forward_rejects_mismatched_batch(model: BatchedSilero):
    with pytest.raises(ValueError):
        model.forward(np.zeros((2, CHUNK), np.float32), [model.new_state()])
    with pytest.raises(ValueError):
        model.forward(np.zeros((1, 500), np.float32), [model.new_state()])


async def test_odd_sizes_buffer_correctly(two: Speech):
    service = VADService()
    try:
        stream = service.open_stream()  # before start(): the model loads on the first chunk
        s = two.samples
        sizes = [1, 513, 510, 1, 1, 511, 1, 513, 2048, 5000, 3, 1023]
        out: list[np.ndarray] = []
        fed = 0
        while fed < s.size:
            size = sizes[len(out) % len(sizes)]
            probs = await stream.process(s[fed : fed + size])
            fed_before, fed = fed, min(fed + size, s.size)
            # exactly the chunks this call completed, no more, no fewer
            assert probs.size == fed // CHUNK - fed_before // CHUNK
            out.append(probs)
        got = np.concatenate(out)
        ref = reference_probs(s)
        assert got.size == ref.size == s.size // CHUNK
        np.testing.assert_allclose(got, ref, atol=TOL)
        # The caller may reuse its array as soon as the call is queued.
        again, mine = service.open_stream(), s[: 40 * CHUNK].copy()
        call = asyncio.ensure_future(again.process(mine))
        await asyncio.sleep(0)
        mine[:] = 0
        np.testing.assert_allclose(await call, ref[:40], atol=TOL)
        stream.close()
        with pytest.raises(RuntimeError):
            await stream.process(s[:CHUNK])
    finally:
        await service.close()


async def test_64_streams_joining_and_leaving_get_what_they_get_alone(model: BatchedSilero, speeches: list[Speech]):
    rng = random.Random(7)
    service = VADService(max_batch=24)  # fewer than the streams: rotation is exercised too
    await service.start()
    # Each stream gets different audio: a speech, shifted by an offset, cut to a length.
    audios = []
    for i in range(64):
        s = speeches[i % len(speeches)].samples
        a = s[rng.randrange(0, 8000) :][: rng.randrange(CHUNK * 20, s.size)]
        audios.append(a.copy())
    expected = [alone(model, a) for a in audios]
    quits = {i: rng.randrange(CHUNK, a.size) for i, a in enumerate(audios) if i % 4 == 3}
    yanked: set[int] = {i for i in range(64) if i % 8 == 5}  # closed from outside while waiting

    async def run(i: int) -> np.ndarray:
        await asyncio.sleep(rng.random() * 0.3)  # join at a random moment
        stream = service.open_stream()
        if i in yanked:  # someone else closes it while a call of it is (probably) waiting
            asyncio.get_running_loop().call_later(rng.random() * 0.3, stream.close)
        a, out, fed = audios[i], [], 0
        stop = quits.get(i, a.size)
        try:
            while fed < stop:
                size = rng.choice([1, 160, 513, 512, 1000, 4000, 16000])
                out.append(await stream.process(a[fed : fed + size]))
                fed += size
                if rng.random() < 0.3:
                    await asyncio.sleep(0)
        except (asyncio.CancelledError, RuntimeError):
            assert i in yanked  # only the streams closed from outside may be cut short
        stream.close()  # leaves midway for those in `quits`
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    results = await asyncio.gather(*(asyncio.ensure_future(run(i)) for i in range(64)),
                                   return_exceptions=True)
    try:
        for i, got in enumerate(results):
            if isinstance(got, BaseException):  # a yanked stream's own call cancelled
                assert i in yanked, f"stream {i}: {got!r}"
                continue
            want = expected[i]
            if i in quits:  # left midway: at least what it had fed before leaving
                assert quits[i] // CHUNK <= got.size <= want.size
            elif i not in yanked:
                assert got.size == want.size
            np.testing.assert_allclose(got, want[: got.size], atol=TOL, err_msg=f"stream {i}")
        stats = service.stats
        assert stats["mean_batch_size"] > 4  # the streams really were batched together
        assert stats["streams"] == 0 and stats["pending_streams"] == 0
    finally:
        await service.close()


async def test_stream_closed_while_waiting_does_not_disturb_others(two: Speech):
    service = VADService()
    await service.start()
    try:
        s = two.samples
        a, b, pace = service.open_stream(), service.open_stream(), service.open_stream()
        a_call = asyncio.ensure_future(a.process(s))  # a whole file: many ticks
        b_call = asyncio.ensure_future(b.process(s))
        await pace.process(s[: 5 * CHUNK])  # returns once the first 5 ticks have run
        assert not a_call.done()
        a.close()
        with pytest.raises(asyncio.CancelledError):
            await a_call
        np.testing.assert_allclose(await b_call, reference_probs(s), atol=TOL)
        # the service goes on serving new streams after that
        c = service.open_stream()
        np.testing.assert_allclose(await c.process(s[: 20 * CHUNK]), reference_probs(s[: 20 * CHUNK]), atol=TOL)
    finally:
        await service.close()


async def test_inference_runs_off_the_event_loop_and_survives_a_failure(two: Speech, monkeypatch):
    service = VADService()
    await service.start()
    try:
        assert service._model is not None
        real = service._model.step  # what the service runs per tick, on its worker thread
        threads: list[int] = []
        failures = [1]

        def step(x, state):
            threads.append(threading.get_ident())
            if failures:
                failures.pop()
                raise RuntimeError("boom")
            return real(x, state)

        monkeypatch.setattr(service._model, "step", step)
        stream, other = service.open_stream(), service.open_stream()
        with pytest.raises(RuntimeError, match="boom"):
            await stream.process(two.samples[: 3 * CHUNK])
        got = await other.process(two.samples[: 10 * CHUNK])  # the service still ticks
        np.testing.assert_allclose(got, reference_probs(two.samples[: 10 * CHUNK]), atol=TOL)
        assert threads and threading.get_ident() not in threads
        assert len(set(threads)) == 1  # one worker thread for every tick
    finally:
        await service.close()
