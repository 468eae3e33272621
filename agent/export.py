"""`voice-agent export dpo|sft`: a recording (`--record DIR`) as training data for audio LLMs.

Preference pairs (dpo): the rejected answer is one rated down; the chosen one is its correction,
or an answer rated up to the same prompt: the same system message, the same history (its audio
by digest, its answers, its tool rounds) and the same audio and instruction, so both answers
continue one context (another session's answer under another system prompt is no pair).
Supervised rows (sft): answers rated up (`with_corrections`: corrections too). The latest
rating of a turn counts.

Targets are exactly the assistant message that was rated: the turn's last round (after its
tool calls and results, which the prompt holds), never the whole turn's text, which would
repeat what the prompt already says ("Let me check." in the prompt and again in the target).

Rows carry the whole prompt: the session's earlier turns (their audio too, one `<audio>` tag
each, in order), this turn's audio and instruction, and its tool rounds (the tool call as the
model wrote it, the results as the `<tool_response>` user turn it saw), and the session's system
message (its instructions and tool schemas, as the model saw them). Formats:

- LLaMA-Factory, sharegpt (ranking for dpo): `{"conversations": [{"from": "human", "value":
  "<audio>…"}, …], "chosen": {"from": "gpt", …}, "rejected": {…}, "audios": [paths]}`, plus
  a `dataset_info.json` entry (`formatting: sharegpt`, `ranking: true`, columns).
- ms-swift: `{"messages": [{"role": "user", "content": "<audio>…"}, …, {"role": "assistant",
  "content": chosen}], "audios": [paths], "rejected_response": rejected}` (`swift rlhf
  --rlhf_type dpo`; sft rows have no `rejected_response`).

Audio paths are absolute (the recording's files). What is written is checked against the
rules the trainers' loaders apply (`check_rows`): every audio file exists, `<audio>` tags
and clips agree, roles alternate as each format requires.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from agent.record.store import RecordingStore

Format = Literal["llamafactory", "ms-swift"]
Kind = Literal["dpo", "sft"]
AUDIO_TAG = "<audio>"
DATASET_NAME = {"dpo": "voice_agent_dpo", "sft": "voice_agent_sft"}


class ExportError(Exception):
    pass


@dataclass
class Sample:
    """One training example in a neutral form: messages (role user|assistant, content text,
    user turns with audio get one `<audio>` tag), the clips in tag order, the target(s)."""

    messages: list[dict[str, str]]
    audios: list[str]
    chosen: str
    rejected: str | None = None
    turn_id: str = ""
    system: str | None = None  # the session's system message (None: the chat template's default)


def _latest_feedback(store: RecordingStore) -> dict[str, dict[str, Any]]:
    latest: dict[str, dict[str, Any]] = {}
    for row in store.feedback():  # ordered by id: later ratings replace earlier ones
        latest[row["turn_id"]] = row
    return latest


def rated_answer(turn: dict[str, Any]) -> str | None:
    """The assistant message that was rated: the turn's last round (None: it has no answer)."""
    last = turn["messages"][-1] if turn["messages"] else None
    return last["content"] if last is not None and last["role"] == "assistant" else None


def _context(system: str | None, messages: list[dict[str, str]], digests: list[str]) -> str:
    """What a prompt is, as one key: two answers pair only when they continue the same one."""
    return hashlib.sha256(json.dumps([system, messages, digests], ensure_ascii=False).encode()).hexdigest()


