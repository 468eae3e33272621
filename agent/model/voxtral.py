"""Voxtral (Mistral): its format, as mistral-common's v7 instruct tokenizer encodes a chat.

- prompt: `<s>`, then per message: user `[INST]…[/INST]` with its parts in order (an audio
  clip is `[BEGIN_AUDIO]` + its `[AUDIO]` tokens), assistant `text</s>`. No default system
  prompt, and none at all beside audio: mistral-common refuses system messages in a chat with
  audio before tokenizer v13, so a system text is put at the start of the first user turn
  (`fold_system`; the first, not the last as Mistral's v3 tokenizers did, so the history's
  prefix and its cached KV stay the same from turn to turn). Text-only chats keep
  `[SYSTEM_PROMPT]…[/SYSTEM_PROMPT]`;
- audio: 16 kHz, Whisper features (128 mel bins), each clip padded to whole 30 s windows
  (the encoder is trained on those only): 375 `[AUDIO]` tokens per window (12.5 per second);
- tools: Mistral's `[AVAILABLE_TOOLS][…][/AVAILABLE_TOOLS]` before the last user turn and
  `[TOOL_CALLS][{"name": …, "arguments": …}]` in the answer (not the Hermes syntax), results as
  `[TOOL_RESULTS]id[TOOL_CONTENT]…[/TOOL_RESULTS]` right after it (`MISTRAL`);
- transcription has its own request (`[TRANSCRIBE]`), besides chat.
Special tokens are written in the rendered text by name and split out before BPE, as the
other families' are; the tokenizer itself is mistral-common's tekken (`tekken.json`).
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Sequence
from typing import Any

from agent.model.family import Checkpoint, Family, ToolSyntax

BOS, EOS = "<s>", "</s>"
INST, END_INST = "[INST]", "[/INST]"
SYSTEM, END_SYSTEM = "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"
AUDIO_TOKEN, BEGIN_AUDIO = "[AUDIO]", "[BEGIN_AUDIO]"
TOOL_CALLS = "[TOOL_CALLS]"
AVAILABLE_TOOLS, END_AVAILABLE_TOOLS = "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]"
TOOL_RESULTS, TOOL_CONTENT, END_TOOL_RESULTS = "[TOOL_RESULTS]", "[TOOL_CONTENT]", "[/TOOL_RESULTS]"
_TOOLS_RE = re.compile(re.escape(AVAILABLE_TOOLS) + r".*?" + re.escape(END_AVAILABLE_TOOLS), re.S)
SPECIAL_TOKENS = (BOS, EOS, INST, END_INST, SYSTEM, END_SYSTEM, AUDIO_TOKEN, BEGIN_AUDIO, TOOL_CALLS,
                  AVAILABLE_TOOLS, END_AVAILABLE_TOOLS, TOOL_RESULTS, TOOL_CONTENT, END_TOOL_RESULTS, "[TRANSCRIBE]")
EOS_TOKENS = (EOS,)
WINDOW_SAMPLES = 30 * 16000
TOKENS_PER_WINDOW = 375  # 3000 mel frames → conv stride 2 → 1500 → 4 frames per token


def audio_token_count(n_samples: int) -> int:
    """`[AUDIO]` tokens of a clip: 375 per started 30 s window (the processor pads to 30 s)."""
    return TOKENS_PER_WINDOW * max(1, -(-n_samples // WINDOW_SAMPLES))


def has_audio(messages: list[dict[str, Any]]) -> bool:
    return any(p.get("type") == "audio" for m in messages if not isinstance(m["content"], str) for p in m["content"])


def fold_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """System messages of a chat with audio → text at the start of the first user turn."""
    if not has_audio(messages) or all(m["role"] != "system" for m in messages):
        return messages
    system = "\n\n".join(m["content"] if isinstance(m["content"], str) else
                          "".join(p.get("text", "") for p in m["content"]) for m in messages if m["role"] == "system")
    out: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "system":
            continue
        if system and m["role"] == "user":
            parts = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]
            m = {"role": "user", "content": [{"type": "text", "text": f"{system}\n\n"}, *parts]}
            system = ""
        out.append(m)
    return out


def tools_block(schemas: Sequence[dict[str, Any]]) -> str:
    """The tools as mistral-common declares them: `[AVAILABLE_TOOLS]` + a JSON list of the
    schemas + `[/AVAILABLE_TOOLS]`. Given as (part of) the system text; `render_prompt` moves it
    to just before the last user turn, where mistral-common's v7 tokenizer writes it."""
    return f"{AVAILABLE_TOOLS}{json.dumps(list(schemas), ensure_ascii=False)}{END_AVAILABLE_TOOLS}"


