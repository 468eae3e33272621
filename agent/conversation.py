"""A session's history and the prompts it renders for Qwen2-Audio.

Messages use the chat-template shape; an audio part is {"type": "audio", "audio": i} with
`i` an index into the request's audio list. `render_prompt` yields exactly the text the
instruct model's template (`processor.apply_chat_template`) produces.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.inference.base import GenerationRequest

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


MAX_CLIP_SAMPLES = 30 * 16000  # the processor pads/truncates every clip to 30 s
_TEXT_TOKENS_PER_CHAR = 1.0  # byte-level upper bound for the budget; real BPE is ~4× fewer


def audio_token_count(n_samples: int) -> int:
    """Tokens one <|AUDIO|> expands to: the processor's own formula on mel frames."""
    frames = min(n_samples, MAX_CLIP_SAMPLES) // 160  # hop length 160
    return (((frames - 1) // 2 + 1) - 2) // 2 + 1 if frames else 0


class Conversation:
    """One session's history: user audio (± instruction), assistant text, tool results.

    A user turn with an instruction is audio analysis; without one, voice chat. Audio over
    30 s is split into several audio parts (the processor would silently truncate it).
    """

    def __init__(self, system_prompt: str | None = None, context_tokens: int = 6000) -> None:
        self.system_prompt = system_prompt
        self.context_tokens = context_tokens
        # Each entry: ("user", [audio clips], instruction) | ("assistant", text) | ("tool", text)
        self._turns: list[tuple[Any, ...]] = []

    def add_user(self, audio: Any, instruction: str | None = None) -> None:
        import numpy as np

        audio = np.asarray(audio, dtype=np.float32)
        if audio.size == 0:
            raise ValueError("empty turn: no audio")
        if instruction and len(instruction) > self.context_tokens // 2:
            # Refused rather than sent: it would crowd out the audio and every earlier turn.
            raise ValueError(f"instruction of {len(instruction)} characters is over the limit of "
                             f"{self.context_tokens // 2} (half the context budget)")
        clips = [audio[i : i + MAX_CLIP_SAMPLES] for i in range(0, audio.size, MAX_CLIP_SAMPLES)]
        self._turns.append(("user", clips, instruction))

    def add_assistant(self, text: str) -> None:
        self._turns.append(("assistant", text))

    def add_tool_results(self, text: str) -> None:
        self._turns.append(("tool", text))

    def pop_last_user(self) -> None:
        for i in range(len(self._turns) - 1, -1, -1):
            if self._turns[i][0] == "user":
                del self._turns[i:]
                return

    def _cost(self, entry: tuple[Any, ...]) -> int:
        if entry[0] == "user":
            return sum(audio_token_count(c.size) + 8 for c in entry[1]) + len(entry[2] or "") + 6
        return len(entry[1]) + 6

    def request(self, session_id: str, turn_id: str, max_new_tokens: int = 256,
                tools_block: str | None = None) -> "GenerationRequest":
        from agent.inference.base import GenerationRequest

        system = "\n\n".join(p for p in (self.system_prompt, tools_block) if p) or None
        # The budget drops the oldest whole exchanges, never the current (last) user turn.
        starts = [i for i, t in enumerate(self._turns) if t[0] == "user"]
        budget = self.context_tokens - max_new_tokens - len(system or DEFAULT_SYSTEM)
        first = starts[-1] if starts else 0
        for start in reversed(starts):
            if sum(self._cost(t) for t in self._turns[start:]) > budget and start != first:
                break
            first = start
        messages: list[dict[str, Any]] = []
        if system:
            messages.append({"role": "system", "content": system})
        audios: list[Any] = []
        for entry in self._turns[first:]:
            if entry[0] == "user":
                parts: list[dict[str, Any]] = []
                for clip in entry[1]:
                    parts.append({"type": "audio", "audio": len(audios)})
                    audios.append(clip)
                if entry[2]:
                    parts.append({"type": "text", "text": entry[2]})
                messages.append({"role": "user", "content": parts})
            elif entry[0] == "assistant":
                messages.append({"role": "assistant", "content": entry[1]})
            else:
                messages.append({"role": "user", "content": [{"type": "text", "text": entry[1]}]})
        return GenerationRequest(session_id, turn_id, messages, audios, max_new_tokens)
