"""`voice-agent run`: files through the same pipeline a live session uses.

Each file is one session, fed faster than real time; the files run concurrently and share
the VAD service and inference backend exactly as live sessions do.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any, Sequence, TextIO

import numpy as np

from agent import events as ev
from agent.audio import AudioFileError, read_file
from agent.config import Settings
from agent.inference.base import InferenceError

FEED_SAMPLES = 16000  # one second per push: large enough to be cheap, small enough to stream


def transcript_line(event: ev.Event, label: str) -> str | None:
    """The readable form of the events a person wants to see (None: not shown)."""
    if isinstance(event, ev.TurnCommitted):
        extra = f" [{event.instruction}]" if event.instruction else ""
        return f"{label}{event.start:7.2f}–{event.end:.2f}s  user turn ({event.mode}){extra}"
    if isinstance(event, ev.ResponseDone):
        ms = event.timings.get("first_token", 0.0) * 1000
        return f"{label}{'':8} agent: {event.text.strip()!r}  ({event.tokens} tokens, first token {ms:.0f} ms)"
    if isinstance(event, ev.ToolCall):
        return f"{label}{'':8} tool call: {event.name}({event.arguments})"
    if isinstance(event, ev.ToolResult):
        return f"{label}{'':8} tool result: {event.result if event.ok else 'error: ' + str(event.error)}"
    if isinstance(event, ev.ResponseCancelled):
        return f"{label}{'':8} (response cancelled: {event.reason})"
    if isinstance(event, ev.Error):
        return f"{label}error [{event.code}]: {event.message}"
    if isinstance(event, ev.SessionStarted) and event.warning:
        return f"{label}warning: {event.warning}"
    return None


async def _feed(session: Any, samples: np.ndarray) -> None:
    for i in range(0, samples.size, FEED_SAMPLES):
        await session.push_audio(samples[i : i + FEED_SAMPLES])
    await session.finish()
    await session.close("end_of_file")


async def run_files(settings: Settings, paths: Sequence[str], *, instruction: str | None = None,
                    jsonl: bool = False, out: TextIO = sys.stdout, runtime_options: dict[str, Any] | None = None) -> int:
    """Returns the exit code: 0, or 2 for unreadable input or a backend that cannot start."""
    from agent.runtime import AgentRuntime

    try:  # decode everything first: a bad file fails fast, before any model loads
        audios = {path: read_file(path) for path in paths}
    except AudioFileError as exc:
        print(f"voice-agent: {exc}", file=sys.stderr)
        return 2
    runtime = AgentRuntime(settings, **(runtime_options or {}))
    try:
        await runtime.start()
    except (InferenceError, ValueError, OSError) as exc:
        print(f"voice-agent: cannot start: {exc}", file=sys.stderr)
        await runtime.close()
        return 2
    labels: dict[str, str] = {}
    subscription = runtime.bus.subscribe(maxsize=100_000)

    async def printer() -> None:
        async for event in subscription:
            if jsonl:
                print(event.model_dump_json(), file=out, flush=True)
                continue
            line = transcript_line(event, labels.get(event.session_id, ""))
            if line is not None:
                print(line, file=out, flush=True)

    printing = asyncio.create_task(printer())
    try:
        feeds = []
        for path, samples in audios.items():
            session = runtime.create_session(instruction=instruction, wait_for_responses=True)
            labels[session.id] = f"{Path(path).name}: " if len(paths) > 1 else ""
            feeds.append(_feed(session, samples))
        await asyncio.gather(*feeds)
    finally:
        await runtime.close()
        while not subscription.queue.empty():
            await asyncio.sleep(0)
        printing.cancel()
        subscription.close()
    return 0
