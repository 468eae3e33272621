"""The `openai` backend against a local server that speaks vLLM's chat-completions wire format."""

import asyncio
import io
import socket
from contextlib import aclosing

import numpy as np
import pytest

from agent import events as ev
from agent.config import load_settings
from agent.conversation import Conversation
from agent.inference.base import GenerationStats, InferenceError
from agent.inference.openai import OpenAIBackend
from agent.transports.files import run_files
from tests.fake_openai import MODEL, FakeOpenAI

SR = 16000
GUARD = 20  # seconds: a hang fails the test instead of stalling the run (not a timing assert)


@pytest.fixture
async def fake():
    async with FakeOpenAI() as server:
        yield server


@pytest.fixture
async def backend(fake):
    b = OpenAIBackend(fake.url, MODEL)
    await b.start()
    yield b
    await b.close()


def noise(seconds, seed=0):
    return (np.random.default_rng(seed).uniform(-0.5, 0.5, int(seconds * SR))).astype(np.float32)


def request_for(audio, instruction=None):
    conv = Conversation()
    conv.add_user(audio, instruction)
    return conv.request("s1", "t1", max_new_tokens=16)


async def collect(backend, request, stats=None):
    return await asyncio.wait_for(_collect(backend, request, stats), GUARD)


async def _collect(backend, request, stats):
    return [piece async for piece in backend.generate(request, stats)]


async def test_streams_deltas_in_order_and_fills_stats(fake, backend):
    stats = GenerationStats()
    pieces = await collect(backend, request_for(noise(1.0)), stats)
    assert pieces == ["Hel", "lo", " there"] and "".join(pieces) == "Hello there"
    assert stats.tokens == 3 and stats.prompt_tokens == 42  # from the server's usage chunk
    assert set(stats.timings) == {"ttft", "total"} and stats.timings["ttft"] <= stats.timings["total"]
    body = fake.requests[0]
    assert body["stream"] is True and body["model"] == MODEL and body["max_tokens"] == 16
    assert fake.rejected == [] and fake.completed == 1 and backend.queue_depth == 0


async def test_without_usage_tokens_are_counted_from_deltas(fake, backend):
    fake.usage, fake.pieces = False, ["a", "b", "c", "d"]
    stats = GenerationStats()
    assert await collect(backend, request_for(noise(0.5)), stats) == ["a", "b", "c", "d"]
    assert stats.tokens == 4 and stats.prompt_tokens == 0


async def test_audio_arrives_as_the_same_samples_and_the_instruction_as_text(fake, backend):
    audio = noise(1.7, seed=3)
    await collect(backend, request_for(audio, "Transcribe it."))
    content = fake.requests[0]["messages"][-1]["content"]
    assert [p["type"] for p in content] == ["input_audio", "text"]
    assert content[-1] == {"type": "text", "text": "Transcribe it."}
    (sent,) = fake.audios[0]
    assert sent.size == audio.size
    np.testing.assert_allclose(sent, audio, atol=1.5 / 32767)  # int16 quantization only


async def test_chat_history_and_long_audio_map_to_parts(fake, backend):
    conv = Conversation("Be brief.")
    conv.add_user(noise(1.0, 1))  # voice chat: audio only
    conv.add_assistant('<tool_call>\n{"name": "t", "arguments": {}}\n</tool_call>')
    conv.add_tool_results("<tool_response>\n1\n</tool_response>")
    conv.add_assistant("One.")
    long = noise(45.0, 2)
    conv.add_user(long)  # over 30 s: two audio parts
    await collect(backend, conv.request("s", "t"))
    messages = fake.requests[0]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert messages[0]["content"] == "Be brief." and messages[4]["content"] == "One."
    assert [p["type"] for p in messages[1]["content"]] == ["input_audio"]
    assert messages[3]["content"] == [{"type": "text", "text": "<tool_response>\n1\n</tool_response>"}]
    assert [p["type"] for p in messages[5]["content"]] == ["input_audio", "input_audio"]
    np.testing.assert_allclose(np.concatenate(fake.audios[0][1:]), long, atol=1.5 / 32767)


