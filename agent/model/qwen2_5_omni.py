"""Qwen2.5-Omni's thinker (audio in, text out): its format.

- the chat template of the released checkpoints (`CHAT_TEMPLATE`, also what the tiny model
  ships), rendered without jinja by `render_prompt`: default system "You are a helpful
  assistant." when the first turn is not a system turn, each audio written
  `<|audio_bos|><|AUDIO|><|audio_eos|>` in place, not numbered (the template's `add_audio_id`
  is off by default), text parts appended as they are;
- audio: 16 kHz, Whisper features with 128 mel bins, clips of ≤ 30 s (the processor pads to
  30 s and truncates), one token per 40 ms: the same formula as Qwen2-Audio. Its encoder runs
  on each clip's valid frames natively (windowed attention over 2 s chunks);
- tools: the Qwen2.5 (Hermes) convention of the Qwen2-Audio module;
- the talker (speech out) is not used: the agent loads the thinker only.
"""

from __future__ import annotations

from typing import Any

from agent.model import qwen2_audio
from agent.model.family import Checkpoint, Family

DEFAULT_SYSTEM = "You are a helpful assistant."
# The Qwen system prompt the model card asks for when speech output is used (not by this agent).
SPEECH_SYSTEM = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
                 "perceiving auditory and visual inputs, as well as generating text and speech.")
AUDIO_TOKEN = "<|AUDIO|>"
AUDIO_PLACEHOLDER = "<|audio_bos|><|AUDIO|><|audio_eos|>"
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", AUDIO_TOKEN, "<|audio_bos|>", "<|audio_eos|>", "<|IMAGE|>",
                  "<|VIDEO|>", "<|vision_bos|>", "<|vision_eos|>", "<|vision_pad|>", "<|endoftext|>")
EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")

CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
    "<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}{% if add_audio_id %}Audio "
    "{{ audio_count.value }}: {% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = "
    "video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_bos|><|VIDEO|><|vision_eos|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}")


def render_prompt(messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """`CHAT_TEMPLATE` rendered: an audio part is {"type": "audio", …}, text {"type": "text"}."""
    out: list[str] = []
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
                out.append(AUDIO_PLACEHOLDER)
            elif part["type"] == "text":
                out.append(part["text"])
        out.append("<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


audio_token_count = qwen2_audio.audio_token_count  # the processor's `_get_feat_extract_output_lengths`

FAMILY = Family(
    name="qwen2.5-omni", title="Qwen2.5-Omni (thinker)", model_types=("qwen2_5_omni", "qwen2_5_omni_thinker"),
    tiny="tiny-random-qwen2.5-omni", render_prompt=render_prompt, audio_token=AUDIO_TOKEN,
    audio_token_count=audio_token_count, special_tokens=SPECIAL_TOKENS, eos_tokens=EOS_TOKENS,
    licence="Apache-2.0 (7B); Qwen Research License (3B)",
    checkpoints=(Checkpoint("Qwen/Qwen2.5-Omni-7B", 8.9, 17.8, "thinker only; the talker is not loaded"),
                 Checkpoint("Qwen/Qwen2.5-Omni-3B", 4.4, 8.8, "thinker only; research licence")),
    modes=("chat", "analysis"), tools="hermes: `<tool_call>` JSON (Qwen2.5 convention)", tool_syntax=qwen2_audio.HERMES,
    encoder="native-real-length", default_system=DEFAULT_SYSTEM,
    notes="Answers spoken questions and follows instructions about audio; audio placeholders are not "
          "numbered; the thinker also reads images and video, which this agent does not send.")
