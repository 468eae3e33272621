"""Qwen2-Audio's format, in one place: everything else depends down on this module.

- the instruct chat template, rendered without jinja (`render_prompt`), token-for-token what
  `processor.apply_chat_template` produces: default system prompt, audios numbered
  "Audio N:" across the whole conversation;
- audio: 16 kHz mono, clips of at most 30 s (`split_clips`), one token per 40 ms
  (`audio_token_count`, the processor's own formula);
- tools, Qwen2.5 (Hermes) style: a `<tools>` block in the system message
  (`tools_system_block`), `<tool_call>{…}</tool_call>` in the answer, results as
  `<tool_response>` blocks (`tool_responses_text`);
- the OpenAI-compatible wire format of a conversation (`to_openai_messages`): audio as
  `input_audio` parts, base64 WAV; and back (`from_openai_messages`, what `serve-model` reads).
"""

from __future__ import annotations

import base64
import io
import json
import re
import wave
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

SAMPLE_RATE = 16000  # the encoder's input rate; every transport converts to it
MAX_CLIP_S = 30
MAX_CLIP_SAMPLES = MAX_CLIP_S * SAMPLE_RATE  # the processor pads/truncates every clip to 30 s
HOP = 160  # Whisper feature hop: one mel frame per 10 ms
MAX_MEL_FRAMES = MAX_CLIP_SAMPLES // HOP  # 3000: the padded window
DEFAULT_SYSTEM = "You are a helpful assistant."
AUDIO_TOKEN = "<|AUDIO|>"
AUDIO_PLACEHOLDER = "<|audio_bos|><|AUDIO|><|audio_eos|>"
SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", AUDIO_TOKEN, "<|audio_bos|>", "<|audio_eos|>"]
EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")
SPECIAL_RE = re.compile("|".join(re.escape(t) for t in (*SPECIAL_TOKENS, "<|endoftext|>")))

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


