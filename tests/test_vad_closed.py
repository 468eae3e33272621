"""The VAD service outlives a tick whose every stream closed before it ran (issue 22, the soak's
slow leak): before the fix that tick raised in the service's loop, the service stopped, and
from then on every session's audio waited forever — sessions that never answered, never ended
and held their memory."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from agent.vad import CHUNK, VADService

pytestmark = pytest.mark.timeout(120)


async def test_a_tick_of_closed_streams_only_leaves_the_service_serving() -> None:
    service = VADService()
    await service.start()
    try:
        gone = service.open_stream()
        call = asyncio.ensure_future(gone.process(np.zeros(CHUNK, np.float32)))  # its chunk is queued …
        await asyncio.sleep(0)
        gone.close()  # … and its session ends before the tick runs (a client gone mid-turn)
        with pytest.raises(asyncio.CancelledError):
            await call
        fresh = service.open_stream()
        # Before the fix: the service had stopped and this never returned (a guard, not a timing).
        probs = await asyncio.wait_for(fresh.process(np.zeros(4 * CHUNK, np.float32)), 60)
        assert probs.shape == (4,) and service.stats["streams"] == 1
    finally:
        await service.close()
