"""Handing freed heap back to the OS.

glibc keeps the high-water mark of large transient allocations (audio batches, WebRTC
connections) as process memory; `malloc_trim(0)` returns it. It takes milliseconds, so it
runs only off the path of a turn: in an idle inference worker, and in the agent process a
while after sessions end (`TrimScheduler`).
"""

from __future__ import annotations

import asyncio
import ctypes
import time
from collections.abc import Callable
from functools import cache

TRIM_DELAY_S = 2.0  # after the last session ended
TRIM_MIN_INTERVAL_S = 30.0  # at most this often


@cache
def _malloc_trim() -> Callable[[int], int]:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return lambda pad: 0


def trim_heap() -> None:
    _malloc_trim()(0)


class TrimScheduler:
    """`soon()` after something big was freed: one trim, delayed and rate-limited."""

    def __init__(self, delay_s: float = TRIM_DELAY_S, min_interval_s: float = TRIM_MIN_INTERVAL_S) -> None:
        self.delay_s = delay_s
        self.min_interval_s = min_interval_s
        self.trims = 0
        self._last = -min_interval_s
        self._pending: asyncio.TimerHandle | None = None

    def soon(self) -> None:
        if self._pending is not None:
            return
        wait = max(self.delay_s, self._last + self.min_interval_s - time.monotonic())
        self._pending = asyncio.get_running_loop().call_later(wait, self._run)

    def _run(self) -> None:
        self._pending = None
        self._last = time.monotonic()
        self.trims += 1
        trim_heap()

    def cancel(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