def _take_tools(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """The `[AVAILABLE_TOOLS]` block out of the system messages (and the system message gone
    when that was all of it)."""
    block, out = "", []
    for m in messages:
        if m["role"] == "system" and isinstance(m["content"], str) and AVAILABLE_TOOLS in m["content"]:
            found = _TOOLS_RE.search(m["content"])
            if found:  # the text around it was joined to it with blank lines
                block = found.group()
                around = (m["content"][: found.start()].removesuffix("\n\n"), m["content"][found.end():].removeprefix("\n\n"))
                rest = "\n\n".join(part for part in around if part)
                if not rest:
                    continue
                m = {"role": "system", "content": rest}
        out.append(m)
    return out, block


def render_prompt(messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """The chat as mistral-common encodes it; an audio part stands for `[BEGIN_AUDIO][AUDIO]`
    (the `[AUDIO]` expands to `audio_token_count` tokens). `add_generation_prompt` is implied:
    the answer starts right after the last `[/INST]` (or `[/TOOL_RESULTS]`). A "tool" message
    holds `results_text`'s `[TOOL_RESULTS]` blocks, written as they are."""
    messages, tools = _take_tools(messages)
    messages = fold_system(messages)
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    out = [BOS]
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        body = "".join(f"{BEGIN_AUDIO}{AUDIO_TOKEN}" if p["type"] == "audio" else p.get("text", "")
                       for p in parts if p["type"] in ("audio", "text"))
        if role == "system":
            out.append(f"{SYSTEM}{body}{END_SYSTEM}")
        elif role == "user":
            out.append(f"{tools if i == last_user else ''}{INST}{body}{END_INST}")
        elif role == "tool":
            out.append(body)
        else:
            out.append(f"{body}{EOS}")
    if last_user < 0:
        out.append(tools)  # no user turn (a budget's system-only count): it still costs its tokens
    return "".join(out)


def results_text(results: list[dict[str, Any]]) -> str:
    """Tool results as mistral-common's v7 tokenizer writes a tool message, one block per call:
    `[TOOL_RESULTS]` call id `[TOOL_CONTENT]` content `[/TOOL_RESULTS]`, the content a string as
    it is, anything else as JSON (an error as {"error": …})."""
    out = []
    for r in results:
        value = r["result"] if "result" in r else {"error": r.get("error")}
        content = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        out.append(f"{TOOL_RESULTS}{r['call_id']}{TOOL_CONTENT}{content}{END_TOOL_RESULTS}")
    return "".join(out)


def new_call_id() -> str:
    """Nine letters and digits, the tool-call id mistral-common accepts."""
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))


MISTRAL = ToolSyntax("mistral", TOOL_CALLS, "", results_text, results_role="tool", new_call_id=new_call_id,
                     tools_block=tools_block)


FAMILY = Family(
    name="voxtral", title="Voxtral", model_types=("voxtral",), tiny="tiny-random-voxtral",
    render_prompt=render_prompt, audio_token=AUDIO_TOKEN, audio_token_count=audio_token_count,
    special_tokens=SPECIAL_TOKENS, eos_tokens=EOS_TOKENS, licence="Apache-2.0",
    checkpoints=(Checkpoint("mistralai/Voxtral-Mini-3B-2507", 4.7, 9.4, "Whisper-style encoder + Ministral 3B"),
                 Checkpoint("mistralai/Voxtral-Small-24B-2507", 24.3, 48.6, "Whisper-style encoder + Mistral Small 3.1")),
    modes=("chat", "analysis"), tools="mistral: `[TOOL_CALLS]` JSON list", tool_syntax=MISTRAL, encoder="padded-30s",
    notes="Chat and audio understanding in one model, plus a transcription request ([TRANSCRIBE]); "
          "every clip costs 375 tokens per started 30 s window; needs mistral-common for its tokenizer.")