def _prompt(turn: dict[str, Any], by_id: dict[str, dict[str, Any]],
            digests: list[str] | None = None) -> tuple[list[dict[str, str]], list[str]]:
    """Messages before this turn's final answer: earlier turns whole, then this turn's user
    message and tool rounds. `digests` gets each clip's audio digest, in order."""
    messages: list[dict[str, str]] = []
    audios: list[str] = []
    # Earlier turns that got no answer (an error) are left out: roles must alternate.
    earlier_turns = [by_id[t] for t in turn["history"] if t in by_id and by_id[t]["messages"][-1]["role"] == "assistant"]
    for earlier in [*earlier_turns, turn]:
        parts = earlier["messages"] if earlier is not turn else earlier["messages"][:-1]
        if earlier is turn and turn["messages"][-1]["role"] != "assistant":
            parts = turn["messages"]
        for m in parts:
            if m["role"] == "user" and m.get("audio"):
                messages.append({"role": "user", "content": AUDIO_TAG + (m["content"] or "")})
                audios.append(earlier["audio"])
                if digests is not None:
                    digests.append(earlier["audio_sha256"])
            elif m["role"] == "assistant":
                messages.append({"role": "assistant", "content": m["content"]})
            else:  # tool results: the user turn of <tool_response> blocks the model saw
                messages.append({"role": "user", "content": m["content"]})
    return messages, audios


def samples(store: RecordingStore, kind: Kind, with_corrections: bool = False) -> list[Sample]:
    turns = store.turns()
    by_id = {t["turn_id"]: t for t in turns}
    rated = _latest_feedback(store)
    systems = {s["id"]: s["system_prompt"] for s in store.sessions()}
    out: list[Sample] = []

    def sample(turn: dict[str, Any], chosen: str, rejected: str | None = None) -> Sample:
        return Sample(*_prompt(turn, by_id), chosen=chosen, rejected=rejected, turn_id=turn["turn_id"],
                      system=systems.get(turn["session_id"]))

    def context(turn: dict[str, Any]) -> str:
        digests: list[str] = []
        messages, _ = _prompt(turn, by_id, digests)
        return _context(systems.get(turn["session_id"]), messages, digests)

    if kind == "sft":
        for turn in turns:
            fb = rated.get(turn["turn_id"])
            if fb is None:
                continue
            target = rated_answer(turn) if fb["rating"] == "up" else fb["correction"] if with_corrections else None
            if target:
                out.append(sample(turn, target))
        return out
    ups: dict[str, list[str]] = {}  # prompt context → answers rated up in it
    for turn in turns:
        fb = rated.get(turn["turn_id"])
        if fb is not None and fb["rating"] == "up" and (answer := rated_answer(turn)):
            ups.setdefault(context(turn), []).append(answer)
    for turn in turns:
        fb = rated.get(turn["turn_id"])
        rejected = rated_answer(turn)
        if fb is None or fb["rating"] != "down" or rejected is None:
            continue
        chosen = fb["correction"]
        if not chosen:
            liked = ups.get(context(turn), [])
            chosen = liked[-1] if liked else None
        if chosen and chosen != rejected:
            out.append(sample(turn, chosen, rejected))
    return out


def to_llamafactory(sample: Sample) -> dict[str, Any]:
    tag = {"user": "human", "assistant": "gpt"}
    conversations = [{"from": tag[m["role"]], "value": m["content"]} for m in sample.messages]
    system = sample.system or ""  # "": the template's default system message
    if sample.rejected is None:
        return {"conversations": [*conversations, {"from": "gpt", "value": sample.chosen}], "system": system,
                "audios": sample.audios}
    return {"conversations": conversations, "chosen": {"from": "gpt", "value": sample.chosen},
            "rejected": {"from": "gpt", "value": sample.rejected}, "system": system, "audios": sample.audios}


def to_ms_swift(sample: Sample) -> dict[str, Any]:
    system = [{"role": "system", "content": sample.system}] if sample.system else []
    row: dict[str, Any] = {"messages": [*system, *sample.messages, {"role": "assistant", "content": sample.chosen}],
                           "audios": sample.audios}
    if sample.rejected is not None:
        row["rejected_response"] = sample.rejected
    return row


def dataset_info(kind: Kind, file_name: str) -> dict[str, Any]:
    """LLaMA-Factory's `dataset_info.json` entry for the exported file."""
    columns = {"messages": "conversations", "system": "system", "audios": "audios"}
    entry: dict[str, Any] = {"file_name": file_name, "formatting": "sharegpt", "columns": columns}
    if kind == "dpo":
        entry["ranking"] = True
        columns |= {"chosen": "chosen", "rejected": "rejected"}
    return {DATASET_NAME[kind]: entry}


def _tags(text: str) -> int:
    return text.count(AUDIO_TAG)


