"""`export dpo|sft` from a recording made directly through the store (no pipeline): which
ratings make which rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.export import export
from agent.record import RecordingStore, TurnRecord


def _turn(session: str, n: int, audio: np.ndarray, answer: str, history: list[str], status: str = "done") -> TurnRecord:
    messages = [{"role": "user", "content": "", "audio": True}]
    if status == "done":
        messages.append({"role": "assistant", "content": answer})
    return TurnRecord(session, f"{session}-t{n}", n, audio, "chat", None, history, messages, answer if status == "done" else "",
                      [], [], status, {})


def test_pairs_from_an_up_rating_of_the_same_audio_and_sft_corrections(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    same = (rng.standard_normal(8000) * 0.1).astype(np.float32)
    other = (rng.standard_normal(8000) * 0.1).astype(np.float32)
    store = RecordingStore.open(tmp_path / "rec")
    store.add_session("a", "m", "You keep the shopping list.")
    store.add_session("b", "m", "You keep the shopping list.")
    store.add_session("c", "m", None)  # another system prompt: its answers pair with none of a's
    store.add_turn(_turn("a", 1, other, "", [], status="error"))  # no answer: left out of histories
    store.add_turn(_turn("a", 2, same, "Wrong answer.", ["a-t1"]))
    store.add_turn(_turn("b", 1, same, "Right answer.", []))
    store.add_turn(_turn("c", 1, same, "Answer for another prompt.", []))
    store.add_feedback("a", "a-t2", "up", None)
    store.add_feedback("a", "a-t2", "down", None)  # the latest rating counts
    store.add_feedback("b", "b-t1", "up", None)
    store.add_feedback("c", "c-t1", "up", None)
    store.close()

    path, n = export(tmp_path / "rec", tmp_path / "out", "dpo", "ms-swift")
    (row,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert n == 1 and row["rejected_response"] == "Wrong answer."
    assert row["messages"] == [{"role": "system", "content": "You keep the shopping list."},
                               {"role": "user", "content": "<audio>"}, {"role": "assistant", "content": "Right answer."}]
    assert row["audios"] == [str((tmp_path / "rec" / "a" / "a-t2.wav").resolve())]

    path, n = export(tmp_path / "rec", tmp_path / "out", "sft", "ms-swift")
    assert n == 2 and "Right answer." in path.read_text()
    store = RecordingStore.open(tmp_path / "rec")
    store.add_feedback("a", "a-t2", "down", "Better answer.")
    store.close()
    path, n = export(tmp_path / "rec", tmp_path / "out", "sft", "llamafactory", with_corrections=True)
    rows = json.loads(path.read_text())
    assert [r["conversations"][-1]["value"] for r in rows] == ["Better answer.", "Right answer.",
                                                               "Answer for another prompt."]
    path, n = export(tmp_path / "rec", tmp_path / "out", "dpo", "llamafactory")
    (pair,) = json.loads(path.read_text())
    assert pair["chosen"]["value"] == "Better answer."  # a correction wins over another answer
    assert pair["system"] == "You keep the shopping list."


def test_a_pair_never_crosses_prompt_contexts(tmp_path: Path) -> None:
    """The same audio rated down in one context and up in another (another system prompt, or
    another history) is no preference pair: the chosen answer would teach the wrong context."""
    rng = np.random.default_rng(1)
    same, first = ((rng.standard_normal(8000) * 0.1).astype(np.float32) for _ in range(2))
    store = RecordingStore.open(tmp_path / "rec")
    store.add_session("a", "m", "Answer in French.")
    store.add_session("b", "m", "Answer in English.")
    store.add_session("c", "m", "Answer in French.")
    store.add_turn(_turn("a", 1, same, "Hello.", []))
    store.add_turn(_turn("b", 1, same, "Hello.", []))
    store.add_turn(_turn("c", 1, first, "Bonjour.", []))
    store.add_turn(_turn("c", 2, same, "Salut.", ["c-t1"]))  # same audio, but after a history
    store.add_feedback("a", "a-t1", "down", None)
    store.add_feedback("b", "b-t1", "up", None)
    store.add_feedback("c", "c-t2", "up", None)
    store.close()
    _, n = export(tmp_path / "rec", tmp_path / "out", "dpo", "ms-swift")
    assert n == 0


def test_targets_are_exactly_the_rated_assistant_turn(tmp_path: Path) -> None:
    """A turn with a tool round: the prompt holds the first round and the tool's result; the
    target is the last round only (the recorded answer is every round's text)."""
    audio = (np.random.default_rng(2).standard_normal(8000) * 0.1).astype(np.float32)
    call = '<tool_call>\n{"name": "light", "arguments": {}}\n</tool_call>'
    messages = [{"role": "user", "content": "", "audio": True},
                {"role": "assistant", "content": f"Let me check.{call}"},
                {"role": "tool", "content": "<tool_response>\non\n</tool_response>"},
                {"role": "assistant", "content": "The light is on."}]
    store = RecordingStore.open(tmp_path / "rec")
    store.add_session("a", "m", None)
    store.add_turn(TurnRecord("a", "a-t1", 1, audio, "chat", None, [], messages, "Let me check. The light is on.",
                              [{"call_id": "c1", "name": "light", "arguments": {}}], [], "done", {}))
    store.add_turn(TurnRecord("a", "a-t2", 2, audio, "chat", None, ["a-t1"], [messages[0], messages[3]],
                              "The light is on.", [], [], "done", {}))
    store.add_feedback("a", "a-t1", "up", None)
    store.add_feedback("a", "a-t2", "down", "It is on, as I said.")
    store.close()
    path, n = export(tmp_path / "rec", tmp_path / "sft", "sft", "ms-swift")
    (row,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert row["messages"] == [{"role": "user", "content": "<audio>"},
                               {"role": "assistant", "content": f"Let me check.{call}"},
                               {"role": "user", "content": "<tool_response>\non\n</tool_response>"},
                               {"role": "assistant", "content": "The light is on."}]
    path, n = export(tmp_path / "rec", tmp_path / "dpo", "dpo", "llamafactory")
    (pair,) = json.loads(path.read_text())
    assert pair["rejected"] == {"from": "gpt", "value": "The light is on."}
    assert pair["conversations"][1]["value"] == f"Let me check.{call}"  # history: the first turn whole
    assert pair["conversations"][3]["value"] == "The light is on."


def test_llamafactory_s_own_converter_reads_the_rows(tmp_path: Path) -> None:
    """Where LLaMA-Factory is installed (aside: tests/trainer_loaders.py), its parser and
    converter read both exports: prompts end with the user, targets are the rated turn."""
    from tests.trainer_loaders import check_llamafactory, llamafactory_modules

    try:
        found = llamafactory_modules()
    except ImportError as exc:
        pytest.skip(f"llamafactory does not import here: {exc}")
    if found is None:
        pytest.skip("llamafactory is not installed (VOICE_AGENT_TRAINERS_PATH)")
    test_targets_are_exactly_the_rated_assistant_turn(tmp_path)  # writes the recording
    export(tmp_path / "rec", tmp_path / "lf", "sft", "llamafactory")
    export(tmp_path / "rec", tmp_path / "lf", "dpo", "llamafactory")
    (row,) = check_llamafactory(tmp_path / "lf", "voice_agent_sft")
    assert row["_response"] == [{"role": "assistant", "content": "The light is on."}]
    assert len(row["_prompt"]) == 3 and row["_audios"]
    (pair,) = check_llamafactory(tmp_path / "lf", "voice_agent_dpo")
    assert [r["content"] for r in pair["_response"]] == ["It is on, as I said.", "The light is on."]
