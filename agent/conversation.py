"""A session's history and the prompts it renders for Qwen2-Audio.

Messages use the chat-template shape; an audio part is {"type": "audio", "audio": i} with
`i` an index into the request's audio list. `render_prompt` yields exactly the text the
instruct model's template (`processor.apply_chat_template`) produces.
"""

from __future__ import annotations

from typing import Any

DEFAULT_SYSTEM = "You are a helpful assistant."
AUDIO_PLACEHOLDER = "<|audio_bos|><|AUDIO|><|audio_eos|>"


def render_prompt(messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """The instruct template, rendered without jinja: system default, audios numbered
    "Audio N:" across the whole conversation."""
    out: list[str] = []
    audio_n = 0
    for i, message in enumerate(messages):
        if i == 0 and message["role"] != "system":
            out.append(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n")
        out.append(f"<|im_start|>{message['role']}\n")
        content = message["content"]
        if isinstance(content, str):
            out.append(f"{content}<|im_end|>\n")
            continue
        for part in content:
            if part["type"] == "audio":
                audio_n += 1
                out.append(f"Audio {audio_n}: {AUDIO_PLACEHOLDER}\n")
            elif part["type"] == "text":
                out.append(part["text"])
        out.append("<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)