# ---- chat template ------------------------------------------------------------------
def render_prompt(messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """The instruct template: system default, audios numbered "Audio N:" across the whole
    conversation. An audio part is {"type": "audio", …}, a text part {"type": "text", "text"}."""
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


# ---- audio --------------------------------------------------------------------------
def mel_frames(n_samples: int) -> int:
    """Valid mel frames of a clip: one per started 10 ms hop (ceil) of the clip cut to 30 s."""
    return -(-min(n_samples, MAX_CLIP_SAMPLES) // HOP)


def encoder_tokens(frames: int) -> int:
    """Audio tokens for `frames` valid mel frames: conv stride 2, then pooling by 2."""
    return (((frames - 1) // 2 + 1) - 2) // 2 + 1 if frames > 0 else 0


def audio_token_count(n_samples: int) -> int:
    """Tokens one <|AUDIO|> expands to for a clip of `n_samples` (≤ 750, ~25 per second)."""
    return encoder_tokens(mel_frames(n_samples))


def split_clips(audio: np.ndarray) -> list[np.ndarray]:
    """Cut audio into equal parts of ≤ 30 s; equal, so no tail is too short to encode."""
    parts = -(-audio.size // MAX_CLIP_SAMPLES)
    size = -(-audio.size // parts)
    return [audio[i : i + size] for i in range(0, audio.size, size)]


def to_wav_bytes(samples: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """Mono samples (float in [-1, 1], or int16 as they are) → 16-bit PCM WAV."""
    if samples.dtype == np.int16:
        pcm = samples.astype("<i2", copy=False)
    else:
        pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


# ---- tools --------------------------------------------------------------------------
def tools_system_block(schemas: Sequence[dict[str, Any]]) -> str:
    """The tool section Qwen2.5's template appends to the system message."""
    lines = "\n".join(json.dumps(s, ensure_ascii=False) for s in schemas)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{lines}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def tool_responses_text(bodies: Sequence[dict[str, Any]]) -> str:
    """The user turn that returns tool results: one <tool_response> per call, in call order."""
    return "\n".join(f"<tool_response>\n{json.dumps(b, ensure_ascii=False)}\n</tool_response>" for b in bodies)


def hermes_results_text(results: list[dict[str, Any]]) -> str:
    """`ToolSyntax.results_text` of the Hermes convention: {"name", "result" | "error"} each."""
    return tool_responses_text([{k: r[k] for k in ("name", "result", "error") if k in r} for r in results])


# ---- OpenAI-compatible servers (vLLM) -------------------------------------------------
def to_openai_messages(messages: list[dict[str, Any]], audios: Sequence[np.ndarray],
                       encode: Callable[[np.ndarray], str] | None = None) -> list[dict[str, Any]]:
    """Our messages → chat-completions messages, audio parts as `input_audio` base64 WAV.
    `encode` (clip → base64) lets a caller cache encodings of earlier turns."""
    encode = encode or audio_base64
    out: list[dict[str, Any]] = []
    for message in messages:
        content = message["content"]
        if message["role"] == "tool":  # a family's tool results (Voxtral's): text in a user turn on the wire
            out.append({"role": "user", "content": content})
            continue
        if isinstance(content, str):
            out.append({"role": message["role"], "content": content})
            continue
        parts: list[dict[str, Any]] = []
        for part in content:
            if part["type"] == "audio":
                parts.append({"type": "input_audio",
                              "input_audio": {"data": encode(audios[part["audio"]]), "format": "wav"}})
            elif part["type"] == "text":
                parts.append({"type": "text", "text": part["text"]})
        out.append({"role": message["role"], "content": parts})
    return out


def audio_base64(clip: np.ndarray) -> str:
    return base64.b64encode(to_wav_bytes(clip)).decode("ascii")


def from_openai_messages(messages: Sequence[dict[str, Any]], decode: Callable[[str, str], np.ndarray],
                         ) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """Chat-completions messages → ours and their audios: the reverse of `to_openai_messages`.
    `decode(base64, format)` gives 16 kHz mono float32; a clip over 30 s becomes several audio
    parts (`split_clips`), as `Conversation` does. Raises ValueError naming the bad part."""
    out: list[dict[str, Any]] = []
    audios: list[np.ndarray] = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{i}]: role {role!r} is not supported (system, user, assistant)")
        if content is None or isinstance(content, str):
            out.append({"role": role, "content": content or ""})
            continue
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            kind = part.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": part.get("text") or ""})
            elif kind == "input_audio":
                audio = part.get("input_audio") or {}
                samples = decode(audio.get("data") or "", audio.get("format") or "wav")
                for clip in split_clips(samples) if samples.size else [samples]:
                    parts.append({"type": "audio", "audio": len(audios)})
                    audios.append(clip)
            else:
                raise ValueError(f"messages[{i}].content[{j}]: part type {kind!r} is not supported (text, input_audio)")
        out.append({"role": role, "content": parts})
    return out, audios


def wav_samples(data: bytes) -> tuple[np.ndarray, int, int]:
    """A PCM WAV file → (float32 samples in [-1, 1], interleaved; rate; channels).
    Raises ValueError for anything else (then decode it with PyAV)."""
    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
            frames = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"not a PCM WAV file: {exc}") from None
    if width == 2:
        samples = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 4:
        samples = np.frombuffer(frames, dtype="<i4").astype(np.float32) / 2147483648.0
    elif width == 1:
        samples = (np.frombuffer(frames, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    else:
        raise ValueError(f"unsupported WAV sample width: {width} bytes")
    return samples, rate, channels


# ---- the family, for the registry (agent.model.family) --------------------------------
def _family() -> Any:
    from agent.model.family import Checkpoint, Family

    return Family(
        name="qwen2-audio", title="Qwen2-Audio", model_types=("qwen2_audio",), tiny="tiny-random",
        render_prompt=render_prompt, audio_token=AUDIO_TOKEN, audio_token_count=audio_token_count,
        special_tokens=(*SPECIAL_TOKENS, "<|endoftext|>"), eos_tokens=EOS_TOKENS,
        licence="Apache-2.0",
        checkpoints=(Checkpoint("Qwen/Qwen2-Audio-7B-Instruct", 8.4, 16.8, "Whisper-large-v3 encoder + Qwen-7B"),),
        modes=("chat", "analysis"), tools="hermes: `<tool_call>` JSON (Qwen2.5 convention; not trained on it)",
        tool_syntax=HERMES,
        encoder="real-length", sample_rate=SAMPLE_RATE, max_clip_s=MAX_CLIP_S, default_system=DEFAULT_SYSTEM,
        audio_numbered=True, notes="Voice chat when a turn holds audio only, audio analysis when it carries an instruction; "
              "audios numbered 'Audio N:' across the conversation. 25 audio tokens per second.")


def _hermes() -> Any:
    from agent.model.family import ToolSyntax

    return ToolSyntax("hermes", TOOL_CALL_OPEN, TOOL_CALL_CLOSE, hermes_results_text, tools_system_block)


HERMES = _hermes()
FAMILY = _family()
