"""A synchronous continuous-batching engine over one loaded Qwen2-Audio model.

Pure and single-threaded: a worker process drives it with `submit` / `cancel` / `promote` /
`step`. Each `step` (1) admits queued requests by priority, committed, then preemptive answers,
then speculative prefills, while batch slots and the KV budget allow (only committed work
evicts other sessions' history or speculative prefills, or parks a preemptive answer); (2) runs at
most `prefill_chunk_tokens` of prefill (encoder included) by priority, the chunks of several
requests in one forward; (3) runs ONE batched greedy decode step.

All KV in flight lives in one preallocated store (`batch.KVStore`, rows in `rows.Rows`); a step
writes only its new tokens. A session's history is copied out when its answer ends and into a
new row at its next turn; speculative and preemptive work only read it, so it stays cached
until a committed request takes it. KV accounting (`kv_projected`): session histories,
speculative prefills waiting for their commit, parked answers, and the store at the shape it grows to for every admitted request
(prompt + max_new_tokens) plus one layer of growth copy. Out of memory: a step commits nothing
before its allocations succeeded, so it is retried as is after freeing cached history; a
request that still cannot fit fails alone (`out_of_memory`).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from agent.inference import encoder, families, memory, prefill, prompts
from agent.inference.admission import Admission
from agent.inference.base import GenerationRequest
from agent.inference.batch import KV, KVStore
from agent.inference.models import LoadedModel
from agent.inference.prompts import Detokenizer, Prompt, RequestError, build_prompt
from agent.inference.rows import Rows
from agent.inference.sequence import COMMITTED, PREEMPTIVE, Output, Seq, SessionCache, error, reusable, session_cache

__all__ = ["Detokenizer", "Engine", "Output", "RequestError"]

log = logging.getLogger(__name__)

OOM = torch.OutOfMemoryError


class Engine(Admission):
    def __init__(self, loaded: LoadedModel, max_batch: int = 16, kv_budget_tokens: int | None = None,
                 gpu_memory_utilization: float = 0.9, prefill_chunk_tokens: int = 512,
                 encoder_padded: bool = False, feature_cache_bytes: int = 32 * 1024**2,
                 memory_info: tuple[int, int] | None = None, memory_share: int = 1) -> None:
        """`memory_info` (free, total bytes) replaces the device's own figures (tests);
        `memory_share`: workers sharing this device, each planning its part of it."""
        self.model = loaded.model
        self.processor = loaded.processor
        self.tokenizer = loaded.processor.tokenizer
        self.family = loaded.family  # the model's format: template, audio tokens, encoder kind
        self._segments = prompts.SegmentTokenizer(self.tokenizer, special_re=self.family.special_re)  # history's pieces memoised
        self.device = torch.device(loaded.device)
        self.max_batch = max_batch
        self.prefill_chunk_tokens = max(1, prefill_chunk_tokens)
        self.encoder_padded = encoder_padded or self.family.encoder == "padded-30s"
        self.audio_token_id = int(self.processor.audio_token_id)
        self.eos_ids = {int(self.tokenizer.convert_tokens_to_ids(t)) for t in self.family.eos_tokens} - {self.tokenizer.unk_token_id}
        self._eos = torch.tensor(sorted(self.eos_ids), device=self.device)
        self._kept = prompts.kept_specials(self.tokenizer, self.family)  # decoded, not skipped: [TOOL_CALLS]
        self._lm = families.text_model(self.model)
        self._embed = self._lm.get_input_embeddings()
        # transformers 5.x renamed `past_key_values` to `cache` (older 5.x releases lack it).
        params = inspect.signature(self._lm.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        cfg = self.model.config.text_config
        if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or []):
            raise ValueError("the engine's KV store supports full-attention layers only (no sliding window)")
        self.layers = int(cfg.num_hidden_layers)
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self._store = KVStore(self.device, self.layers, kv_heads, head_dim, self.model.dtype)
        per_token = memory.bytes_per_token(cfg, torch.finfo(self.model.dtype).bits // 8)
        reserve = 0
        if self.device.type == "cuda" and memory_info is None:
            reserve = memory.profile_step(self.model, self.processor.feature_extractor, self._lm, self._cache_kw,
                                          self.prefill_chunk_tokens, self.device)
        free, total = memory_info or memory.device_memory(str(loaded.device))
        own = torch.cuda.memory_reserved(self.device) if self.device.type == "cuda" and memory_info is None else None
        self.budget = memory.plan(per_token=per_token, device=str(loaded.device), free=free, total=total,
                                  utilization=gpu_memory_utilization, reserve=reserve, tokens=kv_budget_tokens,
                                  share=memory_share, own=own)
        self._queue: list[Seq] = []  # submitted, not admitted (and parked preemptive answers)
        self._prefilling: list[Seq] = []  # admitted, in priority order
        self._rows = Rows(self._store)  # the store's rows: decoding ones first
        self._prefilled: dict[str, Seq] = {}  # speculative prefills done, waiting for their commit
        self._sessions: OrderedDict[str, SessionCache] = OrderedDict()  # LRU order
        self._features = encoder.FeatureCache(self.processor.feature_extractor, self.encoder_padded, feature_cache_bytes)
        self._outbox: list[Output] = []
        self.oom_events = 0

    # ---- public API -------------------------------------------------------------------

    @property
    def kv_budget_tokens(self) -> int:
        return self.budget.tokens

    @property
    def running(self) -> int:
        return self._rows.decoding

    @property
    def cached_tokens(self) -> int:
        return sum(len(c.ids) for c in self._sessions.values())

    @property
    def has_work(self) -> bool:
        return bool(self._queue or self._prefilling or self._rows.decoding or self._outbox)

    def stats(self) -> dict[str, int]:
        """What the worker reports after each step: KV in use and reserved (`kv_tokens`), held
        as session histories (`cached_tokens`), requests decoding (`running`), waiting or
        prefilling (`pending`), speculative prefills done and waiting for their commit
        (`prefilled`), out-of-memory events so far."""
        return {"kv_tokens": self.kv_projected(), "cached_tokens": self.cached_tokens, "oom_events": self.oom_events,
                "running": self.running, "pending": len(self._queue) + len(self._prefilling),
                "prefilled": len(self._prefilled)}

    def info(self) -> dict[str, Any]:
        return {"kv_budget_tokens": self.budget.tokens, "kv_budget_bytes": self.budget.bytes,
                "kv_bytes_per_token": self.budget.bytes_per_token, "device": self.budget.device}

    def _own_tokens(self) -> int:
        """Speculative prefills and parked answers: caches outside the store and the session LRU."""
        return sum(s.own_tokens() for s in self._prefilled.values()) + sum(s.own_tokens() for s in self._queue)

    def _store_plan(self, extra: Seq | None = None) -> tuple[tuple[int, int], int]:
        """The store's shape once every admitted request (+ `extra`) has its row, and the
        tokens that costs at its peak (its growth copies one layer at a time)."""
        rows = self._rows.seqs + [s for s in self._prefilling if s.row is None] + ([extra] if extra is not None else [])
        have = self._store.shape
        if not rows:
            return have, self._store.allocated_tokens
        limit = self.budget.tokens - self.cached_tokens - self._own_tokens()
        shape = KVStore.plan(have, len(rows), max(s.final_tokens() for s in rows), limit)
        tokens = shape[0] * shape[1]
        return shape, tokens + (-(-tokens // self.layers) if shape != have else 0)

    def _fit_store(self) -> None:
        """Over budget: first give back store capacity that no admitted request needs (it only
        grows: a long prompt widens every row, and an empty store keeps its capacity for the
        next turn). An empty store is given back whole: that frees memory and copies nothing."""
        rows = self._rows.seqs + [s for s in self._prefilling if s.row is None]
        if not self._rows.seqs:
            self._store.clear()
            return
        need = (len(rows), max(max(s.final_tokens() for s in rows), *self._store.lengths))
        have = self._store.shape
        if have[0] * have[1] >= 2 * need[0] * need[1]:  # not for a little: growth would follow
            try:
                self._store.shrink(*need)
            except OOM:
                pass

    def kv_projected(self, extra: Seq | None = None) -> int:
        """KV tokens the engine may hold at once with what it has admitted (+ `extra`)."""
        return self.cached_tokens + self._own_tokens() + self._store_plan(extra)[1]

    @torch.inference_mode()
    def submit(self, request_id: str, request: GenerationRequest) -> None:
        seq = Seq(request_id, request, Detokenizer(self.tokenizer, self._kept), time.perf_counter())
        seq.min_new_tokens = int(request.extra.get("min_new_tokens", 0))
        sid = request.session_id
        if request.speculative:  # at most one per session: the newer replaces the older
            self._drop_speculative(lambda s: s.req.session_id == sid)
        elif request.preemptive:  # likewise for preemptive answers not yet promoted
            for old in [s for s in self._everywhere() if s.rank == PREEMPTIVE and s.req.session_id == sid]:
                self._fail(old, "cancelled", "replaced by a newer preemptive answer of the session")
        self._queue.append(seq)

    @torch.inference_mode()
    def cancel(self, request_id: str) -> None:
        """Drop a request wherever it is; a running one leaves the batch right now."""
        for seq in [s for s in self._everywhere() if s.rid == request_id]:
            self._fail(seq, "cancelled", "request cancelled")
        self._prefilled.pop(request_id, None)

    @torch.inference_mode()
    def promote(self, session_id: str, turn_id: str) -> None:
        """The turn of a preemptive answer committed: it runs as committed work from now on."""
        for seq in self._everywhere():
            if seq.req.preemptive and seq.key == (session_id, turn_id):
                seq.promoted = True
        self._prefilling.sort(key=lambda s: s.rank)  # stable: oldest first within a priority

    @torch.inference_mode()
    def drop_turn(self, session_id: str, turn_id: str) -> None:
        """Discard the turn's speculative prefill (done, queued or prefilling)."""
        self._drop_speculative(lambda s: s.key == (session_id, turn_id))

    @torch.inference_mode()
    def forget(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)
        self._drop_speculative(lambda s: s.req.session_id == session_id)

    @torch.inference_mode()
    def step(self) -> list[Output]:
        out, self._outbox = self._outbox, []
        self._admit(out)
        self._prefill(out)
        if self._rows.decoding:
            try:
                self._decode_guarded(out)
            except Exception as exc:  # a bug, not memory: fail the batch, keep the engine
                log.exception("decode step failed")
                while self._rows.decoding:
                    seq = self._rows.seqs[0]
                    self._rows.drop(seq)
                    out.append(error(seq, "inference_failed", f"{type(exc).__name__}: {exc}", time.perf_counter()))
        return out

    def build_prompt(self, request: GenerationRequest) -> Prompt:
        return build_prompt(self._segments, self.audio_token_id, request, self.family)

    # ---- admission ----------------------------------------------------------------------

    def _everywhere(self) -> list[Seq]:
        return [*self._queue, *self._prefilling, *self._rows.running]

    def _history(self, seq: Seq) -> tuple[SessionCache | None, int]:
        """The session's cached KV and how much of the prompt it covers."""
        assert seq.prompt is not None
        entry = self._sessions.get(seq.req.session_id)
        n = 0 if entry is None else reusable(entry, seq.prompt)
        return (entry, n) if n > 0 else (None, 0)

    # ---- the store's rows ---------------------------------------------------------------

    def _row_add(self, seq: Seq, kv: KV | None, n: int) -> None:
        """A row for `seq`, holding `n` tokens of `kv`; the store grown for every admitted request."""
        shape, _ = self._store_plan(seq if seq.row is None and seq not in self._prefilling else None)
        self._rows.add(seq, kv, n, shape)

    def _grow(self) -> None:
        self._store.ensure(*self._store_plan()[0])

    def _row_copy(self, seq: Seq, n: int) -> KV:
        assert seq.row is not None
        return self._store.row_kv(seq.row, n)

    # ---- prefill ------------------------------------------------------------------------

    def _prefill(self, out: list[Output]) -> None:
        """At most `prefill_chunk_tokens` of prefill work this step, by priority; the chunks of
        several requests go through one forward when padding them wastes little."""
        budget = full = self.prefill_chunk_tokens
        chunks: list[tuple[Seq, int]] = []
        for seq in list(self._prefilling):
            if budget <= 0:
                break
            try:
                if not seq.started:
                    self._with_oom_retry(partial(self._start_prefill, seq))
                budget -= self._with_oom_retry(partial(self._encode_audio, seq, budget, budget == full))
            except Exception as exc:
                self._fail_prefill(seq, exc, out)
                continue
            assert seq.embeds is not None
            ready = seq.todo[0][1][0] - seq.base if seq.todo else seq.embeds.shape[1]  # audio not encoded yet
            n = min(budget, ready - seq.done)
            if n > 0:
                chunks.append((seq, n))
                budget -= n
        if not chunks:
            return
        groups: list[list[tuple[Seq, int]]] = [[]]
        for chunk in chunks:
            group = groups[-1]
            if group and (len(group) + 1) * max(chunk[1], *(n for _, n in group)) > self.prefill_chunk_tokens:
                groups.append([])
            groups[-1].append(chunk)
        for group in groups:
            self._prefill_group(group, out)

    def _prefill_group(self, group: list[tuple[Seq, int]], out: list[Output]) -> None:
        self._rows.place([seq for seq, _ in group])  # one view of the store
        try:
            firsts = self._with_oom_retry(lambda: self._forward_prefill(group))
        except OOM as exc:
            if len(group) > 1:  # alone, each may still fit
                for chunk in group:
                    self._prefill_group([chunk], out)
                return
            self._fail_prefill(group[0][0], exc, out)
            return
        except Exception as exc:
            for seq, _ in group:
                self._fail_prefill(seq, exc, out)
            return
        for (seq, n), first in zip(group, firsts, strict=True):  # commit
            self._store.lengths[seq.row] += n  # type: ignore[index]
            seq.past, seq.done = seq.past + n, seq.done + n
            if first is not None:
                self._prefilling.remove(seq)
                seq.embeds, seq.reuse, seq.took = None, None, False  # the row holds the history now
                self._ready(seq, first, out)

    def _start_prefill(self, seq: Seq) -> None:
        """Its row, with the session's history copied in, and the new suffix's text embedded;
        its audio is encoded as the chunks reach it. A committed request takes the history
        out of the LRU; others only read it."""
        prompt = seq.prompt
        assert prompt is not None
        reuse, past = self._history(seq)
        embeds = self._embed(torch.tensor([prompt.ids[past:]], device=self.device))
        seq.todo = [(a, span) for a, span in zip(prompt.audios, prompt.spans, strict=True) if span[0] >= past]
        self._row_add(seq, reuse.kv if reuse is not None else None, past)
        seq.embeds, seq.done, seq.past, seq.base = embeds, 0, past, past
        seq.stats.reused_tokens = past
        if reuse is not None and seq.rank == COMMITTED:
            seq.reuse, seq.took = self._sessions.pop(seq.req.session_id), True

    def _encode_audio(self, seq: Seq, budget: int, first: bool) -> int:
        return prefill.encode_audio(seq, self._features, self.model, self.encoder_padded, budget, first,
                                    self.family.encoder)

    def _forward_prefill(self, group: list[tuple[Seq, int]]) -> list[int | None]:
        """One forward over the group's chunks (rows contiguous from `_decoding`); the first
        token of each request whose prompt this completes. Writes only past the rows' lengths:
        nothing to undo if it fails."""
        start = group[0][0].row
        assert start is not None
        pasts, news = [s.past for s, _ in group], [n for _, n in group]
        writes, mask, pos = self._store.forward_args(start, pasts, news)
        res = self._lm(inputs_embeds=prefill.chunk_inputs(group), attention_mask=mask,
                       position_ids=pos, use_cache=True, **{self._cache_kw: writes})
        last = [i for i, (seq, n) in enumerate(group) if seq.done + n == seq.embeds.shape[1]]  # type: ignore[union-attr]
        firsts: list[int | None] = [None] * len(group)
        if last:
            hidden = res.last_hidden_state[torch.tensor(last), torch.tensor([news[i] - 1 for i in last])]
            logits = self._suppress_eos(self.model.lm_head(hidden), [group[i][0] for i in last])
            for i, token in zip(last, logits.argmax(-1).tolist(), strict=True):
                firsts[i] = int(token)
        return firsts

    def _ready(self, seq: Seq, first: int, out: list[Output]) -> None:
        """The prefill is done and gave `first`: keep it for its commit (speculative), finish
        it, or let it decode."""
        t1 = time.perf_counter()
        seq.stats.timings["prefill"] = t1 - seq.t_admit
        seq.generated = [first]
        if seq.req.speculative:  # no decoding until the final request commits
            try:
                seq.kv = self._store.row_kv(seq.row)  # type: ignore[arg-type]
                self._prefilled[seq.rid] = seq
            except OOM:
                pass  # not kept: the commit prefills again
            self._rows.drop(seq)
            seq.stats.timings["total"] = t1 - seq.t_submit
            out.append(Output(seq.rid, "", True, seq.stats))
            return
        seq.t_first = t1
        seq.stats.timings["ttft"] = t1 - seq.t_submit
        if self._finished(seq, first):
            out.append(self._finish(seq, first))
            out[-1].cached = self._save_session(seq, self._copy_row(seq, self._store.lengths[seq.row]))  # type: ignore[index]
            self._rows.drop(seq)
            self._trim_sessions()
            return
        try:  # room for its answer (a speculative row it took over had none)
            self._with_oom_retry(self._grow)
        except OOM as exc:
            self._fail(seq, "out_of_memory", f"out of device memory for its answer: {exc}", out)
            return
        out.append(Output(seq.rid, seq.detok.push(first), token_ids=[first]))
        self._rows.to_decoding(seq)

    def _fail_prefill(self, seq: Seq, exc: Exception, out: list[Output]) -> None:
        if isinstance(exc, RequestError):
            self._fail(seq, exc.code, str(exc), out)
        elif isinstance(exc, OOM):
            self._fail(seq, "out_of_memory", f"out of device memory in its prefill: {exc}", out)
        else:
            log.exception("prefill of %s failed", seq.rid)
            self._fail(seq, "inference_failed", f"{type(exc).__name__}: {exc}", out)

    def _fail(self, seq: Seq, code: str, message: str, out: list[Output] | None = None) -> None:
        """Take a request out wherever it is, with an error output. A decoding one leaves its
        history cached (as far as it got); a prefilling one puts back the history it took."""
        if seq.row is not None and seq.row < self._rows.decoding:
            self._save_session(seq, self._copy_row(seq, self._store.lengths[seq.row]))
            self._rows.drop(seq)
            self._trim_sessions()
        else:
            self._discard(seq)
        (self._outbox if out is None else out).append(error(seq, code, message, time.perf_counter()))

    def _discard(self, seq: Seq) -> None:
        """Take a queued or prefilling request out; its session keeps its history."""
        if seq in self._queue:
            self._queue.remove(seq)
        if seq in self._prefilling:
            self._prefilling.remove(seq)
        if seq.row is not None:
            self._rows.drop(seq)
        if seq.took and seq.reuse is not None and seq.req.session_id not in self._sessions:
            self._sessions[seq.req.session_id] = seq.reuse
        seq.clear()

    def _drop_speculative(self, match: Callable[[Seq], bool]) -> None:
        for rid, seq in list(self._prefilled.items()):
            if match(seq):
                del self._prefilled[rid]
        for seq in [s for s in (*self._queue, *self._prefilling) if s.req.speculative and match(s)]:
            self._discard(seq)

    # ---- out of memory ------------------------------------------------------------------

    def _with_oom_retry(self, run: Callable[[], Any]) -> Any:
        """Run; on out-of-memory free cached history and retry while anything can be freed.
        The last OOM propagates: the caller fails only its own request."""
        while True:
            try:
                return run()
            except OOM:
                self.oom_events += 1
                if not self._relieve():
                    raise

    def _relieve(self) -> bool:
        """Free the LRU half of the session caches, else all speculative prefills; False: nothing left."""
        freed = False
        if self._sessions:
            for _ in range(max(1, len(self._sessions) // 2)):
                self._sessions.popitem(last=False)
            freed = True
        elif self._prefilled:
            self._prefilled.clear()
            freed = True
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.warning("out of memory: freed cached history (%s)", "retrying" if freed else "nothing left to free")
        return freed

    def _decode_guarded(self, out: list[Output]) -> None:
        while self._rows.decoding:
            try:
                self._with_oom_retry(lambda: self._decode(out))
                return
            except OOM as exc:  # nothing left to free: the newest request fails alone
                seq = max(self._rows.running, key=lambda s: s.t_admit)
                self._fail(seq, "out_of_memory", f"out of device memory while decoding: {exc}", out)

    # ---- batched decode -----------------------------------------------------------------

    def _decode(self, out: list[Output]) -> None:
        """One token for every decoding row. Everything that allocates runs before anything
        is committed (lengths, tokens, outputs, rows leaving): an OOM retries it as is."""
        b = self._rows.decoding
        seqs = self._rows.seqs[:b]
        lengths = self._store.lengths[:b]
        ids = torch.tensor([[s.generated[-1]] for s in seqs], device=self.device)
        writes, mask, pos = self._store.forward_args(0, lengths, [1] * b)
        res = self._lm(inputs_embeds=self._embed(ids), attention_mask=mask, position_ids=pos,
                       use_cache=True, **{self._cache_kw: writes})
        logits = self._suppress_eos(self.model.lm_head(res.last_hidden_state[:, -1]), seqs)
        tokens = logits.argmax(-1).tolist()  # the step's one host sync
        done = [i for i, (s, t) in enumerate(zip(seqs, tokens, strict=True))
                if len(s.generated) + 1 >= s.req.max_new_tokens or t in self.eos_ids]
        kept = {i: self._copy_row(seqs[i], lengths[i] + 1) for i in done}  # their histories
        for i, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):  # commit: nothing allocates
            self._store.lengths[i] += 1
            seq.generated.append(int(token))
            if i in kept:
                out.append(self._finish(seq, token))  # first: the answer's text is complete
                out[-1].cached = self._save_session(seq, kept[i])
            else:
                out.append(Output(seq.rid, seq.detok.push(token), token_ids=[token]))
        for i in sorted(done, reverse=True):
            self._rows.drop(seqs[i])
        if done:
            self._trim_sessions()

    def _suppress_eos(self, logits: torch.Tensor, seqs: list[Seq]) -> torch.Tensor:
        """`min_new_tokens` as generate does it: EOS cannot win before that many tokens."""
        rows = [i for i, s in enumerate(seqs) if len(s.generated) < s.min_new_tokens]
        if rows:
            logits[torch.tensor(rows, device=self.device)[:, None], self._eos[None]] = float("-inf")
        return logits

    def _finished(self, seq: Seq, token: int) -> bool:
        return len(seq.generated) >= seq.req.max_new_tokens or token in self.eos_ids

    def _finish(self, seq: Seq, token: int) -> Output:
        text = "" if token in self.eos_ids else seq.detok.push(token)
        text += seq.detok.flush()
        seq.stats.tokens = len(seq.generated)
        seq.stats.timings["total"] = time.perf_counter() - seq.t_submit
        return Output(seq.rid, text, True, seq.stats, token_ids=[token])

    # ---- session caches -----------------------------------------------------------------

    def _copy_row(self, seq: Seq, n: int) -> KV | None:
        """A copy of the first `n` tokens of its row, for its session's history; None when
        even after freeing other histories there is no memory for it (the answer still ends)."""
        if seq.row is None or seq.prompt is None:
            return None
        try:
            return self._with_oom_retry(lambda: self._row_copy(seq, n))  # type: ignore[no-any-return]
        except OOM:
            log.warning("out of memory copying the history of %s: not cached", seq.req.session_id)
            return None

    def _save_session(self, seq: Seq, kv: KV | None) -> list[str] | None:
        """Keep the KV of prompt + generated tokens (all but the last, never fed) for the
        session's next turn, LRU-evicting other sessions while over the KV budget."""
        if seq.prompt is None or kv is None:
            return None
        entry = session_cache(seq, kv, self.tokenizer, self.eos_ids)
        sid = seq.req.session_id
        self._sessions.pop(sid, None)
        self._sessions[sid] = entry
        return [h for _, end, h in entry.spans if end <= len(entry.ids)]

    def _trim_sessions(self) -> None:
        """LRU-evict session histories while over the KV budget (the newest last)."""
        if self._sessions and self.kv_projected() > self.budget.tokens:
            self._fit_store()
        while self._sessions and self.kv_projected() > self.budget.tokens:
            self._sessions.popitem(last=False)
