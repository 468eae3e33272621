"""Prompts tokenized piece by piece equal the whole prompt tokenized at once."""

from typing import Any

from agent.inference.models import load_tokenizer
from agent.inference.prompts import Detokenizer, SegmentTokenizer
from agent.model.qwen2_audio import render_prompt


class Counting:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.texts = tokenizer, []

    def __call__(self, text: str, **kw: Any) -> Any:
        self.texts.append(text)
        return self.tokenizer(text, **kw)

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.tokenizer.convert_tokens_to_ids(token)


def conversation(turns: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": "Be brief. Überall 東京 🎧\n\n# Tools <tools>{}</tools>"}]
    for k in range(turns):
        parts: list[dict[str, Any]] = [{"type": "audio", "audio": k}]
        if k % 3 == 1:
            parts.append({"type": "text", "text": "What's the speaker's emotion?  "})
        messages.append({"role": "user", "content": parts})
        messages.append({"role": "assistant", "content": f"answer {k}: <tool_call>{{\"name\": \"x\"}}</tool_call>\n ok"})
    messages.append({"role": "user", "content": [{"type": "audio", "audio": turns}]})
    return messages


def test_pieces_equal_the_whole_and_history_is_not_tokenized_again() -> None:
    tokenizer = load_tokenizer("tiny-random")
    counting = Counting(tokenizer)
    segments = SegmentTokenizer(counting)
    for turns in (0, 1, 5, 20):
        text = render_prompt(conversation(turns))
        assert segments(text) == tokenizer(text, add_special_tokens=False)["input_ids"], turns
    counting.texts.clear()
    text = render_prompt(conversation(21))  # one more turn: only its new pieces are tokenized
    assert segments(text) == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert 0 < len(counting.texts) <= 3 and sum(map(len, counting.texts)) < 120


def test_detokenizer_decodes_a_short_window_per_token() -> None:
    """A long answer streams the same text as decoding it whole, one decode call per token of a
    window that does not grow with the answer."""
    tokenizer = load_tokenizer("tiny-random")
    text = "Überall 東京 🎧, a long answer! " * 12
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows: list[int] = []

    class Watching:
        def decode(self, window: list[int], **kw: Any) -> str:
            windows.append(len(window))
            return str(tokenizer.decode(window, **kw))

    detok = Detokenizer(Watching())
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == text == detok.text
    assert len(ids) > 300 and max(windows) <= 8 and len(windows) <= len(ids) + 8
