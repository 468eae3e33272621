"""A session's history and the prompts it renders for the backend's model family.

Messages use the chat-template shape; an audio part is {"type": "audio", "audio": i} with
`i` an index into the request's audio list. The format itself (template, audio tokens) is the
model's family (`agent.model.family`: Qwen2-Audio by default, Qwen2.5-Omni's thinker, Voxtral).

Token counts. `Conversation.token_count` counts a prompt without running the processor on
audio: each audio placeholder expands to the family's `audio_token_count(samples)` (Qwen: 25
per second; Voxtral: 375 per started 30 s window), text is counted with the model's tokenizer when one is given, else as UTF-8 bytes
after NFC (one token per byte, one per special token). The byte count is exact for the
byte-level tiny-random tokenizer and an upper bound for any byte-level BPE (Qwen's), so a
conversation without a tokenizer stays within budget, just conservatively.

Counting is incremental: a prompt's tokens are the sum of its messages' (the template puts
special tokens between messages, where tokenizers split), so each history entry is counted
once and `request()` only adds numbers. The one part that depends on the window is the
"Audio N:" numbering (Qwen2-Audio's alone): an entry is counted as if its audios were numbered from 1, and each
extra digit of the real numbers adds one token (Qwen splits digits one by one; checked
against the tokenizer once, else every count renders the whole prompt).

Clips per request. A server may cap the audio clips of one prompt (vLLM's
`--limit-mm-per-prompt`): with `max_audios` set, a request carries the newest turns' clips up
to that many and the older turns without their audio (their text, instructions and answers,
stays); a turn over 30 s is several clips and keeps all or none of them. The prompt is rendered
from what is sent, so "Audio N:" numbering and token counts match the server's template. Audio no
later request can carry is freed.

Long instructions. An instruction of more than half the context budget is refused by
`add_user` with a ValueError (the session reports it as that turn's error and goes on): the
current turn is never dropped, so an oversized one could only overflow the model's context.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.model import family as families
from agent.model.family import Family

if TYPE_CHECKING:
    from agent.inference.base import GenerationRequest


def _system(text: str) -> dict[str, Any]:
    return {"role": "system", "content": text}


def _clips(entry: tuple[Any, ...]) -> int:
    return len(entry[1]) if entry[0] == "user" else 0


def _extra_digits(audios: int) -> int:
    """Tokens "Audio 1:" … "Audio N:" take beyond one digit each: Σ (digits(n) − 1)."""
    extra, width, start = 0, 2, 10
    while start <= audios:
        extra += (min(audios, start * 10 - 1) - start + 1) * (width - 1)
        width, start = width + 1, start * 10
    return extra

class Conversation:
    """One session's history: user audio (± instruction), assistant text, tool results.

    A user turn with an instruction is audio analysis; without one, voice chat (there is no
    system-prompt switch). Audio over 30 s is split into several audio parts (the processor
    would silently truncate it). The assistant's raw text, its tool calls included (`<tool_call>`
    blocks; Voxtral's `[TOOL_CALLS]` list), stays in its message; tool results are the text
    `agent.tools.format_tool_responses` gives, sent as the family's `tool_syntax.results_role`
    (a user turn of `<tool_response>` blocks; Voxtral: a "tool" message of `[TOOL_RESULTS]`).

    `request()` keeps prompt + `max_new_tokens` within `context_tokens` by dropping the
    oldest whole turns (a user turn with its replies and tool rounds), never the current one.
    History that can no longer fit any prompt is freed, so long sessions do not hold all
    their audio. `tokenizer` (optional, a Hugging Face tokenizer) makes counts exact.
    """

    def __init__(self, system_prompt: str | None = None, context_tokens: int = 6000,
                 tokenizer: Any = None, max_audios: int | None = None, family: Family | None = None) -> None:
        self.family = family or families.default()  # the model's format: template, audio tokens
        self.system_prompt = system_prompt
        self.context_tokens = context_tokens
        self.tokenizer = tokenizer
        self.max_audios = max_audios  # clips per request; None: no limit
        # ("user", [clips], instruction | None) | ("assistant", text) | ("tool", text)
        self._entries: list[tuple[Any, ...]] = []
        self._costs: list[dict[bool, int]] = []  # per entry, with/without its audio (`_entry_cost`)
        self._text_costs: dict[str, int] = {}  # system messages and template pieces
        self._digits_split: bool | None = None
        self._specials_split: bool | None = None  # the tokenizer reads "[AUDIO]" etc. as one token  # the tokenizer gives each digit its own token
        self._last_audios: list[np.ndarray] = []

    @classmethod
    def for_backend(cls, system_prompt: str | None, context_tokens: int, backend: Any) -> Conversation:
        """A conversation within what `backend` takes: its server's context length
        (`max_model_len`) and clips per request (`max_audios`), counted with its tokenizer in
        its model's family's format (`family`; none known: Qwen2-Audio's)."""
        limit = getattr(backend, "max_model_len", None)
        return cls(system_prompt, min(context_tokens, limit) if limit else context_tokens,
                   tokenizer=getattr(backend, "tokenizer", None), max_audios=getattr(backend, "max_audios", None),
                   family=getattr(backend, "family", None))

    # ---- history --------------------------------------------------------------------
    def add_user(self, audio: np.ndarray, instruction: str | None = None) -> None:
        """A user turn; raises ValueError for no audio or an oversized instruction."""
        clip = np.array(audio, dtype=np.float32)  # a copy: callers may reuse their buffers
        if clip.ndim != 1:
            raise ValueError(f"a turn's audio must be mono (1-D), got shape {clip.shape}")
        if clip.size == 0:
            raise ValueError("empty turn: no audio")
        if not np.isfinite(clip).all():
            raise ValueError("a turn's audio holds NaN or infinite samples")
        if instruction:
            self.check_text(instruction)
        clips = self.family.split_clips(clip)
        if self.max_audios is not None and len(clips) > self.max_audios:
            raise ValueError(f"a turn of {clip.size / self.family.sample_rate:.0f} s is {len(clips)} clips of at most "
                             f"{self.family.max_clip_s} s, "
                             f"over the limit of {self.max_audios} per request (the server's --limit-mm-per-prompt)")
        self._append(("user", clips, instruction or None))

    def add_user_text(self, text: str) -> None:
        """A typed user turn, no audio (e.g. livekit-agents' `generate_reply(user_input=…)`)."""
        if not text:
            raise ValueError("empty turn: no text")
        self.check_text(text)
        self._append(("user", [], text))

    def add_assistant(self, text: str) -> None:
        self._append(("assistant", text))

    def truncate_last_answer(self, heard: str) -> bool:
        """The user got only `heard` of the last answer (its speech was cut by a barge-in): the
        history keeps that much, so the model knows what was said. False when the last entry
        is not an answer."""
        if not self._entries or self._entries[-1][0] != "assistant":
            return False
        self._entries[-1] = ("assistant", heard)
        self._costs[-1] = {}
        return True

    def add_tool_results(self, text: str) -> None:
        self._append(("tool", text))

    @property
    def awaiting_reply(self) -> bool:
        """The last entry is a user turn or tool results: there is something to answer."""
        return bool(self._entries) and self._entries[-1][0] in ("user", "tool")

    def last_user_audio(self) -> np.ndarray | None:
        """The latest user turn's audio, its clips joined (None: no audio turn), e.g. to record it."""
        for entry in reversed(self._entries):
            if entry[0] == "user":
                return np.concatenate(entry[1]) if entry[1] else None
        return None

    def pop_last_user(self) -> None:
        """Drop the last user turn and whatever followed it (uncommitted or cancelled)."""
        for i in range(len(self._entries) - 1, -1, -1):
            if self._entries[i][0] == "user":
                del self._entries[i:]
                del self._costs[i:]
                return

    # ---- prompts --------------------------------------------------------------------
    def system_message(self, tools_block: str | None = None) -> str | None:
        """The system text, or None to let the template insert its default."""
        if tools_block:
            base = self.system_prompt if self.system_prompt is not None else self.family.default_system
            return f"{base}\n\n{tools_block}" if base else tools_block
        return self.system_prompt

    def system_tokens(self, tools_block: str | None = None) -> int:
        """What the system message costs in every prompt (0: the template's default)."""
        system = self.system_message(tools_block)
        return 0 if system is None else self._text_tokens(system)

    def request(self, session_id: str, turn_id: str, max_new_tokens: int = 256,
                tools_block: str | None = None, instructions: str | None = None) -> GenerationRequest:
        """The prompt for the current (last) user turn and its tool rounds, within budget.
        `instructions` are added to the system message of this request only."""
        from agent.inference.base import GenerationRequest

        starts = self._turn_starts()
        if not starts or self._entries[starts[-1]][0] != "user":
            raise ValueError("no user turn to answer")
        system = self.system_message(tools_block)
        if instructions:
            base = self.family.default_system if system is None else system
            system = f"{base}\n\n{instructions}" if base else instructions
        budget = self.context_tokens - max_new_tokens
        self._free_audio(self._audio_from(starts[-1]))  # no later request can carry it
        audio_from = self._audio_from(len(self._entries))

        def cost(k: int) -> int:
            return self._window_cost(system, starts[k], len(self._entries), audio_from)

        # Binary search for the oldest turn that still fits: the count only grows with
        # each older turn included. The current turn (index -1) is always kept.
        lo, hi = 0, len(starts) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if cost(mid) <= budget:
                hi = mid
            else:
                lo = mid + 1
        messages, audios = self._render(system, starts[lo], audio_from=audio_from)
        if lo > 0:
            self._forget_before(starts, lo)
        self._last_audios = audios
        return GenerationRequest(session_id, turn_id, messages, audios, max_new_tokens)

    def token_count(self, messages: list[dict[str, Any]],
                    audios: Sequence[np.ndarray] | None = None) -> int:
        """Prompt length in tokens, audio tokens expanded, as the processor would make it.

        `audios` is the list the audio parts index (a request's `audios`); by default the
        audios of this conversation's latest `request()`.
        """
        audios = self._last_audios if audios is None else audios
        n = self._text_tokens(self.family.render_prompt(messages, True))
        for message in messages:
            if isinstance(message["content"], str):
                continue
            for part in message["content"]:
                if part["type"] == "audio":
                    index = part["audio"]
                    if not 0 <= index < len(audios):
                        raise ValueError(f"audio part refers to missing audio {index}")
                    n += self.family.audio_token_count(len(audios[index])) - 1  # the placeholder expands
        return n

    # ---- internals ------------------------------------------------------------------
    def check_text(self, text: str, what: str = "instruction") -> None:
        """Text that goes into every prompt of a turn (an instruction, a system prompt) may
        take at most half the context budget; ValueError saying so otherwise."""
        limit = self.context_tokens // 2
        n = self._text_tokens(text)
        if n > limit:
            raise ValueError(f"{what} of {n} tokens is over the limit of {limit} "
                             f"(half the context budget of {self.context_tokens} tokens)")

    def _text_tokens(self, text: str) -> int:
        if self.tokenizer is not None:
            if not self._tokenizer_splits_specials():  # mistral-common's: specials are split out first
                pieces = self.family.special_re.split(text)
                return len(pieces) - 1 + sum(self._tokenize(p) for p in pieces if p)
            return self._tokenize(text)
        n, pos = 0, 0
        for match in self.family.special_re.finditer(text):
            n += len(unicodedata.normalize("NFC", text[pos : match.start()]).encode()) + 1
            pos = match.end()
        return n + len(unicodedata.normalize("NFC", text[pos:]).encode())

    def _tokenize(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _tokenizer_splits_specials(self) -> bool:
        """The tokenizer reads the family's special tokens written in text as one id each
        (Hugging Face's added tokens do; mistral-common's tekken does not: the engine splits
        them out before BPE, and so does this count)."""
        if self._specials_split is None:
            self._specials_split = self._tokenize(self.family.audio_token) == 1
        return self._specials_split

    def _turn_starts(self) -> list[int]:
        """Where each whole turn begins: every user audio turn (and any leading replies)."""
        starts = [i for i, e in enumerate(self._entries) if e[0] == "user"]
        if self._entries and (not starts or starts[0] != 0):
            starts.insert(0, 0)
        return starts

    def _audio_from(self, end: int) -> int:
        """The first entry before `end` whose audio a request ending at `end` carries: the newest
        turns' clips, whole turns only, at most `max_audios` (0: all)."""
        if self.max_audios is None:
            return 0
        clips = 0
        for i in range(end - 1, -1, -1):
            clips += _clips(self._entries[i])
            if clips > self.max_audios:
                return i + 1
        return 0

    def _free_audio(self, end: int) -> None:
        """Entries before `end` lose their audio for good (their text stays)."""
        for i in range(end):
            entry = self._entries[i]
            if _clips(entry):
                self._entries[i] = ("user", [], entry[2])
                self._costs[i] = {}

    def _render(self, system: str | None, first: int, end: int | None = None,
                audio_from: int = 0) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
        messages: list[dict[str, Any]] = []
        if system is not None:
            messages.append({"role": "system", "content": system})
        audios: list[np.ndarray] = []
        for i, entry in enumerate(self._entries[first:end], first):
            if entry[0] == "user":
                parts: list[dict[str, Any]] = []
                for clip in entry[1] if i >= audio_from else ():
                    parts.append({"type": "audio", "audio": len(audios)})
                    audios.append(clip)
                if entry[2]:
                    parts.append({"type": "text", "text": entry[2]})
                messages.append({"role": "user", "content": parts})
            elif entry[0] == "assistant":
                messages.append({"role": "assistant", "content": entry[1]})
            elif self.family.tool_syntax.results_role == "tool":  # Mistral: results follow the answer
                messages.append({"role": "tool", "content": entry[1]})
            else:
                messages.append({"role": "user", "content": [{"type": "text", "text": entry[1]}]})
        return messages, audios

    def _forget_before(self, starts: list[int], k: int) -> None:
        """Free the turns that no later prompt can reach: turn j is unreachable once it and
        the later history (the current turn aside) fill the whole budget on their own."""

        bare = starts[-1] if self.max_audios is not None else 0  # a later request may carry none of it

        def unreachable(j: int) -> bool:  # the smallest system message ("", or none where no default)
            return self._window_cost(self._base(), starts[j], starts[-1], bare) >= self.context_tokens

        lo, hi = -1, k - 1  # the newest unreachable turn, if any, is in [0, k-1]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if unreachable(mid):
                lo = mid
            else:
                hi = mid - 1
        if lo >= 0:
            del self._entries[: starts[lo + 1]]
            del self._costs[: starts[lo + 1]]

    # ---- incremental counting -------------------------------------------------------
    def _append(self, entry: tuple[Any, ...]) -> None:
        self._entries.append(entry)
        self._costs.append({})

    def _window_cost(self, system: str | None, first: int, end: int, audio_from: int = 0) -> int:
        """`token_count` of the prompt of entries [first, end) under `system`, entries before
        `audio_from` without their audio, from counts kept per entry."""
        numbered = self.family.audio_numbered
        if numbered and not self._splits_digits():
            return self.token_count(*self._render(system, first, end, audio_from))
        n = self._header_cost(system) + self._generation_prompt_cost()
        for i in range(first, end):
            n += self._entry_cost(i, i < audio_from)
        if not numbered:
            return n
        return n + _extra_digits(sum(_clips(e) for e in self._entries[max(first, audio_from):end]))

    def _base(self) -> str | None:
        """The system message entries are counted after: an empty one where the template
        would insert its default without one (Qwen's), else none."""
        return "" if self.family.default_system is not None else None

    def _header_cost(self, system: str | None) -> int:
        """What a prompt costs before its first entry: the template's start and the system
        message (None: the template's default, if it has one). A family that moves the system
        text into the first user turn beside audio (Voxtral) is counted with its text-only
        form, which costs at least as much."""
        if system is None:
            system = self.family.default_system
        render = self.family.render_prompt
        return self._cached_text(render([] if system is None else [_system(system)], False))

    def _entry_cost(self, i: int, bare: bool = False) -> int:
        """Tokens of entry i's message (`bare`: without its audio), audio placeholders expanded,
        with its audios numbered as if from 1 and one digit each."""
        cost = self._costs[i].get(bare)
        if cost is None:
            base = self._base()
            messages, audios = self._render(base, i, i + 1, i + 1 if bare else 0)
            render = self.family.render_prompt
            empty = self._cached_text(render([] if base is None else [_system(base)], False))
            cost = self._text_tokens(render(messages, False)) - empty
            if self.family.audio_numbered:
                cost -= _extra_digits(len(audios))
            cost += sum(self.family.audio_token_count(len(a)) - 1 for a in audios)
            self._costs[i][bare] = cost
        return cost

    def _generation_prompt_cost(self) -> int:
        base = self._base()
        render = self.family.render_prompt
        messages = [] if base is None else [_system(base)]
        return self._cached_text(render(messages, True)) - self._cached_text(render(messages, False))

    def _cached_text(self, text: str) -> int:
        n = self._text_costs.get(text)
        if n is None:
            if len(self._text_costs) > 16:  # system prompts of a few configurations
                self._text_costs.clear()
            n = self._text_costs[text] = self._text_tokens(text)
        return n

    def _splits_digits(self) -> bool:
        """Each digit of "Audio N:" one token (bytes: always; Qwen's tokenizer: yes)."""
        if self._digits_split is None:
            one, ten, hundred = (self._text_tokens(f"Audio {n}: ") for n in (1, 10, 100))
            self._digits_split = ten - one == 1 and hundred - one == 2
        return self._digits_split
