"""Prompts the Conversation renders are token for token what the processor's template gives."""

import numpy as np
import pytest

from agent.conversation import Conversation, audio_token_count, render_prompt
from agent.inference import models

SR = 16000


@pytest.fixture(scope="module")
def processor():
    return models.load("tiny-random").processor


def hf_messages(messages):
    """Our audio parts → the template's own shape (an audio_url it only counts)."""
    out = []
    for m in messages:
        if isinstance(m["content"], str):
            out.append(m)
        else:
            out.append({"role": m["role"], "content": [
                {"type": "audio", "audio_url": f"#{p['audio']}"} if p["type"] == "audio" else p for p in m["content"]]})
    return out


def check_identical(processor, request):
    ours = render_prompt(request.messages)
    theirs = processor.apply_chat_template(hf_messages(request.messages), add_generation_prompt=True, tokenize=False)
    assert ours == theirs
    ids = processor(text=[ours], audio=request.audios, sampling_rate=SR, return_tensors="np")["input_ids"][0]
    ref = processor(text=[theirs], audio=request.audios, sampling_rate=SR, return_tensors="np")["input_ids"][0]
    np.testing.assert_array_equal(ids, ref)
    audio_id = processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    assert (ids == audio_id).sum() == sum(audio_token_count(a.size) for a in request.audios)
    return ours


def tone(seconds):
    t = np.arange(int(seconds * SR)) / SR
    return (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_chat_turn(processor):
    conv = Conversation()
    conv.add_user(tone(2.0))
    prompt = check_identical(processor, conv.request("s", "t"))
    assert prompt.endswith("Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n<|im_end|>\n<|im_start|>assistant\n")


def test_analysis_turn_with_custom_system_prompt(processor):
    conv = Conversation(system_prompt="You are a sound expert.")
    conv.add_user(tone(1.5), "What is that sound?")
    prompt = check_identical(processor, conv.request("s", "t"))
    assert prompt.startswith("<|im_start|>system\nYou are a sound expert.<|im_end|>")
    assert "<|audio_eos|>\nWhat is that sound?<|im_end|>" in prompt


def test_mixed_multi_turn_with_tool_results(processor):
    conv = Conversation()
    conv.add_user(tone(1.0))
    conv.add_assistant('<tool_call>\n{"name": "t", "arguments": {}}\n</tool_call>')
    conv.add_tool_results('<tool_response>\n{"name": "t", "result": 1}\n</tool_response>')
    conv.add_assistant("It is one.")
    conv.add_user(tone(2.0), "Transcribe this.")
    conv.add_assistant("hello")
    conv.add_user(tone(0.5))
    request = conv.request("s", "t", tools_block="# Tools\n<tools>\n{}\n</tools>")
    prompt = check_identical(processor, request)
    assert [prompt.count(f"Audio {n}:") for n in (1, 2, 3)] == [1, 1, 1]  # numbered across turns
    assert request.messages[0]["role"] == "system" and "<tools>" in request.messages[0]["content"]


def test_audio_over_30s_is_split_into_audio_parts(processor):
    conv = Conversation()
    conv.add_user(tone(70.0), "Summarise.")
    request = conv.request("s", "t")
    assert [a.size for a in request.audios] == [30 * SR, 30 * SR, 10 * SR]
    prompt = check_identical(processor, request)
    assert "Audio 3:" in prompt and audio_token_count(30 * SR) == 750


def test_context_budget_drops_oldest_turns_never_the_current(processor):
    conv = Conversation(context_tokens=2000)
    for i in range(6):
        conv.add_user(tone(10.0))  # 250 audio tokens each
        conv.add_assistant(f"answer {i}")
    conv.add_user(tone(30.0))  # 750 tokens: the current turn
    request = conv.request("s", "t", max_new_tokens=256)
    assert request.audios[-1].size == 30 * SR
    kept = len(request.audios)
    assert 1 < kept < 7
    assert request.messages[-2] == {"role": "assistant", "content": "answer 5"}  # the newest history stays
    check_identical(processor, request)
    lone = Conversation(context_tokens=600)
    lone.add_user(tone(30.0))  # alone over budget: still sent, never dropped
    assert len(lone.request("s", "t").audios) == 1


def test_bad_turns_are_refused_clearly():
    conv = Conversation()
    with pytest.raises(ValueError, match="empty turn"):
        conv.add_user(np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="over the limit"):
        conv.add_user(tone(1.0), "x" * 100_000)
