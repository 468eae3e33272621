"""espeak-ng (Debian package): the offline default. One subprocess per piece of text.

The text goes in on stdin (never argv, so text that starts with "-" is no option), the
WAV comes back on stdout as it is made. Closing the generator kills the process.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncGenerator

import numpy as np
from pydantic import Field

from agent.speech.base import EngineOptions, SpeechEngine, TTSError, WavStream

NORMAL_WPM = 175  # espeak-ng's default speed: rate 1.0
_voice_cache: dict[str, frozenset[str]] = {}


class EspeakOptions(EngineOptions):
    binary: str = "espeak-ng"
    pitch: int | None = Field(default=None, ge=0, le=99)
    amplitude: int | None = Field(default=None, ge=0, le=200)
    word_gap_ms: int | None = Field(default=None, ge=0, le=1000)


async def _run(*args: str, stdin: bytes = b"", limit_s: float = 10.0) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(limit_s):
            out, err = await proc.communicate(stdin)
    except TimeoutError:
        raise TTSError("tts_timeout", f"{args[0]} {args[1]} gave no answer in {limit_s:g} s") from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, out, err


async def espeak_voices(binary: str, limit_s: float = 10.0) -> frozenset[str]:
    """Every name `-v` accepts: language codes, voice names, voice files, and `+variant`s (lower case)."""
    if binary not in _voice_cache:
        names: set[str] = set()
        for kind in ("", "=variant"):
            rc, out, err = await _run(binary, f"--voices{kind}", limit_s=limit_s)
            if rc:
                raise TTSError("tts_failed", f"{binary} --voices failed: {err.decode(errors='replace').strip()}")
            for line in out.decode(errors="replace").splitlines()[1:]:
                cols = line.split()
                if len(cols) < 5:
                    continue
                _, lang, _, voice_name, file = cols[:5]
                tag = "+" if kind else ""
                names |= {tag + n.lower() for n in (voice_name, file.rsplit("/", 1)[-1])}
                if not kind:
                    names |= {lang.lower(), file.lower()}
        _voice_cache[binary] = frozenset(names)
    return _voice_cache[binary]


class EspeakEngine(SpeechEngine):
    name = "espeak"
    Options = EspeakOptions
    options: EspeakOptions

    async def start(self) -> None:
        binary = shutil.which(self.options.binary)
        if binary is None:
            raise TTSError("tts_unavailable", f"{self.options.binary} not found (Debian: apt-get install espeak-ng)")
        self.binary = binary
        self.voice = self.settings.voice or "en-us"
        voices = await espeak_voices(binary, self.settings.timeout_s)
        base, _, variant = self.voice.lower().partition("+")
        if base not in voices or (variant and "+" + variant not in voices):
            raise TTSError("tts_unknown_voice", f"espeak-ng has no voice {self.voice!r} (see `espeak-ng --voices`)")
        # A probe: proves the binary works and learns the rate (22050 Hz; mbrola voices differ).
        rc, out, err = await _run(*self._args(), stdin=b"a", limit_s=self.settings.timeout_s)
        parser = WavStream()
        if rc or parser.feed(out).size == 0:
            raise TTSError("tts_failed", f"espeak-ng made no audio (exit {rc}): {err.decode(errors='replace').strip()}")
        self.sample_rate = parser.sample_rate

    def _args(self) -> list[str]:
        args = [self.binary, "-v", self.voice, "-s", str(round(NORMAL_WPM * self.settings.rate)), "--stdin", "--stdout"]
        if self.options.pitch is not None:
            args += ["-p", str(self.options.pitch)]
        if self.options.amplitude is not None:
            args += ["-a", str(self.options.amplitude)]
        if self.options.word_gap_ms is not None:
            args += ["-g", str(round(self.options.word_gap_ms / 10))]  # espeak's unit is 10 ms
        return args

    async def synthesize(self, text: str) -> AsyncGenerator[np.ndarray, None]:
        proc = await asyncio.create_subprocess_exec(*self._args(), stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        try:
            proc.stdin.write(text.encode())
            await proc.stdin.drain()
            proc.stdin.close()
            parser = WavStream()
            while data := await proc.stdout.read(8192):
                try:
                    pcm = parser.feed(data)
                except ValueError as exc:
                    raise TTSError("tts_failed", f"espeak-ng wrote no WAV: {exc}") from None
                if pcm.size:
                    yield pcm
            err = await proc.stderr.read()
            if await proc.wait():
                raise TTSError("tts_failed", f"espeak-ng exited {proc.returncode}: {err.decode(errors='replace').strip()}")
        except (BrokenPipeError, ConnectionResetError):
            raise TTSError("tts_failed", "espeak-ng closed its input early") from None
        finally:
            if proc.returncode is None:  # closed or cancelled mid-piece: stop the work now
                proc.kill()
                await proc.wait()