async def test_api_key_is_sent_as_bearer(fake):
    b = OpenAIBackend(fake.url, MODEL, api_key="sk-test")
    await b.start()
    await collect(b, request_for(noise(0.3)))
    await b.close()
    assert fake.headers[0]["Authorization"] == "Bearer sk-test"


async def test_aclose_mid_stream_closes_the_server_stream(fake, backend):
    fake.stall_after = 1
    stream = backend.generate(request_for(noise(1.0)))
    assert await asyncio.wait_for(stream.__anext__(), GUARD) == "Hel"
    await stream.aclose()  # what a barge-in does
    await asyncio.wait_for(fake.disconnected.wait(), GUARD)
    assert fake.completed == 0 and backend.queue_depth == 0


async def test_break_and_task_cancel_close_the_server_stream(fake, backend):
    fake.stall_after = 1
    async with aclosing(backend.generate(request_for(noise(1.0)))) as stream:
        async for _ in stream:
            break
    await asyncio.wait_for(fake.disconnected.wait(), GUARD)
    fake.disconnected.clear()

    first = asyncio.Event()

    async def consume():
        async with aclosing(backend.generate(request_for(noise(1.0)))) as s:
            async for _ in s:
                first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), GUARD)
    task.cancel()  # waiting on the stalled stream
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(fake.disconnected.wait(), GUARD)
    assert fake.completed == 0 and backend.queue_depth == 0


@pytest.mark.parametrize("status,code", [(500, "backend_error"), (503, "backend_unavailable"), (429, "busy"), (404, "backend_error")])
async def test_http_errors_map_to_clear_codes(fake, backend, status, code):
    fake.status = status
    with pytest.raises(InferenceError) as info:
        await collect(backend, request_for(noise(0.5)))
    assert info.value.code == code
    assert str(status) in info.value.message and "overloaded" in info.value.message
    assert fake.url in info.value.message


async def test_a_request_the_server_rejects_reports_its_reason(fake, backend):
    fake.max_audios = 1  # --limit-mm-per-prompt '{"audio": 1}': a 45 s turn is two clips
    with pytest.raises(InferenceError) as info:
        await collect(backend, request_for(noise(45.0)))
    assert info.value.code == "backend_error" and "400" in info.value.message
    assert "At most 1 audio(s) may be provided in one prompt" in info.value.message and len(fake.rejected) == 1


async def test_a_model_the_server_does_not_serve_is_refused_at_start_naming_what_it_serves(fake):
    b = OpenAIBackend(fake.url, "some/other-model")
    with pytest.raises(InferenceError) as info:
        await b.start()
    assert info.value.code == "backend_error"
    assert "'some/other-model' is not served" in info.value.message and MODEL in info.value.message


async def test_the_served_model_name_and_context_come_from_v1_models(fake):
    fake.model, fake.max_model_len = "/models/tiny", 2048
    b = OpenAIBackend(fake.url)  # no --openai-model: the one the server serves
    await b.start()
    try:
        assert (b.model_name, b.max_model_len) == ("/models/tiny", 2048)
        assert "".join(await collect(b, request_for(noise(0.5)))) == "Hello there"
        assert fake.requests[0]["model"] == "/models/tiny"
        conv = Conversation.for_backend(None, 6000, b)
        assert conv.context_tokens == 2048 and conv.max_audios == 5
    finally:
        await b.close()


async def test_a_404_names_the_models_served(fake, backend):
    fake.model = "another"  # the server was restarted with another model
    with pytest.raises(InferenceError) as info:
        await collect(backend, request_for(noise(0.5)))
    assert info.value.code == "backend_error"
    assert f"'{MODEL}' is not served" in info.value.message and "it serves: another" in info.value.message


