"""The conversation's budget counts prompts in the backend's model family's format: Voxtral's
clips cost 375 tokens per started 30 s window, Qwen2.5-Omni's audios are not numbered."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from agent.conversation import Conversation
from agent.inference import models
from agent.inference.base import GenerationStats
from agent.model import family as families

SR = 16000
VOXTRAL = families.for_model_type("voxtral")
OMNI = families.for_model_type("qwen2_5_omni")


def tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def full_count(family: families.Family, messages, audios, text_tokens) -> int:
    """The prompt rendered whole by the family, each placeholder expanded: the reference."""
    n = text_tokens(family.render_prompt(messages, True))
    clips = [audios[p["audio"]] for m in messages if not isinstance(m["content"], str)
             for p in m["content"] if p["type"] == "audio"]
    return n + sum(family.audio_token_count(c.size) - 1 for c in clips)


def chat(conv: Conversation, turns: int, seconds: float = 2.0) -> None:
    for k in range(turns):
        conv.add_user(tone(seconds), "what is this?" if k % 3 == 0 else None)
        conv.add_assistant(f"answer number {k}, a few words long")


def test_voxtral_budget_counts_375_per_clip_and_trims() -> None:
    """Ten 2 s turns: 50 tokens each by Qwen2-Audio's rule, 375 by Voxtral's. With 2000 tokens
    the old rule keeps every turn (a prompt of ≈ 3900 real tokens: over the context), the
    family's keeps what fits."""
    qwen = Conversation(context_tokens=2000)
    vox = Conversation(context_tokens=2000, family=VOXTRAL)
    for conv in (qwen, vox):
        chat(conv, 10)
    old = qwen.request("s", "t", max_new_tokens=100)
    assert sum(1 for m in old.messages if m["role"] == "user") == 10  # all of it fits, by the old count
    req = vox.request("s", "t", max_new_tokens=100)
    users = sum(1 for m in req.messages if m["role"] == "user")
    assert 1 <= users < 10
    counted = vox.token_count(req.messages, req.audios)
    assert counted == full_count(VOXTRAL, req.messages, req.audios, vox._text_tokens)
    assert counted + 100 <= 2000
    assert counted + 100 > 2000 - 400  # and it keeps as much as fits: one more turn would not
    assert all(m["role"] != "system" for m in req.messages)  # no default system for Voxtral
    assert VOXTRAL.render_prompt(req.messages, True).count("[AUDIO]") == users
    # the same messages, counted by Qwen2-Audio's rule, undercount by ≈ 325 audio tokens per clip (less its longer template)
    assert qwen.token_count(req.messages, req.audios) < counted - 250 * users


def test_voxtral_refuses_nothing_but_keeps_the_current_turn() -> None:
    """A budget smaller than one Voxtral clip: the current turn is still sent (never dropped)."""
    conv = Conversation(context_tokens=800, family=VOXTRAL)
    chat(conv, 3)
    conv.add_user(tone(31))  # two clips: 750 audio tokens
    req = conv.request("s", "t", max_new_tokens=16)
    assert len(req.audios) == 2 and sum(1 for m in req.messages if m["role"] == "user") == 1


@pytest.mark.parametrize("family", [VOXTRAL, OMNI, families.default()], ids=lambda f: f.name)
@pytest.mark.parametrize("system", [None, "Be brief."])
def test_incremental_count_equals_the_whole_prompt(family: families.Family, system: str | None) -> None:
    """The per-entry counts add up to the prompt rendered whole (Voxtral: up to the system text,
    counted in its text-only form, which is never less), for every window `request` tries."""
    conv = Conversation(system, context_tokens=10**7, family=family)
    rng = np.random.default_rng(3)
    for k in range(12):
        conv.add_user(tone(float(rng.uniform(0.2, 40.0))), "describe it" if k % 2 else None)
        conv.add_assistant("sure " * int(rng.integers(1, 9)))
        if k % 4 == 1:
            conv.add_tool_results('<tool_response>\n{"name": "x", "result": 1}\n</tool_response>')
            conv.add_assistant("done")
    starts = conv._turn_starts()
    for first in starts:
        messages, audios = conv._render(conv.system_message(), first)
        whole = full_count(family, messages, audios, conv._text_tokens)
        incremental = conv._window_cost(conv.system_message(), first, len(conv._entries))
        if family is VOXTRAL and system:
            assert whole <= incremental <= whole + 2  # "[SYSTEM_PROMPT]…[/SYSTEM_PROMPT]" vs "…\n\n"
        else:
            assert incremental == whole


