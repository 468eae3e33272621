"""The body of one inference worker process (started by `InferencePool` with `spawn`).

It loads the model, then loops: take every command waiting in `inbox`, run one engine
step, put that step's outputs on `outbox` as one message. Messages in:
("submit", request_id, GenerationRequest) · ("cancel", request_id) ·
("promote", session_id, turn_id) · ("drop_turn", session_id, turn_id) · ("forget", session_id) · ("stop",).
Messages out: ("ready", model_name, warning, pid, engine info: KV budget…) ·
("load_error", message) · ("out", [Output, …], `Engine.stats()`) ·
("alive",): a heartbeat after HEARTBEAT_S of steps without outputs (a long prefill), so the
pool's step watchdog tells a slow worker from a wedged one.

Memory: when the engine has been idle for IDLE_POLL_S the worker hands freed heap back to the
OS (`malloc_trim`, which takes milliseconds: never on the path of a turn). glibc otherwise keeps the high-water mark of large transients (feature and
encoder batches of a re-prefilled history), which showed as RSS growing in steps under an
audio flood.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from typing import Any

from agent.heap import trim_heap

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.5  # how often an idle worker checks that its parent still lives
HEARTBEAT_S = 1.0


def _handle(engine: Any, msg: tuple[Any, ...]) -> bool:
    """Apply one command; False on stop."""
    kind = msg[0]
    if kind == "submit":
        engine.submit(msg[1], msg[2])
    elif kind == "cancel":
        engine.cancel(msg[1])
    elif kind == "promote":
        engine.promote(msg[1], msg[2])
    elif kind == "drop_turn":
        engine.drop_turn(msg[1], msg[2])
    elif kind == "forget":
        engine.forget(msg[1])
    elif kind == "stop":
        return False
    return True


def worker_main(model: str, device: str | None, options: dict[str, Any], inbox: Any, outbox: Any) -> None:
    """Process entry point: must stay a module-level function so `spawn` can import it.
    `options` are the Engine's keyword arguments (max_batch, kv_budget_tokens, …)."""
    parent = os.getppid()
    try:
        import torch

        from agent.inference import models
        from agent.inference.engine import Engine

        loaded = models.load(model, device)
        engine = Engine(loaded, **options)
    except Exception as exc:  # reported to start(); the process then exits
        outbox.put(("load_error", str(exc) or type(exc).__name__))
        return
    threads = {"torch_threads": torch.get_num_threads()}  # benchmarks check it equals theirs
    info = {**engine.info(), **threads, "family": loaded.family.name}  # the agent counts prompts in its format
    outbox.put(("ready", loaded.name, loaded.warning, os.getpid(), info))
    running, busy = True, False
    sent = time.monotonic()
    while running:
        msgs: list[tuple[Any, ...]] = []
        try:
            # Block only when there is nothing to step; otherwise just drain what arrived.
            if not engine.has_work:
                msgs.append(inbox.get(timeout=IDLE_POLL_S))
            while True:
                msgs.append(inbox.get_nowait())
        except queue.Empty:
            pass
        if not msgs and not engine.has_work:
            if os.getppid() != parent:  # orphaned: the pool is gone
                return
            if busy:  # idle for IDLE_POLL_S: give freed heap back (never between a user's turns)
                trim_heap()
                busy = False
        for msg in msgs:
            try:
                running = _handle(engine, msg) and running
            except Exception:  # e.g. out of memory at a barge-in: the worker lives on
                log.exception("inference worker: %s failed", msg[0])
        if running and engine.has_work:
            busy = True
            try:
                outputs = engine.step()
            except Exception:  # the engine fails requests itself; this is a last resort
                log.exception("inference worker: step failed")
                continue
            if outputs:
                outbox.put(("out", outputs, engine.stats()))
                sent = time.monotonic()
            elif time.monotonic() - sent > HEARTBEAT_S:
                outbox.put(("alive",))
                sent = time.monotonic()