async def test_health_follows_the_server_down_and_back(fake):
    b = OpenAIBackend(fake.url, MODEL, health_interval_s=0.05)
    await b.start()
    try:
        assert b.healthy
        fake.down = True
        await asyncio.wait_for(_until(lambda: not b.healthy), GUARD)
        fake.down = False
        await asyncio.wait_for(_until(lambda: b.healthy), GUARD)
    finally:
        await b.close()


async def _until(condition):
    while not condition():
        await asyncio.sleep(0.01)


async def test_error_chunk_mid_stream_is_backend_error(fake, backend):
    fake.error_after = 1
    got: list[str] = []
    with pytest.raises(InferenceError) as info:
        async for piece in backend.generate(request_for(noise(0.5))):
            got.append(piece)
    assert got == ["Hel"] and info.value.code == "backend_error" and "engine crashed" in info.value.message


async def test_stream_ending_before_the_answer_is_backend_error(fake, backend):
    fake.end_after = 2  # the connection ends cleanly, but with no finish_reason and no [DONE]
    got: list[str] = []
    with pytest.raises(InferenceError) as info:
        async for piece in backend.generate(request_for(noise(0.5))):
            got.append(piece)
    assert got == ["Hel", "lo"] and info.value.code == "backend_error"
    assert info.value.message.endswith("the server closed the stream after 2 tokens")


async def test_dead_endpoint_is_backend_unavailable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    b = OpenAIBackend(f"http://127.0.0.1:{port}/v1", MODEL, timeout=GUARD, connect_timeout=GUARD)
    await b.start()
    with pytest.raises(InferenceError) as info:
        await collect(b, request_for(noise(0.5)))  # refused at once; the guard catches a hang
    await b.close()
    assert info.value.code == "backend_unavailable"
    assert f"http://127.0.0.1:{port}/v1/chat/completions" in info.value.message


async def test_silent_server_times_out_as_backend_unavailable():
    with socket.socket() as listener:  # accepts connections (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        b = OpenAIBackend(f"http://127.0.0.1:{port}/v1", MODEL, timeout=0.3)
        await b.start()
        with pytest.raises(InferenceError) as info:
            await collect(b, request_for(noise(0.5)))
        await b.close()
    assert info.value.code == "backend_unavailable" and "timeout" in info.value.message
    assert str(port) in info.value.message


async def test_unknown_host_is_backend_unavailable():
    b = OpenAIBackend("http://no-such-host.invalid:8000/v1", MODEL, connect_timeout=5)
    await b.start()
    with pytest.raises(InferenceError) as info:
        await collect(b, request_for(noise(0.5)))
    await b.close()
    assert info.value.code == "backend_unavailable" and "no-such-host.invalid" in info.value.message


async def test_misuse_is_reported_clearly():
    with pytest.raises(ValueError, match="http"):
        OpenAIBackend("127.0.0.1:8000/v1", MODEL)
    b = OpenAIBackend("http://127.0.0.1:8000/v1", MODEL)
    with pytest.raises(InferenceError, match="not started") as info:
        await collect(b, request_for(noise(0.5)))
    assert info.value.code == "backend_unavailable"
    assert (b.name, b.model_name, b.warning) == ("openai", MODEL, None)
    await b.prefill(request_for(noise(0.5)))  # no-ops by design
    await b.drop("s1", "t1")
    await b.forget("s1")


async def test_file_run_through_the_openai_backend(fake, speech_two):
    settings = load_settings(None, backend="openai", openai_url=fake.url)
    out = io.StringIO()
    assert await run_files(settings, [str(speech_two.path)], jsonl=True, out=out) == 0
    events = [ev.parse_event(line) for line in out.getvalue().splitlines()]
    done = [e for e in events if isinstance(e, ev.ResponseDone)]
    assert [d.text for d in done] == ["Hello there", "Hello there"]
    # the second turn carries the whole history: two audios, the first answer in between
    second = fake.requests[1]["messages"]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[1]["content"] == "Hello there"
    assert fake.rejected == []
