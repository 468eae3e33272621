"""`export dpo|sft` from a recording made directly through the store (no pipeline): which
ratings make which rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

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
    store.add_session("b", "m", None)
    store.add_turn(_turn("a", 1, other, "", [], status="error"))  # no answer: left out of histories
    store.add_turn(_turn("a", 2, same, "Wrong answer.", ["a-t1"]))
    store.add_turn(_turn("b", 1, same, "Right answer.", []))
    store.add_feedback("a", "a-t2", "up", None)
    store.add_feedback("a", "a-t2", "down", None)  # the latest rating counts
    store.add_feedback("b", "b-t1", "up", None)
    store.close()

    path, n = export(tmp_path / "rec", tmp_path / "out", "dpo", "ms-swift")
    (row,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert n == 1 and row["rejected_response"] == "Wrong answer."
    assert row["messages"] == [{"role": "system", "content": "You keep the shopping list."},
                               {"role": "user", "content": "<audio>"}, {"role": "assistant", "content": "Right answer."}]
    assert row["audios"] == [str((tmp_path / "rec" / "a" / "a-t2.wav").resolve())]

    path, n = export(tmp_path / "rec", tmp_path / "out", "sft", "ms-swift")
    assert n == 1 and "Right answer." in path.read_text()
    store = RecordingStore.open(tmp_path / "rec")
    store.add_feedback("a", "a-t2", "down", "Better answer.")
    store.close()
    path, n = export(tmp_path / "rec", tmp_path / "out", "sft", "llamafactory", with_corrections=True)
    rows = json.loads(path.read_text())
    assert [r["conversations"][-1]["value"] for r in rows] == ["Better answer.", "Right answer."]
    path, n = export(tmp_path / "rec", tmp_path / "out", "dpo", "llamafactory")
    (pair,) = json.loads(path.read_text())
    assert pair["chosen"]["value"] == "Better answer."  # a correction wins over another session's answer
    assert pair["system"] == "You keep the shopping list."
