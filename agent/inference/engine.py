"""A synchronous continuous-batching engine over one loaded Qwen2-Audio model.

Pure and single-threaded: a worker process drives it with `submit` / `cancel` / `step`.
Each `step` (1) admits queued requests while batch slots and the KV budget allow, evicting
other sessions' history (LRU) and then held speculative prefills; (2) runs at most
`prefill_chunk_tokens` of prefill (encoder included), oldest request first, in chunks on its
own cache after the session's cached history, so running streams never wait for a whole
prompt; (3) runs ONE batched greedy decode step over the left-padded batch (`batch.Batch`).

KV accounting (`kv_projected`) counts every cache: session histories, held speculative
prefills, and the batch at its largest (rows × the longest prompt + max_new_tokens, padding
included) plus one layer of re-pack copy; a request's own prefill cache fits in its future
row, the join frees it layer by layer. A CUDA out-of-memory rolls the step back, frees cached
history and retries; a request that still cannot fit fails alone (`out_of_memory`).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from agent.inference import encoder, memory, prompts
from agent.inference.base import GenerationRequest, GenerationStats, InferenceError
from agent.inference.batch import KV, Batch, crop
from agent.inference.models import LoadedModel
from agent.inference.prompts import Answer, Detokenizer, Prompt, RequestError, build_prompt, lcp, splice_answers
from agent.model.qwen2_audio import EOS_TOKENS

__all__ = ["Detokenizer", "Engine", "Output", "RequestError"]

log = logging.getLogger(__name__)

OOM = torch.OutOfMemoryError


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
class _SessionCache:
    ids: list[int]  # exactly the tokens the KV covers
    spans: list[tuple[int, int, str]]
    kv: KV
    answers: list[Answer] = field(default_factory=list)  # generated ids within `ids`, with their text's ids


@dataclass(eq=False)  # identity: requests are found in queues by `in`/`remove`
class _Seq:
    rid: str
    req: GenerationRequest
    detok: Detokenizer
    t_submit: float
    stats: GenerationStats = field(default_factory=GenerationStats)
    prompt: Prompt | None = None
    generated: list[int] = field(default_factory=list)
    kv: KV | None = None  # own cache after the prefill, until it joins the batch (or is held)
    t_first: float | None = None
    min_new_tokens: int = 0
    answers: list[Answer] = field(default_factory=list)  # earlier answers spliced into `prompt`
    # chunked prefill, from admission to the first token
    t_admit: float = 0.0
    reuse: _SessionCache | None = None  # the session's history taken at admission
    past: int = 0  # tokens in `cache`
    cache: Any = None  # DynamicCache being filled
    embeds: torch.Tensor | None = None  # inputs of the whole new suffix [1, n, hidden]
    done: int = 0  # rows of `embeds` prefilled

    @property
    def key(self) -> tuple[str, str]:
        return self.req.session_id, self.req.turn_id

    def final_tokens(self) -> int:
        """The most KV this request can reach: its prompt plus every token it may generate."""
        assert self.prompt is not None
        return len(self.prompt.ids) + (0 if self.req.speculative else self.req.max_new_tokens)


class Engine:
    def __init__(self, loaded: LoadedModel, max_batch: int = 16, kv_budget_tokens: int | None = None,
                 gpu_memory_utilization: float = 0.9, prefill_chunk_tokens: int = 512,
                 encoder_padded: bool = False, feature_cache_bytes: int = 32 * 1024**2,
                 memory_info: tuple[int, int] | None = None) -> None:
        """`memory_info` (free, total bytes) replaces the device's own figures (tests)."""
        self.model = loaded.model
        self.processor = loaded.processor
        self.tokenizer = loaded.processor.tokenizer
        self._segments = prompts.SegmentTokenizer(self.tokenizer)  # history's prompt pieces memoised
        self.device = torch.device(loaded.device)
        self.max_batch = max_batch
        self.prefill_chunk_tokens = max(1, prefill_chunk_tokens)
        self.encoder_padded = encoder_padded
        self.audio_token_id = int(self.processor.audio_token_id)
        self.eos_ids = {int(self.tokenizer.convert_tokens_to_ids(t)) for t in EOS_TOKENS} - {self.tokenizer.unk_token_id}
        self._lm = self.model.model.language_model
        self._embed = self._lm.get_input_embeddings()
        # transformers 5.x renamed `past_key_values` to `cache` (older 5.x releases lack it).
        params = inspect.signature(self._lm.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        text_config = self.model.config.text_config
        self.layers = int(text_config.num_hidden_layers)
        per_token = memory.bytes_per_token(text_config, torch.finfo(self.model.dtype).bits // 8)
        reserve = 0
        if self.device.type == "cuda" and memory_info is None:
            reserve = memory.profile_step(self.model, self.processor.feature_extractor, self._lm, self._cache_kw,
                                          self.prefill_chunk_tokens, self.device)
        free, total = memory_info or memory.device_memory(str(loaded.device))
        self.budget = memory.plan(per_token=per_token, device=str(loaded.device), free=free, total=total,
                                  utilization=gpu_memory_utilization, reserve=reserve, tokens=kv_budget_tokens)
        self._pending: deque[_Seq] = deque()
        self._prefilling: list[_Seq] = []
        self._held: dict[str, _Seq] = {}  # speculative prefills waiting for their commit
        self._batch: list[_Seq] = []
        self._rows = Batch(self.device, self.layers)  # the KV cache of `_batch`
        self._sessions: OrderedDict[str, _SessionCache] = OrderedDict()  # LRU order
        self._features = encoder.FeatureCache(self.processor.feature_extractor, encoder_padded, feature_cache_bytes)
        self._outbox: list[Output] = []
        self.oom_events = 0

    # ---- public API -------------------------------------------------------------------

    @property
    def kv_budget_tokens(self) -> int:
        return self.budget.tokens

    @property
    def running(self) -> int:
        return len(self._batch)

    @property
    def pending(self) -> int:
        return len(self._pending) + len(self._prefilling)

    @property
    def held(self) -> int:
        return len(self._held)

    @property
    def cached_tokens(self) -> int:
        return sum(len(c.ids) for c in self._sessions.values())

    @property
    def has_work(self) -> bool:
        return bool(self._pending or self._prefilling or self._batch or self._outbox)

    def info(self) -> dict[str, Any]:
        return {"kv_budget_tokens": self.budget.tokens, "kv_budget_bytes": self.budget.bytes,
                "kv_bytes_per_token": self.budget.bytes_per_token, "device": self.budget.device}

    def kv_projected(self, extra: _Seq | None = None) -> int:
        """KV tokens the engine may hold at once with what it has admitted (+ `extra`)."""
        admitted = self._prefilling + ([extra] if extra is not None else [])
        total = self.cached_tokens + sum(len(s.prompt.ids) for s in self._held.values() if s.prompt)
        total += sum(len(s.prompt.ids) for s in admitted if s.prompt and s.req.speculative)
        rows = self._batch + [s for s in admitted if not s.req.speculative]
        if rows:
            widest = len(rows) * max(s.final_tokens() for s in rows)
            total += widest + -(-widest // self.layers)  # + one layer of re-pack copy
        return total

    def submit(self, request_id: str, request: GenerationRequest) -> None:
        seq = _Seq(request_id, request, Detokenizer(self.tokenizer), time.perf_counter())
        seq.min_new_tokens = int(request.extra.get("min_new_tokens", 0))
        if request.speculative:  # at most one per session: the newer replaces the older
            self._drop_speculative(lambda s: s.req.session_id == request.session_id)
        self._pending.append(seq)

    def cancel(self, request_id: str) -> None:
        """Drop a request wherever it is; a running one leaves the batch right now."""
        for seq in [s for s in (*self._pending, *self._prefilling) if s.rid == request_id]:
            self._discard(seq)
            self._outbox.append(self._error(seq, "cancelled", "request cancelled"))
        for i, seq in enumerate(self._batch):
            if seq.rid == request_id:
                self._save_session(seq, i)
                self._remove([i])
                self._trim_sessions()
                self._outbox.append(self._error(seq, "cancelled", "request cancelled"))
                break
        self._held.pop(request_id, None)

    def drop(self, request_id: str) -> None:
        """Discard a speculative prefill (held, queued or prefilling)."""
        self._drop_speculative(lambda s: s.rid == request_id)

    def drop_turn(self, session_id: str, turn_id: str) -> None:
        self._drop_speculative(lambda s: s.key == (session_id, turn_id))

    def forget(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)
        self._drop_speculative(lambda s: s.req.session_id == session_id)

    @torch.inference_mode()
    def step(self) -> list[Output]:
        out, self._outbox = self._outbox, []
        joining: list[_Seq] = []
        self._admit(out, joining)
        self._prefill_chunks(out, joining)
        if joining:
            self._join_guarded(joining, out)
        if self._batch:
            try:
                self._decode_guarded(out)
            except Exception as exc:
                for seq in self._batch:
                    out.append(self._error(seq, "inference_failed", f"{type(exc).__name__}: {exc}"))
                self._batch = []
                self._rows.clear()
        return out

    def build_prompt(self, request: GenerationRequest) -> Prompt:
        return build_prompt(self._segments, self.audio_token_id, request)

    # ---- admission ----------------------------------------------------------------------

    def _admit(self, out: list[Output], joining: list[_Seq]) -> None:
        """Queued requests become prefilling ones, in order, while slots and memory allow."""
        while self._pending:
            seq = self._pending[0]
            slots = len(self._batch) + len(joining) + sum(not s.req.speculative for s in self._prefilling)
            if not seq.req.speculative and slots >= self.max_batch:
                return
            try:
                if seq.prompt is None:
                    seq.prompt, seq.answers = splice_answers(self.build_prompt(seq.req),
                                                             self._answers_of(seq.req.session_id))
                    seq.stats.prompt_tokens = len(seq.prompt.ids)
                    if seq.req.max_new_tokens < 1:
                        raise RequestError("max_new_tokens must be at least 1")
            except RequestError as exc:
                self._pending.popleft()
                out.append(self._error(seq, exc.code, str(exc)))
                continue
            if not seq.req.speculative and self._adopt_speculative(seq, out, joining):
                self._pending.popleft()
                continue
            if not self._make_room(seq):
                if self._batch or self._prefilling or joining:
                    return  # wait for running requests to finish and free theirs
                self._pending.popleft()
                out.append(self._error(seq, "out_of_memory", (
                    f"the request needs {seq.final_tokens()} tokens of KV cache; the budget is "
                    f"{self.budget.tokens} ({self.budget.describe()})")))
                continue
            self._pending.popleft()
            seq.t_admit = time.perf_counter()
            seq.stats.timings["queue"] = seq.t_admit - seq.t_submit
            seq.reuse, seq.past = self._take_history(seq)
            seq.stats.reused_tokens = seq.past
            self._prefilling.append(seq)

    def _adopt_speculative(self, seq: _Seq, out: list[Output], joining: list[_Seq]) -> bool:
        """The committed turn continues its own speculative prefill when the prompts match
        (held: first token ready; still prefilling: takes over its progress). Any other
        speculation of the session is stale now."""
        assert seq.prompt is not None
        for rid, held in list(self._held.items()):
            if held.req.session_id != seq.req.session_id:
                continue
            del self._held[rid]
            if held.key == seq.key and held.prompt is not None and held.prompt.ids == seq.prompt.ids \
                    and held.prompt.spans == seq.prompt.spans and held.kv is not None:
                seq.t_admit = time.perf_counter()
                seq.stats.timings["queue"] = seq.t_admit - seq.t_submit
                seq.stats.reused_tokens = len(seq.prompt.ids)
                seq.stats.timings["speculative_prefill"] = held.stats.timings.get("prefill", 0.0)
                seq.kv = held.kv
                self._ready(seq, held.generated[0], out, joining)
                return True
        for i, spec in enumerate(self._prefilling):
            if spec.req.speculative and spec.req.session_id == seq.req.session_id:
                if spec.key == seq.key and spec.prompt is not None and spec.prompt.ids == seq.prompt.ids \
                        and spec.prompt.spans == seq.prompt.spans:
                    for name in ("t_admit", "reuse", "past", "cache", "embeds", "done"):
                        setattr(seq, name, getattr(spec, name))
                    seq.stats.timings["queue"] = seq.t_admit - seq.t_submit
                    seq.stats.reused_tokens = spec.stats.reused_tokens
                    self._prefilling[i] = seq
                    return True
                self._discard(spec)
                break
        self._drop_speculative(lambda s: s.req.session_id == seq.req.session_id and s in self._pending)
        return False

    def _answers_of(self, session_id: str) -> list[Answer]:
        """The session's earlier answers as generated: from its cached history, else from a
        speculative prefill of it that took that history."""
        entry = self._sessions.get(session_id)
        if entry is not None:
            return entry.answers
        for seq in (*self._held.values(), *self._prefilling):
            if seq.req.session_id == session_id:
                return seq.answers
        return []

    def _make_room(self, seq: _Seq) -> bool:
        """Fit `seq` in the KV budget, evicting other sessions' history (LRU) and then held
        speculative prefills (oldest first) as needed."""
        budget = self.budget.tokens
        own = seq.req.session_id
        while self.kv_projected(seq) > budget:
            victim = next((sid for sid in self._sessions if sid != own), None)
            if victim is not None:
                del self._sessions[victim]
                continue
            held = next((rid for rid, h in self._held.items() if h.key != seq.key), None)
            if held is not None:
                del self._held[held]
                continue
            if own in self._sessions:  # its own history too, as a last resort
                del self._sessions[own]
                continue
            return False
        return True

    def _take_history(self, seq: _Seq) -> tuple[_SessionCache | None, int]:
        """The session's cached KV, taken out of the LRU: the longest prefix of the prompt it
        covers that does not cut through an audio span (or change an audio)."""
        prompt = seq.prompt
        assert prompt is not None
        entry = self._sessions.pop(seq.req.session_id, None)
        if entry is None:
            return None, 0
        n = min(lcp(entry.ids, prompt.ids), len(prompt.ids) - 1)  # keep ≥1 token for logits
        cached = set(entry.spans)
        for span in prompt.spans:
            start, end, _ = span
            if start >= n:
                break
            if end > n or span not in cached:
                n = start
                break
        return (entry, n) if n > 0 else (None, 0)

    # ---- prefill ------------------------------------------------------------------------

    def _prefill_chunks(self, out: list[Output], joining: list[_Seq]) -> None:
        """At most `prefill_chunk_tokens` of prefill work this step, oldest request first."""
        budget = self.prefill_chunk_tokens
        while budget > 0 and self._prefilling:
            seq = self._prefilling[0]
            try:
                if seq.embeds is None:
                    budget -= self._with_oom_retry(partial(self._start_prefill, seq), _nothing)
                    continue
                n = min(budget, seq.embeds.shape[1] - seq.done)
                hidden = self._with_oom_retry(partial(self._chunk, seq, n), partial(crop, seq.cache, seq.past))
                budget -= n
                if seq.done < seq.embeds.shape[1]:
                    continue
                logits = self._suppress_eos(self.model.lm_head(hidden), [seq])
                self._prefilling.pop(0)
                seq.kv = [(layer.keys, layer.values) for layer in seq.cache.layers]
                seq.cache = seq.embeds = None
                self._ready(seq, int(logits.argmax(-1)[0]), out, joining)
            except (RequestError, OOM, Exception) as exc:  # a broken request never takes the engine down
                self._discard(seq)
                if isinstance(exc, RequestError):
                    out.append(self._error(seq, exc.code, str(exc)))
                elif isinstance(exc, OOM):
                    out.append(self._error(seq, "out_of_memory", f"out of device memory in its prefill: {exc}"))
                else:
                    out.append(self._error(seq, "inference_failed", f"{type(exc).__name__}: {exc}"))

    def _start_prefill(self, seq: _Seq) -> int:
        """Embed the new suffix (text + audio through the encoder); returns the encoder work
        in audio tokens, charged to this step's prefill budget."""
        from transformers import DynamicCache

        prompt = seq.prompt
        assert prompt is not None
        past = seq.past
        if seq.reuse is not None:
            seq.cache = DynamicCache(ddp_cache_data=[(k[:, :, :past], v[:, :, :past]) for k, v in seq.reuse.kv])
        else:
            seq.cache = DynamicCache()
        ids = torch.tensor([prompt.ids[past:]], device=self.device)
        embeds = self._embed(ids)
        new = [(a, span) for a, span in zip(prompt.audios, prompt.spans, strict=True) if span[0] >= past]
        if new:
            t0 = time.perf_counter()
            feats = [self._features.get(a, span[2]) for a, span in new]
            clips = encoder.encode(self.model, [f for f, _ in feats], [v for _, v in feats], self.encoder_padded)
            audio = torch.cat(clips).to(embeds.dtype)
            # the spans, not the ids: a spliced answer may hold a generated <|AUDIO|> token,
            # which was fed as a token then and stays one
            where = torch.zeros(1, ids.shape[1], 1, dtype=torch.bool, device=self.device)
            for _, (start, end, _) in new:
                where[0, start - past:end - past] = True
            if int(where.sum()) != audio.shape[0]:
                raise RequestError(f"{int(where.sum())} audio tokens but {audio.shape[0]} audio embeddings")
            embeds = embeds.masked_scatter(where, audio)
            seq.stats.timings["encoder"] = time.perf_counter() - t0
        seq.embeds, seq.done = embeds, 0
        return sum(span[1] - span[0] for _, span in new)

    def _chunk(self, seq: _Seq, n: int) -> torch.Tensor:
        """Prefill the next `n` tokens of `seq` on its own cache; the last position's hidden state."""
        assert seq.embeds is not None
        total = seq.past + n
        res = self._lm(inputs_embeds=seq.embeds[:, seq.done:seq.done + n],
                       attention_mask=torch.ones(1, total, dtype=torch.long, device=self.device),
                       position_ids=torch.arange(seq.past, total, device=self.device)[None],
                       use_cache=True, **{self._cache_kw: seq.cache})
        seq.past, seq.done = total, seq.done + n
        seq.reuse = None  # the cache now owns copies of the history it needed
        return res.last_hidden_state[:, -1]

    def _ready(self, seq: _Seq, first: int, out: list[Output], joining: list[_Seq]) -> None:
        """The prefill is done and gave `first`: hold it, finish it, or let it join."""
        t1 = time.perf_counter()
        seq.stats.timings["prefill"] = t1 - seq.t_admit
        seq.generated = [first]
        if seq.req.speculative:  # hold: no decoding until the final request commits
            self._held[seq.rid] = seq
            seq.stats.timings["total"] = t1 - seq.t_submit
            out.append(Output(seq.rid, "", True, seq.stats))
            return
        seq.t_first = t1
        seq.stats.timings["ttft"] = t1 - seq.t_submit
        if self._finished(seq, first):
            out.append(self._finish(seq, first))
            out[-1].cached = self._save_session(seq, None)
            self._trim_sessions()
            return
        out.append(Output(seq.rid, seq.detok.push(first), token_ids=[first]))
        joining.append(seq)

    def _discard(self, seq: _Seq) -> None:
        """Take a queued or prefilling request out; its session keeps its history."""
        if seq in self._pending:
            self._pending.remove(seq)
        if seq in self._prefilling:
            self._prefilling.remove(seq)
        if seq.reuse is not None and seq.req.session_id not in self._sessions:
            self._sessions[seq.req.session_id] = seq.reuse
        seq.reuse = seq.cache = seq.embeds = seq.kv = None

    def _drop_speculative(self, match: Callable[[_Seq], bool]) -> None:
        for rid, seq in list(self._held.items()):
            if match(seq):
                del self._held[rid]
        for seq in [s for s in (*self._pending, *self._prefilling) if s.req.speculative and match(s)]:
            self._discard(seq)

    # ---- out of memory ------------------------------------------------------------------

    def _with_oom_retry(self, run: Callable[[], Any], rollback: Callable[[], None]) -> Any:
        """Run; on out-of-memory roll back, free cached history and retry while anything
        can be freed. The last OOM propagates: the caller fails only its own request."""
        while True:
            try:
                return run()
            except OOM:
                rollback()
                self.oom_events += 1
                if not self._relieve():
                    raise

    def _relieve(self) -> bool:
        """Free the LRU half of the session caches, else all held prefills; False: nothing left."""
        freed = False
        if self._sessions:
            for _ in range(max(1, len(self._sessions) // 2)):
                self._sessions.popitem(last=False)
            freed = True
        elif self._held:
            self._held.clear()
            freed = True
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.warning("out of memory: freed cached history (%s)", "retrying" if freed else "nothing left to free")
        return freed

    def _join_guarded(self, seqs: list[_Seq], out: list[Output]) -> None:
        try:
            self._with_oom_retry(partial(self._rows.join, [s.kv for s in seqs if s.kv is not None]), _nothing)
            for s in seqs:
                s.kv = None
            self._batch.extend(seqs)
        except OOM as exc:
            for seq in seqs:
                seq.kv = None
                out.append(self._error(seq, "out_of_memory", f"out of device memory joining the batch: {exc}"))

    def _decode_guarded(self, out: list[Output]) -> None:
        while self._batch:
            width = self._rows.width
            try:
                self._with_oom_retry(partial(self._decode, out), partial(crop, self._rows.cache, width))
                return
            except OOM as exc:  # nothing left to free: the newest request fails alone
                i = max(range(len(self._batch)), key=lambda j: self._batch[j].t_admit)
                seq = self._batch[i]
                self._remove([i])
                out.append(self._error(seq, "out_of_memory", f"out of device memory while decoding: {exc}"))

    # ---- batched decode -----------------------------------------------------------------

    def _remove(self, rows: list[int]) -> None:
        """Rows leave the batch now (their slots are free before the next step)."""
        keep = [i for i in range(len(self._batch)) if i not in set(rows)]
        self._batch = [self._batch[i] for i in keep]
        self._rows.keep(keep)

    def _decode(self, out: list[Output]) -> None:
        rows = self._rows
        assert rows.mask is not None and rows.pos is not None
        b = len(self._batch)
        ids = torch.tensor([[s.generated[-1]] for s in self._batch], device=self.device)
        mask = torch.cat([rows.mask, torch.ones(b, 1, dtype=torch.long, device=self.device)], dim=1)
        res = self._lm(inputs_embeds=self._embed(ids), attention_mask=mask, position_ids=rows.pos[:, None],
                       use_cache=True, **{self._cache_kw: rows.cache})
        logits = self._suppress_eos(self.model.lm_head(res.last_hidden_state[:, -1]), self._batch)
        tokens = logits.argmax(-1).tolist()
        rows.mask, rows.pos = mask, rows.pos + 1
        done: list[int] = []
        for i, (seq, token) in enumerate(zip(self._batch, tokens, strict=True)):
            seq.generated.append(int(token))
            if self._finished(seq, token):
                out.append(self._finish(seq, token))  # first: the answer's text is complete
                out[-1].cached = self._save_session(seq, i)
                done.append(i)
            else:
                out.append(Output(seq.rid, seq.detok.push(token), token_ids=[token]))
        if done:
            self._remove(done)
            self._trim_sessions()

    def _suppress_eos(self, logits: torch.Tensor, seqs: list[_Seq]) -> torch.Tensor:
        """`min_new_tokens` as generate does it: EOS cannot win before that many tokens."""
        rows = [i for i, s in enumerate(seqs) if len(s.generated) < s.min_new_tokens]
        if rows:
            logits[torch.tensor(rows)[:, None], torch.tensor(sorted(self.eos_ids))[None]] = float("-inf")
        return logits

    def _finished(self, seq: _Seq, token: int) -> bool:
        return len(seq.generated) >= seq.req.max_new_tokens or token in self.eos_ids

    def _finish(self, seq: _Seq, token: int) -> Output:
        text = "" if token in self.eos_ids else seq.detok.push(token)
        text += seq.detok.flush()
        seq.stats.tokens = len(seq.generated)
        seq.stats.timings["total"] = time.perf_counter() - seq.t_submit
        return Output(seq.rid, text, True, seq.stats, token_ids=[token])

    def _error(self, seq: _Seq, code: str, message: str) -> Output:
        seq.stats.tokens = len(seq.generated)
        seq.stats.timings["total"] = time.perf_counter() - seq.t_submit
        return Output(seq.rid, "", True, seq.stats, error=(code, message))

    # ---- session caches -----------------------------------------------------------------

    def _save_session(self, seq: _Seq, row: int | None) -> list[str] | None:
        """Keep the KV of prompt + generated tokens (all but the last, never fed) for the
        session's next turn, LRU-evicting other sessions while over the KV budget."""
        if seq.prompt is None:
            return None
        kv = seq.kv if row is None else self._rows.row_kv(row)
        if kv is None:
            return None
        ids = seq.prompt.ids + seq.generated[:-1]
        ids = ids[:kv[0][0].shape[2]]
        answers = list(seq.answers)
        content = seq.generated[:-1] if seq.generated and seq.generated[-1] in self.eos_ids else seq.generated
        if content:  # the next prompt holds it as text: remember which ids it came from
            text_ids = self.tokenizer(seq.detok.text, add_special_tokens=False)["input_ids"]
            answers.append((len(seq.prompt.ids), list(content), text_ids))
        sid = seq.req.session_id
        self._sessions.pop(sid, None)
        self._sessions[sid] = _SessionCache(ids, seq.prompt.spans, kv, answers)
        return [h for _, end, h in seq.prompt.spans if end <= len(ids)]

    def _trim_sessions(self) -> None:
        """LRU-evict session histories while over the KV budget (the newest last)."""
        while self._sessions and self.kv_projected() > self.budget.tokens:
            self._sessions.popitem(last=False)


def _nothing() -> None:
    pass