def check_rows(rows: Iterable[dict[str, Any]], fmt: Format, kind: Kind) -> None:
    """The rules the trainers' loaders apply to these rows; raises ExportError naming the row.
    LLaMA-Factory (data/converter.py, mm_plugin.py): sharegpt roles alternate human (odd
    places) and gpt (even places), a ranking prompt has an odd number of messages, chosen and
    rejected are gpt messages, `<audio>` tags = len(audios). ms-swift: messages alternate
    user/assistant ending with the assistant's answer, `<audio>` tags = len(audios), dpo rows
    have a text `rejected_response`."""
    for i, row in enumerate(rows):
        where = f"row {i}"
        audios = row.get("audios")
        if not isinstance(audios, list) or not all(isinstance(a, str) for a in audios):
            raise ExportError(f"{where}: `audios` must be a list of paths")
        for path in audios:
            if not Path(path).is_file():
                raise ExportError(f"{where}: audio file {path} does not exist")
        if fmt == "llamafactory":
            conv = row.get("conversations")
            if not isinstance(conv, list) or not conv:
                raise ExportError(f"{where}: `conversations` must be a non-empty list")
            for j, m in enumerate(conv):
                want = "human" if j % 2 == 0 else "gpt"
                if set(m) != {"from", "value"} or m["from"] != want or not isinstance(m["value"], str):
                    raise ExportError(f"{where}: conversations[{j}] must be {{from: {want}, value: text}}")
            texts = [m["value"] for m in conv]
            if kind == "dpo":
                if len(conv) % 2 == 0:
                    raise ExportError(f"{where}: a ranking prompt must end with a human message")
                for key in ("chosen", "rejected"):
                    m = row.get(key)
                    if not isinstance(m, dict) or m.get("from") != "gpt" or not isinstance(m.get("value"), str):
                        raise ExportError(f"{where}: `{key}` must be {{from: gpt, value: text}}")
                    texts.append(m["value"])
            elif len(conv) % 2 != 0:
                raise ExportError(f"{where}: an sft conversation must end with the gpt answer")
        else:
            msgs = row.get("messages")
            if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict) and msgs[0].get("role") == "system":
                msgs = msgs[1:]  # an optional system message first, then user/assistant turns
            if not isinstance(msgs, list) or len(msgs) < 2:
                raise ExportError(f"{where}: `messages` must hold the prompt and the answer")
            for j, m in enumerate(msgs):
                want = "user" if j % 2 == 0 else "assistant"
                if m.get("role") != want or not isinstance(m.get("content"), str):
                    raise ExportError(f"{where}: messages[{j}] must be {{role: {want}, content: text}}")
            if len(msgs) % 2 != 0:
                raise ExportError(f"{where}: messages must end with the assistant's answer")
            texts = [m["content"] for m in msgs]
            if kind == "dpo":
                if not isinstance(row.get("rejected_response"), str):
                    raise ExportError(f"{where}: `rejected_response` must be text")
                texts.append(row["rejected_response"])
        prompt_tags = sum(_tags(t) for t in texts)
        if prompt_tags != len(audios):
            raise ExportError(f"{where}: {prompt_tags} {AUDIO_TAG} tags but {len(audios)} audios")


def export(directory: str | Path, out: str | Path, kind: Kind, fmt: Format,
           with_corrections: bool = False) -> tuple[Path, int]:
    """Write the rows (checked) into `out`; returns the data file and the number of rows."""
    store = RecordingStore.open(directory, create=False)
    try:
        found = samples(store, kind, with_corrections)
    finally:
        store.close()
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    if fmt == "llamafactory":
        rows = [to_llamafactory(s) for s in found]
        check_rows(rows, fmt, kind)
        path = target / f"{DATASET_NAME[kind]}.json"
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1))
        info_path = target / "dataset_info.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        info_path.write_text(json.dumps(info | dataset_info(kind, path.name), indent=2))
    else:
        rows = [to_ms_swift(s) for s in found]
        check_rows(rows, fmt, kind)
        path = target / f"{DATASET_NAME[kind]}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path, len(rows)
