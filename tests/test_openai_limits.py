"""What a real OpenAI-compatible server (vLLM) limits, met by the agent: clips per request, the
server's context length, its health, a stream cut mid-answer; and the checkpoint vLLM serves."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from agent import events as ev
from agent.cli import main as cli_main
from agent.config import load_settings
from agent.conversation import Conversation
from agent.inference import models
from agent.inference.openai import OpenAIBackend
from agent.model.qwen2_audio import render_prompt
from agent.runtime import AgentRuntime
from agent.server.app import create_app
from tests.fake_openai import MODEL, FakeOpenAI
from tests.test_session import drain, feed

SR = 16000
GUARD = 20  # seconds: a hang fails the test instead of stalling the run (not a timing assert)


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.5, 0.5, int(seconds * SR)).astype(np.float32)


def user_parts(messages: list[dict]) -> list[list[str]]:
    return [[p["type"] for p in m["content"]] for m in messages if m["role"] == "user"]


def test_clips_per_request_drop_the_oldest_turns_audio_and_keep_their_text() -> None:
    conv = Conversation(max_audios=3)
    for k in range(5):
        conv.add_user(noise(1.0, k), f"instruction {k}")
        request = conv.request("s", f"t{k}", 16)
        conv.add_assistant(f"answer {k}")
    assert len(request.audios) == 3
    assert user_parts(request.messages) == [["text"], ["text"], ["audio", "text"], ["audio", "text"], ["audio", "text"]]
    assert [m["content"] for m in request.messages if m["role"] == "assistant"] == [f"answer {k}" for k in range(4)]
    # the newest clips are the ones sent, and the count is the prompt's own (numbering from "Audio 1")
    assert [a.size for a in request.audios] == [SR] * 3
    np.testing.assert_array_equal(request.audios[-1], noise(1.0, 4))
    prompt = render_prompt(request.messages)
    assert "Audio 3:" in prompt and "Audio 4:" not in prompt and prompt.count("instruction") == 5


def test_a_turn_over_30_s_counts_twice_and_keeps_all_or_none_of_its_clips() -> None:
    conv = Conversation(max_audios=3)
    conv.add_user(noise(1.0, 1))
    conv.add_assistant("a")
    conv.add_user(noise(45.0, 2))  # two clips
    conv.add_assistant("b")
    conv.add_user(noise(1.0, 3))
    assert len(conv.request("s", "t3").audios) == 3  # 1 + 2: the first turn's clip goes
    conv.add_assistant("c")
    conv.add_user(noise(1.0, 4))
    request = conv.request("s", "t4")
    assert user_parts(request.messages) == [[], [], ["audio"], ["audio"]]  # never one clip of the two
    with pytest.raises(ValueError, match="over the limit of 3 per request"):
        conv.add_user(noise(100.0))  # four clips: no request could carry it


def test_the_context_budget_is_the_servers_when_smaller() -> None:
    class Served:
        max_model_len, max_audios, tokenizer = 1024, 5, None

    conv = Conversation.for_backend(None, 6000, Served())
    assert (conv.context_tokens, conv.max_audios) == (1024, 5)
    for k in range(6):
        conv.add_user(noise(5.0, k))  # 125 audio tokens each
        request = conv.request("s", f"t{k}", 256)
        assert conv.token_count(request.messages, request.audios) + 256 <= 1024
        conv.add_assistant("x" * 100)
    assert len(request.audios) < 5  # the token budget, not the clip bound, dropped turns here


async def test_more_turns_than_the_servers_clip_limit_all_get_answers() -> None:
    async with FakeOpenAI() as fake:
        fake.max_audios = 5  # vLLM --limit-mm-per-prompt '{"audio": 5}'
        backend = OpenAIBackend(fake.url, MODEL)  # openai_max_audios defaults to 5
        await backend.start()
        try:
            conv = Conversation.for_backend(None, 6000, backend)
            for k in range(8):
                conv.add_user(noise(0.5, k))
                pieces = [p async for p in backend.generate(conv.request("s", f"t{k}", 16))]
                conv.add_assistant("".join(pieces))
        finally:
            await backend.close()
    assert fake.rejected == [] and [len(a) for a in fake.audios] == [1, 2, 3, 4, 5, 5, 5, 5]


async def test_a_stream_cut_mid_answer_ends_the_turn_with_what_was_said(speech_two) -> None:
    async with FakeOpenAI() as fake:
        fake.end_after = 2  # the connection ends after "Hel", "lo": no finish, no [DONE]
        runtime = AgentRuntime(load_settings(None, backend="openai", openai_url=fake.url))
        await runtime.start()
        sub = runtime.bus.subscribe()
        session = runtime.create_session(wait_for_responses=True)
        await asyncio.wait_for(feed(session, speech_two.samples), GUARD)
        await asyncio.wait_for(session.finish(), GUARD)
        events = drain(sub)
        await runtime.close()
    errors = [e for e in events if isinstance(e, ev.Error)]
    cancelled = [e for e in events if isinstance(e, ev.ResponseCancelled)]
    assert len(errors) == len(cancelled) == 2 and not [e for e in events if isinstance(e, ev.ResponseDone)]
    assert errors[0].code == "backend_error" and errors[0].message.endswith("the server closed the stream after 2 tokens")
    assert "Payload" not in errors[0].message and "TransferEncoding" not in errors[0].message
    assert [(c.reason, c.spoken_text) for c in cancelled] == [("backend_error", "Hello")] * 2
    assert [e.turn_id for e in errors] == [c.turn_id for c in cancelled]
    # the history keeps what was said: the second request carries the first, cut answer
    second = fake.requests[1]["messages"]
    assert [m["role"] for m in second] == ["user", "assistant", "user"] and second[1]["content"] == "Hello"


async def test_healthz_and_metrics_show_the_openai_server_down_and_back() -> None:
    async with FakeOpenAI() as fake:
        runtime = AgentRuntime(load_settings(None, backend="openai", openai_url=fake.url),
                               backend=OpenAIBackend(fake.url, health_interval_s=0.05))
        await runtime.start()
        runner = web.AppRunner(create_app(runtime, runtime.settings))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            async with aiohttp.ClientSession() as http:
                assert await _health(http, url) == (200, 1)
                fake.down = True
                await asyncio.wait_for(_until_health(http, url, (503, 0)), GUARD)
                fake.down = False
                await asyncio.wait_for(_until_health(http, url, (200, 1)), GUARD)
        finally:
            await runner.cleanup()
            await runtime.close()


async def _health(http: aiohttp.ClientSession, url: str) -> tuple[int, int]:
    async with http.get(f"{url}/healthz") as r:
        status = r.status
        body = await r.json()
    assert body["status"] == ("ok" if status == 200 else "unavailable") and body["model"] == MODEL
    async with http.get(f"{url}/metrics") as r:
        assert r.status == 200
        line = next(x for x in (await r.text()).splitlines() if x.startswith("voice_agent_backend_up "))
    return status, int(float(line.split()[1]))


async def _until_health(http: aiohttp.ClientSession, url: str, want: tuple[int, int]) -> None:
    while await _health(http, url) != want:
        await asyncio.sleep(0.05)


def test_the_model_loads_straight_onto_its_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import Qwen2AudioForConditionalGeneration

    def no_move(self, *args, **kwargs):
        raise AssertionError("the model was built elsewhere and moved: load it where it runs")

    monkeypatch.setattr(Qwen2AudioForConditionalGeneration, "to", no_move)
    loaded = models.load(models.TINY_RANDOM, device="cpu")
    assert next(loaded.model.parameters()).device.type == "cpu"


def test_model_save_writes_a_checkpoint_vllm_can_serve(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "tiny"
    assert cli_main(["model", "save", "tiny-random", str(target)]) == 0
    assert capsys.readouterr().out.strip() == str(target)
    names = {p.name for p in target.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= names
    text = json.loads((target / "config.json").read_text())["text_config"]
    assert text["hidden_size"] // text["num_attention_heads"] == 32  # vLLM's CPU attention refuses 16
    assert models.load(str(target)).model.config.model_type == "qwen2_audio"
    assert models.load_tokenizer(str(target)) is not None
    assert cli_main(["model", "save", "tiny-random", str(target)]) == 2  # never over a checkpoint
    assert "not empty" in capsys.readouterr().err
