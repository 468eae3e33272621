"""The engine's records: a request in flight (`Seq`), a session's cached history, an output."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from agent.inference.base import GenerationRequest, GenerationStats, InferenceError
from agent.inference.batch import KV
from agent.inference.prompts import Answer, Detokenizer, Prompt, lcp

COMMITTED, PREEMPTIVE, SPECULATIVE = 0, 1, 2  # priorities: lower first


@dataclass
class Output:
    request_id: str
    text: str  # delta since the last output of this request
    finished: bool = False
    stats: GenerationStats | None = None
    token_ids: list[int] = field(default_factory=list)  # new tokens of this step
    # (code, message): a tuple pickles across processes, InferenceError does not.
    error: tuple[str, str] | None = None
    cached: list[str] | None = None  # finished: digests of the audios its session's KV now holds

    def exception(self) -> InferenceError | None:
        return InferenceError(*self.error) if self.error else None


@dataclass
class SessionCache:
    ids: list[int]  # exactly the tokens the KV covers
    spans: list[tuple[int, int, str]]
    kv: KV
    answers: list[Answer] = field(default_factory=list)  # generated ids within `ids`, with their text's ids


@dataclass(eq=False)  # identity: requests are found in queues by `in`/`remove`
class Seq:
    rid: str
    req: GenerationRequest
    detok: Detokenizer
    t_submit: float
    stats: GenerationStats = field(default_factory=GenerationStats)
    prompt: Prompt | None = None
    generated: list[int] = field(default_factory=list)
    kv: KV | None = None  # own cache: a speculative prefill waiting for its commit, a parked preemptive answer
    t_first: float | None = None
    min_new_tokens: int = 0
    answers: list[Answer] = field(default_factory=list)  # earlier answers spliced into `prompt`
    promoted: bool = False  # a preemptive answer whose turn committed
    # prefill, from admission to the first token
    t_admit: float = 0.0
    row: int | None = None  # its row in the engine's KV store
    reuse: SessionCache | None = None  # the session's history it started from
    took: bool = False  # `reuse` was taken out of the session LRU (put back if it is dropped)
    past: int = 0  # tokens in its row
    embeds: torch.Tensor | None = None  # inputs of the whole new suffix [1, n, hidden]
    base: int = 0  # prompt position of embeds[0]
    done: int = 0  # rows of `embeds` prefilled
    todo: list[tuple[Any, tuple[int, int, str]]] = field(default_factory=list)  # audio not encoded yet, with its span

    @property
    def key(self) -> tuple[str, str]:
        return self.req.session_id, self.req.turn_id

    @property
    def rank(self) -> int:
        if self.req.speculative:
            return SPECULATIVE
        return PREEMPTIVE if self.req.preemptive and not self.promoted else COMMITTED

    @property
    def started(self) -> bool:
        return self.embeds is not None or self.row is not None

    def final_tokens(self) -> int:
        """The most KV this request can reach: its prompt plus every token it may generate."""
        assert self.prompt is not None
        return len(self.prompt.ids) + (0 if self.req.speculative else self.req.max_new_tokens)

    def own_tokens(self) -> int:
        """Tokens of its own cache (`kv`)."""
        return 0 if self.kv is None else int(self.kv[0][0].shape[2])

    def clear(self) -> None:
        self.reuse = self.embeds = self.kv = None
        self.todo = []
        self.row, self.took = None, False


def error(seq: Seq, code: str, message: str, now: float) -> Output:
    seq.stats.tokens = len(seq.generated)
    seq.stats.timings["total"] = now - seq.t_submit
    return Output(seq.rid, "", True, seq.stats, error=(code, message))


def reusable(entry: SessionCache, prompt: Prompt) -> int:
    """The longest prefix of `prompt` the cached history covers that does not cut through an
    audio span (or change an audio); at least one token is left to compute logits from."""
    n = min(lcp(entry.ids, prompt.ids), len(prompt.ids) - 1)
    cached = set(entry.spans)
    for span in prompt.spans:
        start, end, _ = span
        if start >= n:
            break
        if end > n or span not in cached:
            return start
    return n


def session_cache(seq: Seq, kv: KV, tokenizer: Any, eos_ids: set[int]) -> SessionCache:
    """What a finished (or stopped) request leaves its session: the KV of prompt + generated
    tokens (all but the last, never fed), and its answer's ids with the ids of its text."""
    assert seq.prompt is not None
    ids = (seq.prompt.ids + seq.generated[:-1])[:kv[0][0].shape[2]]
    answers = list(seq.answers)
    content = seq.generated[:-1] if seq.generated and seq.generated[-1] in eos_ids else seq.generated
    if content:  # the next prompt holds it as text: remember which ids it came from
        text_ids = tokenizer(seq.detok.text, add_special_tokens=False)["input_ids"]
        answers.append((len(seq.prompt.ids), list(content), text_ids))
    return SessionCache(ids, seq.prompt.spans, kv, answers)
