"""The streaming text chunker: speakable pieces from `response.delta` texts, no markup."""

from __future__ import annotations

import pytest

from agent.speech.chunker import Piece, TextChunker, speakable


def chunk(text: str, step: int = 3, **options: int) -> list[Piece]:
    """Feed `text` in deltas of `step` characters, as a model streams it."""
    chunker = TextChunker(**options)
    out: list[Piece] = []
    for i in range(0, len(text), step):
        out += chunker.push(text[i : i + step])
    return out + chunker.flush()


def speaks(text: str, step: int = 3, **options: int) -> list[str]:
    return [p.speak for p in chunk(text, step, **options)]


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_sentences_and_long_clauses_are_pieces_whatever_the_delta_size(step: int) -> None:
    text = ("Sure, I can help with that. The kitchen light is now on, and the temperature "
            "is 21.5 degrees. Anything else?")
    assert speaks(text, step) == ["Sure, I can help with that.", "The kitchen light is now on,",
                                  "and the temperature is 21.5 degrees.", "Anything else?"]


def test_pieces_join_back_to_the_text() -> None:
    text = "First part, which is long enough to stand alone; second part. Third!\nFourth line here."
    assert "".join(p.text for p in chunk(text)) == text


def test_first_clause_is_ready_before_the_answer_ends() -> None:
    chunker = TextChunker()
    assert chunker.push("The kitchen light is now on") == []
    pieces = chunker.push(", and the heating")  # the clause ends and the next word has begun
    assert [p.speak for p in pieces] == ["The kitchen light is now on,"]


def test_a_boundary_waits_for_the_next_character() -> None:
    chunker = TextChunker()
    assert chunker.push("The value is 3.") == []  # may still become 3.5
    assert chunker.push("5 volts") == []
    assert [p.speak for p in chunker.flush()] == ["The value is 3.5 volts"]


def test_short_sentences_and_clauses_wait_for_more() -> None:
    assert speaks("Yes. Okay, fine. That is everything you need.") == ["Yes. Okay, fine.", "That is everything you need."]


def test_abbreviations_and_initials_do_not_end_a_sentence() -> None:
    assert speaks("I asked Dr. Smith and J. Doe about it. They agreed.") == [
        "I asked Dr. Smith and J. Doe about it.", "They agreed."]


def test_long_text_without_punctuation_is_cut_at_a_space() -> None:
    words = " ".join(["word"] * 120)
    pieces = chunk(words, max_chars=100)
    assert all(len(p.text) <= 100 for p in pieces)
    assert all(not p.speak.startswith("ord") for p in pieces)  # never inside a word
    assert "".join(p.text for p in pieces) == words


def test_tool_calls_never_reach_the_voice_even_split_across_deltas() -> None:
    text = ('Turning it on.<tool_call>\n{"name": "light_on", "arguments": {"room": "kitchen"}}\n</tool_call>'
            "Done, the light is on.<|im_end|>")
    for step in (1, 4, 7, 1000):
        chunker = TextChunker()
        pieces: list[Piece] = []
        for i in range(0, len(text), step):
            pieces += chunker.push(text[i : i + step])
        pieces += chunker.flush()
        assert [p.speak for p in pieces] == ["Turning it on.", "Done, the light is on."]
        assert all("tool" not in p.text and "{" not in p.text and "<|" not in p.text for p in pieces)
        assert chunker.dropped_markup > 0


def test_tool_response_blocks_stray_closers_and_unclosed_blocks_are_dropped() -> None:
    assert speaks("<tool_response>\n{\"ok\": true}\n</tool_response>It worked.") == ["It worked."]
    assert speaks("Fine.</tool_call> Really fine.") == ["Fine. Really fine."]
    assert speaks('Let me check. <tool_call>{"name": "x", "argu') == ["Let me check."]
    assert speaks("Answer ends in a tag <tool_cal") == ["Answer ends in a tag"]


def test_a_plain_less_than_sign_is_spoken() -> None:
    assert speaks("Two is < three, and that is true.") == ["Two is < three, and that is true."]


def test_markdown_is_not_read_out_but_kept_in_the_text() -> None:
    pieces = chunk("**Note:** here is a list:\n- one item\n- two items\n")
    assert [p.speak for p in pieces] == ["Note: here is a list:", "one item", "two items"]
    assert pieces[0].text.startswith("**Note:**")


def test_nothing_speakable_gives_no_piece() -> None:
    assert speaks("... !!! ---") == []
    assert speaks("") == []
    assert speakable("  `code`  ") == "code"


def test_cjk_punctuation_ends_pieces_without_spaces() -> None:
    assert speaks("好的，我来帮你。灯已经打开了！", min_sentence_chars=2, min_clause_chars=2) == [
        "好的，", "我来帮你。", "灯已经打开了！"]


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        TextChunker(min_sentence_chars=0)
    with pytest.raises(ValueError):
        TextChunker(min_clause_chars=300, max_chars=200)
