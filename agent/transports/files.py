"""`voice-agent run`: files through the same pipeline a live session uses.

Each file is one session, fed faster than real time; the files run concurrently and share
the VAD service and inference backend exactly as live sessions do.

Exit status: 0; 1 when a turn failed (an `error` event: backend unreachable, …); 2 for
unreadable input or a backend that cannot start; 3 when a file had no speech in it (each such
FILE is named on stderr: "no speech found in FILE"; the other files ran); 141 (128 + SIGPIPE, as standard tools)
when the reader of stdout went away (`| head -1`): the run stops at once.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from agent import events as ev
from agent.audio import AudioFileError, read_file
from agent.config import Settings
from agent.inference.base import InferenceError
from agent.model.qwen2_audio import to_wav_bytes

FEED_SAMPLES = 16000  # one second per push: large enough to be cheap, small enough to stream
EXIT_FAILED_TURNS = 1
EXIT_NO_SPEECH = 3
EXIT_BROKEN_PIPE = 128 + 13


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
    if isinstance(event, ev.ResponseAudioDone):
        cut = " (interrupted)" if event.interrupted else ""
        return f"{label}{'':8} spoken: {event.duration_s:.2f} s{cut}"
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


class _Printer:
    """Writes the events of the run's sessions until every one has ended; stops quietly
    when the reader of `out` goes away."""

    def __init__(self, out: TextIO, jsonl: bool) -> None:
        self.out = out
        self.jsonl = jsonl
        self.labels: dict[str, str] = {}  # session id → "file.wav: " (several files)
        self.ended: set[str] = set()
        self.errors: list[ev.Error] = []
        self.spoke: set[str] = set()  # sessions with a user turn
        self.broken_pipe = False

    async def run(self, subscription: Any) -> None:
        async for event in subscription:
            if isinstance(event, ev.Error) and event.session_id in self.labels:
                self.errors.append(event)
            elif isinstance(event, ev.TurnCommitted):
                self.spoke.add(event.session_id)
            try:
                self._write(event)
            except OSError as exc:
                if not isinstance(exc, BrokenPipeError) and exc.errno != errno.EPIPE:
                    raise
                self.broken_pipe = True
                silence_broken_pipe(self.out)
                return
            if isinstance(event, ev.SessionEnded) and event.session_id in self.labels:
                self.ended.add(event.session_id)
                if self.ended >= self.labels.keys():
                    return

    def _write(self, event: ev.Event) -> None:
        if self.jsonl:
            line: str | None = event.model_dump_json()
        else:
            line = transcript_line(event, self.labels.get(event.session_id, ""))
        if line is not None:
            print(line, file=self.out, flush=True)


def silence_broken_pipe(out: TextIO) -> None:
    """After EPIPE: point the descriptor at /dev/null, so the interpreter's last flush at
    exit does not print a BrokenPipeError of its own (what the Python docs advise)."""
    try:
        fd = out.fileno()
    except (OSError, ValueError):
        return  # not a real file (a StringIO in tests)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


async def run_files(settings: Settings, paths: Sequence[str], *, instruction: str | None = None,
                    jsonl: bool = False, out: TextIO = sys.stdout, runtime_options: dict[str, Any] | None = None,
                    speak_dir: str | Path | None = None) -> int:
    """Returns the exit code (see the module docstring). With a TTS engine each answer is
    spoken offline; `speak_dir` gets one `<turn_id>.wav` each."""
    from agent.runtime import AgentRuntime

    try:  # decode everything first: a bad file fails fast, before any model loads
        audios = {path: read_file(path) for path in paths}
    except AudioFileError as exc:
        print(f"voice-agent: {exc}", file=sys.stderr)
        return 2
    if speak_dir is not None:
        try:
            await asyncio.to_thread(Path(speak_dir).mkdir, parents=True, exist_ok=True)
        except OSError as exc:
            print(f"voice-agent: --speak-dir: {exc}", file=sys.stderr)
            return 2
    try:
        runtime = AgentRuntime(settings, **(runtime_options or {}))
        await runtime.start()
    except (InferenceError, ValueError, OSError) as exc:
        print(f"voice-agent: cannot start: {exc}", file=sys.stderr)
        if "runtime" in locals():
            await runtime.close()
        return 2
    printer = _Printer(out, jsonl)
    subscription = runtime.bus.subscribe(maxsize=100_000)
    printing = asyncio.create_task(printer.run(subscription))
    feeding: asyncio.Future[Any] | None = None
    files: dict[str, str] = {}  # session id → its file
    try:
        feeds = []
        for path, samples in audios.items():
            session = runtime.create_session(instruction=instruction, wait_for_responses=True,
                                             voice_output="offline" if runtime.tts is not None else "none")
            if session.voice is not None and speak_dir is not None:
                target = Path(speak_dir)
                session.voice.on_audio = lambda turn_id, pcm, rate, d=target: (d / f"{turn_id}.wav").write_bytes(
                    to_wav_bytes(pcm, rate))
            printer.labels[session.id] = f"{Path(path).name}: " if len(paths) > 1 else ""
            files[session.id] = path
            feeds.append(_feed(session, samples))
        feeding = asyncio.gather(*feeds)
        # The printer ends first only when its reader is gone: then stop feeding at once.
        both: list[asyncio.Future[Any]] = [feeding, printing]
        await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
        if printer.broken_pipe:
            feeding.cancel()
            await asyncio.gather(feeding, return_exceptions=True)
        else:
            await feeding
    finally:
        if feeding is not None and not feeding.done():
            feeding.cancel()
        await runtime.close()  # every session has ended now: its session.ended is queued
        try:
            await asyncio.wait_for(printing, timeout=30)  # a guard only: the events are all queued
        except TimeoutError:
            pass
        subscription.close()
    if printer.broken_pipe:
        return EXIT_BROKEN_PIPE
    if printer.errors:
        first = printer.errors[0]
        print(f"voice-agent: {len(printer.errors)} error{'s' if len(printer.errors) > 1 else ''}, "
              f"the first: [{first.code}] {first.message}", file=sys.stderr)
        return EXIT_FAILED_TURNS
    silent = [path for session_id, path in files.items() if session_id not in printer.spoke]
    for path in silent:
        print(f"voice-agent: no speech found in {path}", file=sys.stderr)
    return EXIT_NO_SPEECH if silent else 0
