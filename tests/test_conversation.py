"""Prompts the Conversation renders are token for token what the processor's template gives,
and its token counts are the processor's own."""

import numpy as np
import pytest

from agent.conversation import Conversation
from agent.inference import models
from agent.model.qwen2_audio import MAX_CLIP_SAMPLES, audio_token_count, render_prompt

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


def check_identical(processor, conv, request):
    """The prompt equals the template's, and token_count equals the processor's input length."""
    ours = render_prompt(request.messages)
    theirs = processor.apply_chat_template(hf_messages(request.messages), add_generation_prompt=True, tokenize=False)
    assert ours == theirs
    ids = processor(text=[theirs], audio=request.audios, sampling_rate=SR, return_tensors="np")["input_ids"][0]
    assert conv.token_count(request.messages, request.audios) == len(ids)
    assert conv.token_count(request.messages) == len(ids)  # defaults to the latest request's audios
    exact = Conversation(tokenizer=processor.tokenizer)  # the tokenizer path counts the same
    assert exact.token_count(request.messages, request.audios) == len(ids)
    audio_id = processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    assert (ids == audio_id).sum() == sum(audio_token_count(a.size) for a in request.audios)
    return ours


def tone(seconds):
    t = np.arange(int(seconds * SR)) / SR
    return (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_audio_token_count_is_the_processors(processor):
    lengths = [1, 160, 161, 320, 321, 479, 480, 481, 1601, 16000, 16001, 16159, 123457,
               MAX_CLIP_SAMPLES - 1, MAX_CLIP_SAMPLES, MAX_CLIP_SAMPLES + 1, 40 * SR]
    text = "<|AUDIO|>" * len(lengths)
    ids = processor(text=[text], audio=[np.zeros(n, np.float32) for n in lengths], sampling_rate=SR,
                    return_tensors="np")["input_ids"][0]
    assert len(ids) == sum(audio_token_count(n) for n in lengths)
    # one at a time too: each count, not just the sum
    for n in (321, 16001, 123457):
        one = processor(text=["<|AUDIO|>"], audio=[np.zeros(n, np.float32)], sampling_rate=SR,
                        return_tensors="np")["input_ids"][0]
        assert len(one) == audio_token_count(n)
    assert audio_token_count(SR) == 25 and audio_token_count(MAX_CLIP_SAMPLES) == 750
    assert audio_token_count(10 * MAX_CLIP_SAMPLES) == 750


def test_chat_turn(processor):
    conv = Conversation()
    conv.add_user(tone(2.0))
    request = conv.request("s", "t")
    prompt = check_identical(processor, conv, request)
    assert prompt.endswith("Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n<|im_end|>\n<|im_start|>assistant\n")
    assert request.messages[0]["role"] == "user"  # no system message: the template's default applies
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")


def test_analysis_turn_adds_only_a_text_part(processor):
    conv = Conversation()
    conv.add_user(tone(1.3), "What is that sound?")
    request = conv.request("s", "t")
    prompt = check_identical(processor, conv, request)
    assert request.messages == [{"role": "user", "content": [
        {"type": "audio", "audio": 0}, {"type": "text", "text": "What is that sound?"}]}]
    assert "<|audio_eos|>\nWhat is that sound?<|im_end|>" in prompt


def test_custom_system_prompt_settable_and_non_ascii(processor):
    conv = Conversation(system_prompt="You are a sound expert.")
    conv.add_user(tone(1.5), "Qu'est-ce que c'est ? e\u0301 — 音")  # NFC and multi-byte text count right
    prompt = check_identical(processor, conv, conv.request("s", "t"))
    assert prompt.startswith("<|im_start|>system\nYou are a sound expert.<|im_end|>")
    conv.system_prompt = "Be brief."
    assert check_identical(processor, conv, conv.request("s", "t")).startswith("<|im_start|>system\nBe brief.")
    conv.system_prompt = None
    assert conv.request("s", "t").messages[0]["role"] == "user"


def test_mixed_multi_turn_with_tool_calls_and_results(processor):
    conv = Conversation()
    call = '<tool_call>\n{"name": "t", "arguments": {}}\n</tool_call>'
    conv.add_user(tone(1.0))
    conv.add_assistant(call)
    conv.add_tool_results('<tool_response>\n{"name": "t", "result": 1}\n</tool_response>')
    conv.add_assistant("It is one.")
    conv.add_user(tone(2.0), "Transcribe this.")
    conv.add_assistant("hello")
    conv.add_user(tone(0.5))
    tools = "# Tools\n<tools>\n{}\n</tools>"
    request = conv.request("s", "t", tools_block=tools)
    prompt = check_identical(processor, conv, request)
    assert [prompt.count(f"Audio {n}:") for n in (1, 2, 3)] == [1, 1, 1]  # numbered across turns
    assert request.messages[0] == {"role": "system", "content": f"You are a helpful assistant.\n\n{tools}"}
    assert request.messages[2] == {"role": "assistant", "content": call}  # raw tool call kept
    assert request.messages[3]["role"] == "user" and "<tool_response>" in request.messages[3]["content"][0]["text"]
    custom = Conversation("Be brief.")
    custom.add_user(tone(1.0))
    assert custom.request("s", "t", tools_block=tools).messages[0]["content"] == f"Be brief.\n\n{tools}"


def test_audio_over_30s_is_split_into_audio_parts(processor):
    conv = Conversation()
    conv.add_user(tone(4.0))
    conv.add_assistant("a beep")
    long = tone(70.0)
    conv.add_user(long, "Summarise.")
    request = conv.request("s", "t")
    assert len(request.audios) == 4 and all(a.size <= MAX_CLIP_SAMPLES for a in request.audios)
    np.testing.assert_array_equal(np.concatenate(request.audios[1:]), long)
    prompt = check_identical(processor, conv, request)
    assert prompt.count("Audio 4:") == 1 and prompt.rstrip().endswith("Summarise.<|im_end|>\n<|im_start|>assistant")
    # just over 30 s: two even halves, no tail too short for the encoder
    conv2 = Conversation()
    conv2.add_user(tone(30.0 + 1 / SR))
    assert sorted(a.size for a in conv2.request("s", "t").audios) == [240000, 240001]


def test_context_budget_drops_oldest_turns_never_the_current(processor):
    conv = Conversation(context_tokens=2000)
    for i in range(6):
        conv.add_user(tone(10.0))  # 250 audio tokens each
        conv.add_assistant(f"answer {i}")
    conv.add_user(tone(30.0), "Describe it.")  # 750 tokens: the current turn
    conv.add_assistant('<tool_call>\n{"name": "t", "arguments": {}}\n</tool_call>')
    conv.add_tool_results("<tool_response>\n1\n</tool_response>")  # a tool round: part of the current turn
    request = conv.request("s", "t", max_new_tokens=256)
    assert request.audios[-1].size == 30 * SR
    assert 1 < len(request.audios) < 7
    assert request.messages[-3:-1] == [
        {"role": "user", "content": [{"type": "audio", "audio": len(request.audios) - 1},
                                     {"type": "text", "text": "Describe it."}]},
        {"role": "assistant", "content": '<tool_call>\n{"name": "t", "arguments": {}}\n</tool_call>'}]
    # whole turns: the oldest kept message is a user turn, the newest history stays
    assert request.messages[0]["role"] == "user" and request.messages[1]["role"] == "assistant"
    assert request.messages[-4]["content"] == "answer 5"
    used = conv.token_count(request.messages)
    assert used + 256 <= 2000
    check_identical(processor, conv, request)
    # and the window is the largest that fits: one more old turn would not
    kept_turns = len(request.audios) - 1
    wider = Conversation(context_tokens=10**6)
    for i in range(6 - kept_turns - 1, 6):
        wider.add_user(tone(10.0))
        wider.add_assistant(f"answer {i}")
    wider.add_user(tone(30.0), "Describe it.")
    wider.add_assistant('<tool_call>\n{"name": "t", "arguments": {}}\n</tool_call>')
    wider.add_tool_results("<tool_response>\n1\n</tool_response>")
    wide = wider.request("s", "t")
    assert len(wide.audios) == kept_turns + 2
    assert wider.token_count(wide.messages) + 256 > 2000


def test_current_turn_alone_over_budget_is_still_sent():
    lone = Conversation(context_tokens=600)
    lone.add_user(tone(5.0))
    lone.add_assistant("earlier")
    lone.add_user(tone(30.0))  # 750 tokens > 600: the history goes, the turn stays
    request = lone.request("s", "t")
    assert len(request.audios) == 1 and request.audios[0].size == 30 * SR
    assert [m["role"] for m in request.messages] == ["user"]


def test_long_sessions_free_history_that_can_no_longer_fit():
    freeing, keeping = Conversation(context_tokens=1000), Conversation(context_tokens=1000)
    for i in range(40):
        for conv in (freeing, keeping):
            conv.add_user(tone(1.0 + (i % 5)))  # 25..125 audio tokens
        freeing.request("s", f"t{i}", max_new_tokens=100)  # requests free what cannot fit any more
        for conv in (freeing, keeping):
            conv.add_assistant(f"answer {i}")
    assert len(freeing._entries) < 30 and len(keeping._entries) == 80  # audio is not kept forever
    for conv in (freeing, keeping):
        conv.add_user(tone(1.0))
    # freeing changed nothing a prompt could hold
    a, b = freeing.request("s", "t", max_new_tokens=100), keeping.request("s", "t", max_new_tokens=100)
    assert a.messages == b.messages and len(a.audios) == len(b.audios)
    assert a.messages[-2]["content"] == "answer 39" and freeing.token_count(a.messages) <= 900


def test_pop_last_user_drops_the_uncommitted_turn():
    conv = Conversation()
    conv.add_user(tone(1.0))
    conv.add_assistant("one")
    conv.add_user(tone(2.0), "speculative")
    conv.request("s", "t")
    conv.pop_last_user()
    conv.add_user(tone(3.0))
    request = conv.request("s", "t")
    assert [a.size for a in request.audios] == [SR, 3 * SR]
    assert all(p.get("text") != "speculative" for m in request.messages if isinstance(m["content"], list)
               for p in m["content"])


def test_huge_instruction_is_refused_clearly_and_the_session_goes_on():
    """Decision: an instruction over half the context budget is refused at add_user (the
    current turn can never be dropped, so it could only overflow the model's context)."""
    conv = Conversation(context_tokens=6000)
    with pytest.raises(ValueError, match=r"instruction of 100000 tokens is over the limit of 3000"):
        conv.add_user(tone(1.0), "x" * 100_000)
    conv.add_user(tone(1.0), "y" * 2900)  # under the limit: accepted and sent whole
    request = conv.request("s", "t")
    assert request.messages[-1]["content"][-1]["text"] == "y" * 2900


def test_bad_turns_are_refused_clearly():
    conv = Conversation()
    with pytest.raises(ValueError, match="empty turn"):
        conv.add_user(np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        conv.add_user(np.array([0.0, np.nan] * 800, np.float32))
    with pytest.raises(ValueError, match="mono"):
        conv.add_user(np.zeros((2, 1600), np.float32))
    with pytest.raises(ValueError, match="no user turn"):
        conv.request("s", "t")
    buf = tone(1.0)
    conv.add_user(buf)
    buf[:] = 0  # callers may reuse their buffer
    assert conv.request("s", "t").audios[0].any()


class CountingTokenizer:
    """The model's tokenizer, recording how much text it was asked to tokenize."""

    def __init__(self, tokenizer):
        self.tokenizer, self.chars = tokenizer, 0

    def __call__(self, text, **kwargs):
        self.chars += len(text)
        return self.tokenizer(text, **kwargs)


def _random_conversation(rng, tokenizer=None, turns=130):
    conv = Conversation(context_tokens=10**7, tokenizer=tokenizer)
    texts = ["ok", "héllo wörld — 世界 🎧", '<tool_call>\n{"name": "t", "arguments": {"x": 1}}\n</tool_call>',
             "line\n\nbreaks  and   spaces ", "<|im_end|> typed by a user", "Audio 12: not a real one"]
    for i in range(turns):
        seconds = float(rng.choice([0.1, 0.7, 3.0, 31.0, 65.0])) if i % 17 else 0.05
        conv.add_user(tone(seconds), texts[i % len(texts)] if i % 3 == 0 else None)
        if i % 11 == 5:
            conv.add_user_text(texts[(i + 1) % len(texts)])
        conv.add_assistant(texts[(i + 2) % len(texts)])
        if i % 7 == 3:
            conv.add_tool_results("<tool_response>\n{\"ok\": true}\n</tool_response>")
            conv.add_assistant("done")
        if i % 13 == 6:
            conv.truncate_last_answer("do")
    return conv


@pytest.mark.parametrize("exact", [False, True])
def test_incremental_counts_equal_full_counts(processor, exact):
    """Per-entry counts add up to the whole prompt's count for every window and system
    prompt, past 10 and 100 audios ("Audio 100:" has two more digit tokens than "Audio 1:")."""
    rng = np.random.RandomState(0)
    conv = _random_conversation(rng, processor.tokenizer if exact else None)
    assert sum(len(e[1]) for e in conv._entries if e[0] == "user") > 150
    n = len(conv._entries)
    for system in (None, "", "Be brief.", "Système — 🎧 <tools>\n[]\n</tools>"):
        for first in sorted({0, 1, 2, 5, 9, 40, 97, n // 2, n - 3, n - 1}):
            for end in sorted({first + 1, (first + n) // 2 + 1, n}):
                fast = conv._window_cost(system, first, end)
                assert fast == conv.token_count(*conv._render(system, first, end)), (system, first, end)
    # a tokenizer that does not split digits one by one: every count renders the whole prompt
    conv._digits_split = False
    assert conv._window_cost("Be brief.", 3, n) == conv.token_count(*conv._render("Be brief.", 3, n))


def test_a_request_tokenizes_only_what_is_new(processor):
    counting = CountingTokenizer(processor.tokenizer)
    conv = Conversation(context_tokens=4000, tokenizer=counting)
    for i in range(60):
        conv.add_user(tone(1.0), "What is it?" if i % 2 else None)
        conv.request("s", f"t{i}", max_new_tokens=64)
        conv.add_assistant(f"answer number {i} " * 3)
    conv.add_user(tone(1.0), "and now?")
    counting.chars = 0
    request = conv.request("s", "t", max_new_tokens=64)
    new_text = len(render_prompt(request.messages[-2:], add_generation_prompt=False))
    assert 0 < counting.chars <= 2 * new_text  # the new turn and the answer before it, not the history
    check_identical(processor, conv, request)
