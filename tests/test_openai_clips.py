"""The OpenAI backend encodes each clip once, not on every request (issue 15 item 16)."""

from __future__ import annotations

import asyncio
import gc

import numpy as np

from agent.conversation import Conversation
from agent.inference.openai import ClipCache, OpenAIBackend
from tests.fake_openai import MODEL, FakeOpenAI

GUARD = 20


def noise(seconds: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.5, 0.5, int(seconds * 16000)).astype(np.float32)


async def test_each_turns_audio_is_encoded_once_across_requests() -> None:
    async with FakeOpenAI() as fake:
        backend = OpenAIBackend(fake.url, MODEL)
        await backend.start()
        try:
            conv = Conversation()
            for turn in range(4):
                conv.add_user(noise(1.0 + turn, turn))
                request = conv.request("s1", f"t{turn}", max_new_tokens=8)
                text = await asyncio.wait_for(_answer(backend, request), GUARD)
                conv.add_assistant(text)
            assert backend.clips.encoded == 4  # one per turn, not 1 + 2 + 3 + 4
            assert backend.clips.reused == 0 + 1 + 2 + 3
            # the server still got every turn's audio in every request, the same bytes each time
            assert [len(a) for a in fake.audios] == [1, 2, 3, 4]
            first_clip = [r["messages"][0]["content"][0]["input_audio"]["data"] for r in fake.requests]
            assert len(set(first_clip)) == 1
            np.testing.assert_allclose(fake.audios[3][0], conv_clip(conv), atol=1 / 16000)
            del conv, request
            gc.collect()
            assert len(backend.clips) == 0 and backend.clips.size == 0  # freed with the conversation
        finally:
            await backend.close()


def conv_clip(conv: Conversation) -> np.ndarray:
    return conv.request("s1", "tx").audios[0]


async def _answer(backend: OpenAIBackend, request) -> str:
    return "".join([piece async for piece in backend.generate(request)])


def test_the_cache_is_bounded_by_bytes() -> None:
    clips = [noise(1.0, i) for i in range(10)]  # ~42.7 kB of base64 each
    cache = ClipCache(max_bytes=150_000)
    encoded = [cache.encode(c) for c in clips]
    assert cache.size <= 150_000 and len(cache) == 3  # the three most recent
    assert cache.encode(clips[-1]) == encoded[-1] and cache.reused == 1
    cache.encode(clips[0])  # evicted: encoded again
    assert cache.encoded == 11
    tiny = ClipCache(max_bytes=1000)
    assert tiny.encode(clips[0]) == encoded[0] and len(tiny) == 0  # larger than the whole cache: not kept