def test_omni_is_counted_without_audio_numbers() -> None:
    conv = Conversation(context_tokens=10**6, family=OMNI)
    chat(conv, 12)
    req = conv.request("s", "t")
    assert "Audio 1:" not in OMNI.render_prompt(req.messages, True)
    qwen = Conversation(context_tokens=10**6)
    chat(qwen, 12)
    # Qwen2-Audio writes "Audio N: …\n": 10 bytes a clip with one digit (12 clips: 10·12 + 3 extra digits)
    assert qwen.token_count(qwen.request("s", "t").messages) - conv.token_count(req.messages) == 10 * 12 + 3


def test_for_backend_takes_the_backends_family() -> None:
    backend = SimpleNamespace(tokenizer=None, max_model_len=4096, max_audios=None, family=VOXTRAL)
    conv = Conversation.for_backend("hi", 8000, backend)
    assert conv.family is VOXTRAL and conv.context_tokens == 4096
    assert Conversation.for_backend(None, 8000, SimpleNamespace()).family is families.default()


def test_known_family_from_names_and_directories(tmp_path: Path) -> None:
    assert models.known_family("tiny-random-voxtral") is VOXTRAL
    assert models.known_family("tiny-random-qwen2.5-omni") is OMNI
    assert models.known_family("tiny-random").name == "qwen2-audio"
    assert models.known_family("mistralai/Voxtral-Mini-3B-2507-not-cached") is VOXTRAL
    assert models.known_family("someone/unknown-model").name == "qwen2-audio"
    (tmp_path / "params.json").write_text("{}")
    assert models.known_family(str(tmp_path)) is VOXTRAL


def test_voxtral_counts_with_its_tekken_tokenizer(tmp_path: Path) -> None:
    """With mistral-common's tokenizer the count is the tokenizer's own over the rendered prompt."""
    pytest.importorskip("mistral_common")
    import json

    from agent.inference import voxtral_tiny

    (tmp_path / "tekken.json").write_text(json.dumps(voxtral_tiny.tekken_json()))
    tokenizer = voxtral_tiny.load_tokenizer(tmp_path)
    conv = Conversation(context_tokens=1500, tokenizer=tokenizer, family=VOXTRAL)
    chat(conv, 6)
    conv.add_user(tone(3), "and this one?")
    req = conv.request("s", "t", max_new_tokens=50)
    from agent.inference.prompts import SegmentTokenizer, build_prompt

    # the engine's own prompt: specials split out first, each [AUDIO] expanded
    prompt = build_prompt(SegmentTokenizer(tokenizer, special_re=VOXTRAL.special_re),
                          tokenizer.convert_tokens_to_ids("[AUDIO]"), req, VOXTRAL)
    assert len(prompt.spans) == len(req.audios) >= 2
    assert conv.token_count(req.messages, req.audios) == len(prompt.ids)
    assert conv.token_count(req.messages, req.audios) + 50 <= 1500


async def test_a_voxtral_pool_budgets_in_voxtrals_format() -> None:
    """The in-process pool learns its family from the worker that loaded the model."""
    pytest.importorskip("mistral_common")
    from agent.inference.pool import InferencePool

    pool = InferencePool(models.TINY_VOXTRAL, workers=1, max_batch=2, max_queue=4)
    await pool.start()
    try:
        assert pool.family is VOXTRAL
        conv = Conversation.for_backend(None, 1500, pool)
        assert conv.family is VOXTRAL and conv.tokenizer is pool.tokenizer is not None
        chat(conv, 4)
        conv.add_user(tone(1.0))
        req = conv.request("s", "t", max_new_tokens=8)
        assert len(req.audios) == 3  # 375 tokens a clip: two older turns dropped (Qwen2-Audio's rule kept all 5)
        stats = GenerationStats()
        _ = [d async for d in pool.generate(req, stats)]
        assert stats.prompt_tokens == conv.token_count(req.messages, req.audios) <= 1500 - 8  # the engine's own count
    finally:
        await pool.close()
