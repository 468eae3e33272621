"""Giving a closed session's memory back when it closes, not whenever the collector gets round to it.

A WebRTC session is a web of reference cycles (aiortc's peer connection, its ICE, DTLS and SRTP
transports, sockets, jitter buffers, and our ingress and egress hang on its event handlers), so
reference counting never frees it: only a full run of CPython's cyclic collector does. Full runs
come when the oldest generation has grown by a quarter, and in a server that imported torch,
transformers and aiortc that generation holds hundreds of thousands of import-time objects, so
they came about once every hundred sessions. Meanwhile dead sessions piled up (`bench soak` saw
40 dead peer connections beside 4 live ones), each pile pushed glibc's heap higher, and the
holes the next collection left stayed in the process: RSS grew by ~100 kB a session for good.

- `freeze_startup()` (the server, once started) moves everything alive then into the permanent
  generation: a full collection then scans only what was made since, milliseconds instead of
  the ~100 ms a 7B-serving process needs, and the automatic ones come often again.
- `CycleCollector.soon()` (a session closed) runs one full collection shortly after, off the path of
  a turn and at most every few seconds: a closed session's memory is reused by the next one.

`trim_heap()` hands freed heap pages back to the OS; an idle inference worker uses it after
large transient batches, which is what glibc keeps there.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import time
from collections.abc import Callable
from functools import cache

log = logging.getLogger(__name__)

COLLECT_DELAY_S = 1.0  # after a session closed: its closing tasks finish first
COLLECT_MIN_INTERVAL_S = 5.0  # at most this often


@cache
def _malloc_trim() -> Callable[[int], int]:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return lambda pad: 0


def trim_heap() -> None:
    _malloc_trim()(0)


def freeze_startup() -> int:
    """Collect once, then keep everything alive now out of later collections (a long-running
    server's modules, model config, VAD and codec set-up live as long as the process).
    Returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class CycleCollector:
    """`soon()` when something cyclic (a session) was dropped: one full collection, delayed and
    rate-limited, so sessions closing together cost one."""

    def __init__(self, delay_s: float = COLLECT_DELAY_S, min_interval_s: float = COLLECT_MIN_INTERVAL_S) -> None:
        self.delay_s = delay_s
        self.min_interval_s = min_interval_s
        self.runs = 0
        self.seconds = 0.0  # time spent collecting, over all runs
        self._last = -min_interval_s
        self._pending: asyncio.TimerHandle | None = None

    def soon(self) -> None:
        if self._pending is not None:
            return
        wait = max(self.delay_s, self._last + self.min_interval_s - time.monotonic())
        self._pending = asyncio.get_running_loop().call_later(wait, self._run)

    def _run(self) -> None:
        self._pending = None
        t0 = time.monotonic()
        found = gc.collect()
        self._last = time.monotonic()
        self.runs += 1
        self.seconds += self._last - t0
        log.debug("collected %d unreachable objects in %.1f ms", found, 1000 * (self._last - t0))

    def cancel(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
