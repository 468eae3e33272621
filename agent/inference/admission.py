"""Admission: which queued request gets a batch slot and KV memory next.

Committed requests first, then preemptive answers, then speculative prefills (oldest first
within each); lower priorities wait while a committed request waits. Only committed work may
evict: other sessions' history (LRU), speculative prefills waiting for their commit, its own
history last, or park
a decoding preemptive answer (its cache copied out; it resumes where it stopped). A committed
request continues its own speculative prefill when the prompts match.

A mixin of `Engine` (engine.py), which owns the state and the methods declared at the end.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from agent.inference.base import GenerationRequest
from agent.inference.batch import KV, KVStore
from agent.inference.memory import KVBudget
from agent.inference.prompts import Answer, Prompt, RequestError, splice_answers
from agent.inference.rows import Rows
from agent.inference.sequence import COMMITTED, PREEMPTIVE, Output, Seq, SessionCache, error

OOM = torch.OutOfMemoryError


class Admission:
    max_batch: int
    budget: KVBudget
    _queue: list[Seq]
    _prefilling: list[Seq]
    _rows: Rows
    _store: KVStore
    _prefilled: dict[str, Seq]
    _sessions: OrderedDict[str, SessionCache]

    def _admit(self, out: list[Output]) -> None:
        """Queued requests become prefilling ones, by priority, while slots and memory allow.
        Lower priorities wait while a committed request waits."""
        for seq in sorted(self._queue, key=lambda s: s.rank):  # stable: oldest first within a priority
            if seq not in self._queue:  # dropped by an adoption meanwhile
                continue
            slots = len(self._rows) + sum(s.row is None for s in self._prefilling)
            if slots >= self.max_batch and not (seq.rank == COMMITTED and self._park_preemptive()):
                return
            try:
                if seq.prompt is None:
                    seq.prompt, seq.answers = splice_answers(self.build_prompt(seq.req),
                                                             self._answers_of(seq.req.session_id))
                    seq.stats.prompt_tokens = len(seq.prompt.ids)
                    if seq.req.max_new_tokens < 1:
                        raise RequestError("max_new_tokens must be at least 1")
            except RequestError as exc:
                self._queue.remove(seq)
                out.append(error(seq, exc.code, str(exc), time.perf_counter()))
                continue
            if seq.rank == COMMITTED and seq.kv is None and self._adopt_speculative(seq, out):
                continue
            if not self._make_room(seq):
                if seq.rank != COMMITTED:
                    continue  # waits; never evicts anything
                if self._rows or self._prefilling:
                    return  # wait for running requests to finish and free theirs
                self._queue.remove(seq)
                out.append(error(seq, "out_of_memory", (
                    f"the request needs {seq.final_tokens()} tokens of KV cache; the budget is "
                    f"{self.budget.tokens} ({self.budget.describe()})"), time.perf_counter()))
                continue
            self._queue.remove(seq)
            if seq.kv is not None:  # a parked answer resumes where it stopped
                self._resume(seq, out)
                continue
            seq.t_admit = time.perf_counter()
            seq.stats.timings["queue"] = seq.t_admit - seq.t_submit
            self._prefilling.append(seq)
            self._prefilling.sort(key=lambda s: s.rank)

    def _park_preemptive(self) -> bool:
        """Free a batch slot for committed work: the newest preemptive answer leaves the batch
        with a copy of its cache and waits in the queue to resume."""
        for seq in sorted(self._rows.running, key=lambda s: -s.t_admit):
            if seq.rank == PREEMPTIVE:
                try:
                    seq.kv = self._store.row_kv(seq.row)  # type: ignore[arg-type]
                except OOM:
                    return False
                self._rows.drop(seq)
                self._queue.append(seq)
                return True
        return False

    def _resume(self, seq: Seq, out: list[Output]) -> None:
        try:
            self._with_oom_retry(lambda: self._row_add(seq, seq.kv, seq.own_tokens()))
        except OOM as exc:
            out.append(error(seq, "out_of_memory", f"out of device memory resuming: {exc}", time.perf_counter()))
            return
        seq.kv = None
        self._rows.to_decoding(seq)

    def _adopt_speculative(self, seq: Seq, out: list[Output]) -> bool:
        """The committed turn continues its own speculative prefill when the prompts match
        (prefilled: first token ready; still prefilling: takes over its progress). Any other
        speculation of the session is stale now; the session's history stays cached."""
        prompt = seq.prompt
        assert prompt is not None
        sid = seq.req.session_id

        def same(spec: Seq) -> bool:
            return spec.key == seq.key and spec.prompt is not None and spec.prompt.ids == prompt.ids \
                and spec.prompt.spans == prompt.spans

        for rid, done in list(self._prefilled.items()):
            if done.req.session_id != sid:
                continue
            del self._prefilled[rid]
            if same(done) and done.kv is not None and self._make_room(seq):
                self._queue.remove(seq)
                seq.t_admit = time.perf_counter()
                seq.stats.timings["queue"] = seq.t_admit - seq.t_submit
                seq.stats.reused_tokens = len(prompt.ids)
                seq.stats.timings["speculative_prefill"] = done.stats.timings.get("prefill", 0.0)
                try:
                    self._with_oom_retry(partial(self._row_add, seq, done.kv, len(prompt.ids)))
                except OOM as exc:
                    out.append(error(seq, "out_of_memory", f"out of device memory: {exc}", time.perf_counter()))
                    return True
                self._sessions.pop(sid, None)  # superseded by the prefill's own copy
                self._ready(seq, done.generated[0], out)
                return True
        for i, spec in enumerate(self._prefilling):
            if spec.req.speculative and spec.req.session_id == sid:
                if same(spec):
                    for name in ("t_admit", "row", "reuse", "past", "embeds", "base", "done", "todo"):
                        setattr(seq, name, getattr(spec, name))
                    if seq.row is not None:
                        self._rows.seqs[seq.row] = seq
                    seq.reuse, seq.took = self._sessions.pop(sid, seq.reuse), True  # committed: takes it
                    seq.stats.timings["queue"] = seq.t_admit - seq.t_submit
                    seq.stats.reused_tokens = spec.stats.reused_tokens
                    self._queue.remove(seq)
                    self._prefilling[i] = seq
                    self._prefilling.sort(key=lambda s: s.rank)
                    return True
                self._discard(spec)
                break
        self._drop_speculative(lambda s: s.req.session_id == sid and s in self._queue)
        return False

    def _answers_of(self, session_id: str) -> list[Answer]:
        """The session's earlier answers as generated: from its cached history, else from a
        request that took that history."""
        entry = self._sessions.get(session_id)
        if entry is not None:
            return entry.answers
        for seq in (*self._prefilled.values(), *self._prefilling):
            if seq.req.session_id == session_id:
                return seq.answers
        return []

    def _make_room(self, seq: Seq) -> bool:
        """Fit `seq` in the KV budget. Committed work may evict other sessions' history (LRU),
        then speculative prefills waiting for their commit (oldest first), then its own history;
        other work waits."""
        budget = self.budget.tokens
        if self.kv_projected(seq) > budget:
            self._fit_store()  # capacity nobody needs goes first, for any request: it evicts nothing
        if seq.rank != COMMITTED:
            return self.kv_projected(seq) <= budget
        own = seq.req.session_id
        while self.kv_projected(seq) > budget:
            victim = next((sid for sid in self._sessions if sid != own), None)
            if victim is not None:
                del self._sessions[victim]
                continue
            spec = next((rid for rid, s in self._prefilled.items() if s.key != seq.key), None)
            if spec is not None:
                del self._prefilled[spec]
                continue
            if own in self._sessions:  # its own history too, as a last resort
                del self._sessions[own]
                continue
            return False
        return True

    # ---- owned by Engine ----------------------------------------------------------------

    def build_prompt(self, request: GenerationRequest) -> Prompt:
        raise NotImplementedError

    def kv_projected(self, extra: Seq | None = None) -> int:
        raise NotImplementedError

    def _with_oom_retry(self, run: Callable[[], Any]) -> Any:
        raise NotImplementedError

    def _row_add(self, seq: Seq, kv: KV | None, n: int) -> None:
        raise NotImplementedError

    def _ready(self, seq: Seq, first: int, out: list[Output]) -> None:
        raise NotImplementedError

    def _fit_store(self) -> None:
        raise NotImplementedError

    def _discard(self, seq: Seq) -> None:
        raise NotImplementedError

    def _drop_speculative(self, match: Callable[[Seq], bool]) -> None:
        raise NotImplementedError
