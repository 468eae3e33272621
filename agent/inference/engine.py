"""A synchronous continuous-batching engine over one loaded Qwen2-Audio model.

Pure and single-threaded (no asyncio, no processes): a worker process drives it with
`submit` / `cancel` / `step`. Each `step` admits queued requests (one prefill each, reusing
the session's cached KV of earlier turns), then runs ONE batched greedy decode step over
every running request. Requests of different lengths share one left-padded DynamicCache
with an attention mask and explicit position ids; it is re-packed only when membership
changes.
"""

from __future__ import annotations

import inspect
import time
import zlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from agent.inference.base import GenerationRequest, GenerationStats, InferenceError
from agent.inference.models import LoadedModel
from agent.model.qwen2_audio import EOS_TOKENS, SAMPLE_RATE, render_prompt

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [1, heads, len, head_dim]


@dataclass
class Output:
    request_id: str
    text: str  # delta since the last output of this request
    finished: bool = False
    stats: GenerationStats | None = None
    token_ids: list[int] = field(default_factory=list)  # new tokens of this step
    # (code, message): a tuple pickles across processes, InferenceError does not.
    error: tuple[str, str] | None = None

    def exception(self) -> InferenceError | None:
        return InferenceError(*self.error) if self.error else None


class RequestError(Exception):
    """A request the engine refuses (bad audio, empty turn); it never hurts other requests."""

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Prompt:
    ids: list[int]  # expanded: one id per audio token
    spans: list[tuple[int, int, str]]  # audio token spans [start, end) with the audio's hash
    audios: list[np.ndarray]  # in the order of `spans`


@dataclass
class _SessionCache:
    ids: list[int]  # exactly the tokens the KV covers
    spans: list[tuple[int, int, str]]
    kv: KV


class Detokenizer:
    """Incremental decoding that never emits half a multi-byte character.

    Decodes all ids each time: one tokenizer call per token (its fixed cost dominates at
    answer lengths), and byte-level BPE decoding is prefix-stable."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # emitted so far
        self.read = 0  # ids covered by `text`

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        cur = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        # A trailing U+FFFD is an incomplete UTF-8 sequence: wait for its other bytes (at
        # most 4 per character, so give up waiting beyond that: the bytes are invalid).
        if not final and cur.endswith("\ufffd") and len(self.ids) - self.read < 4:
            return ""
        delta, self.text, self.read = cur[len(self.text):], cur, len(self.ids)
        return delta


@dataclass
class _Seq:
    rid: str
    req: GenerationRequest
    detok: Detokenizer
    t_submit: float
    stats: GenerationStats = field(default_factory=GenerationStats)
    prompt: Prompt | None = None
    generated: list[int] = field(default_factory=list)
    kv: KV | None = None  # own cache until it joins the batch
    t_first: float | None = None
    min_new_tokens: int = 0


def audio_hash(audio: np.ndarray) -> str:
    """Identity of an audio clip for history reuse. Hashed on every turn for the whole
    history, so a fast checksum (crc32 + adler32 + length, ~10x faster than blake2b)."""
    data = memoryview(np.ascontiguousarray(audio)).cast("B")
    return f"{audio.size}:{zlib.crc32(data):08x}{zlib.adler32(data):08x}"


def _lcp(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


class Engine:
    def __init__(self, loaded: LoadedModel, max_batch: int = 16, kv_budget_tokens: int = 32768,
                 feature_cache: int = 64) -> None:
        self.model = loaded.model
        self.processor = loaded.processor
        self.tokenizer = loaded.processor.tokenizer
        self.device = torch.device(loaded.device)
        self.max_batch = max_batch
        self.kv_budget_tokens = kv_budget_tokens
        self.audio_token_id = int(self.processor.audio_token_id)
        self.eos_ids = {int(self.tokenizer.convert_tokens_to_ids(t)) for t in EOS_TOKENS}
        self.eos_ids.discard(self.tokenizer.unk_token_id)
        # transformers 5.x renamed `past_key_values` to `cache` (older 5.x releases lack it).
        params = inspect.signature(self.model.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._pending: deque[_Seq] = deque()
        self._held: dict[str, _Seq] = {}  # speculative prefills waiting for their commit
        self._batch: list[_Seq] = []
        self._cache: Any = None  # batched DynamicCache of `_batch`, left-padded
        self._mask: torch.Tensor | None = None  # [B, T] 1 = real token
        self._pos: torch.Tensor | None = None  # [B] next position = tokens in cache
        self._sessions: OrderedDict[str, _SessionCache] = OrderedDict()  # LRU order
        self._features: OrderedDict[str, tuple[torch.Tensor, torch.Tensor, int]] = OrderedDict()
        self._feature_cache = feature_cache
        self._token_counts: dict[str, int] = {}
        self._outbox: list[Output] = []

    # ---- public API -------------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._batch)

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def held(self) -> int:
        return len(self._held)

    @property
    def cached_tokens(self) -> int:
        return sum(len(c.ids) for c in self._sessions.values())

    @property
    def has_work(self) -> bool:
        return bool(self._pending or self._batch or self._outbox)

    def submit(self, request_id: str, request: GenerationRequest) -> None:
        seq = _Seq(request_id, request, Detokenizer(self.tokenizer), time.perf_counter())
        seq.min_new_tokens = int(request.extra.get("min_new_tokens", 0))
        self._pending.append(seq)

    def cancel(self, request_id: str) -> None:
        """Drop a request wherever it is; a running one leaves the batch right now."""
        for seq in list(self._pending):
            if seq.rid == request_id:
                self._pending.remove(seq)
                self._outbox.append(self._error(seq, "cancelled", "request cancelled"))
        for i, seq in enumerate(self._batch):
            if seq.rid == request_id:
                self._save_session(seq, i)
                self._remove([i])
                self._outbox.append(self._error(seq, "cancelled", "request cancelled"))
                break
        self.drop(request_id)

    def drop(self, request_id: str) -> None:
        """Discard a speculative prefill (held or still queued)."""
        self._held.pop(request_id, None)
        for seq in list(self._pending):
            if seq.rid == request_id and seq.req.speculative:
                self._pending.remove(seq)

    def drop_turn(self, session_id: str, turn_id: str) -> None:
        for rid, seq in list(self._held.items()):
            if seq.req.session_id == session_id and seq.req.turn_id == turn_id:
                del self._held[rid]
        for seq in list(self._pending):
            if seq.req.speculative and (seq.req.session_id, seq.req.turn_id) == (session_id, turn_id):
                self._pending.remove(seq)

    def forget(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)
        for rid, seq in list(self._held.items()):
            if seq.req.session_id == session_id:
                del self._held[rid]

    @torch.inference_mode()
    def step(self) -> list[Output]:
        out, self._outbox = self._outbox, []
        joining: list[_Seq] = []
        while self._pending and len(self._batch) + len(joining) < self.max_batch:
            seq = self._pending.popleft()
            try:
                if self._prefill(seq, out):
                    joining.append(seq)
            except RequestError as exc:
                out.append(self._error(seq, exc.code, str(exc)))
            except Exception as exc:  # a broken request must not take the engine down
                out.append(self._error(seq, "inference_failed", f"{type(exc).__name__}: {exc}"))
        if joining:
            self._join(joining)
        if self._batch:
            try:
                self._decode(out)
            except Exception as exc:
                for seq in self._batch:
                    out.append(self._error(seq, "inference_failed", f"{type(exc).__name__}: {exc}"))
                self._batch, self._cache, self._mask, self._pos = [], None, None, None
        return out

    # ---- prompt -------------------------------------------------------------------------

    def build_prompt(self, request: GenerationRequest) -> Prompt:
        """Render the template and expand each audio placeholder to its token count."""
        messages = request.messages
        if not messages:
            raise RequestError("request has no messages")
        last = messages[-1]
        content = last.get("content")
        empty = (not content.strip()) if isinstance(content, str) else not any(
            p.get("type") == "audio" or (p.get("type") == "text" and p.get("text", "").strip())
            for p in (content or []))
        if last.get("role") != "user" or empty:
            raise RequestError("the last turn is empty: nothing to answer")
        ordered: list[np.ndarray] = []
        for message in messages:
            if isinstance(message.get("content"), str):
                continue
            for part in message.get("content") or []:
                if part.get("type") != "audio":
                    continue
                index = part.get("audio")
                if not isinstance(index, int) or not 0 <= index < len(request.audios):
                    raise RequestError(f"audio part refers to missing audio {index!r}")
                audio = np.ascontiguousarray(request.audios[index], dtype=np.float32)
                if audio.ndim != 1 or audio.size == 0:
                    raise RequestError(f"audio {index} is empty or not mono (shape {audio.shape})")
                if not np.isfinite(audio).all():
                    raise RequestError(f"audio {index} holds NaN or infinite samples")
                ordered.append(audio)
        base = self.tokenizer(render_prompt(messages), add_special_tokens=False)["input_ids"]
        ids: list[int] = []
        spans: list[tuple[int, int, str]] = []
        for token in base:
            if token != self.audio_token_id:
                ids.append(token)
                continue
            audio = ordered[len(spans)]
            digest = audio_hash(audio)
            n = self._audio_tokens(audio, digest)
            if n < 2:  # one token would trip the model's legacy (unexpanded) merge path
                raise RequestError(f"audio {len(spans)} is too short ({audio.size} samples)")
            spans.append((len(ids), len(ids) + n, digest))
            ids.extend([self.audio_token_id] * n)
        if len(spans) != len(ordered):
            raise RequestError("audio placeholders and audio parts do not match")
        return Prompt(ids, spans, ordered)

    def _audio_tokens(self, audio: np.ndarray, digest: str) -> int:
        if digest not in self._token_counts:
            if len(self._token_counts) > 4096:
                self._token_counts.clear()
            self._token_counts[digest] = self._audio_features(audio, digest)[2]
        return self._token_counts[digest]

    def _audio_features(self, audio: np.ndarray, digest: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Features exactly as the processor makes them (padded to 30 s), LRU-cached by hash."""
        hit = self._features.get(digest)
        if hit is not None:
            self._features.move_to_end(digest)
            return hit
        fe = self.processor.feature_extractor([audio], sampling_rate=SAMPLE_RATE, return_attention_mask=True,
                                              padding="max_length", return_tensors="pt")
        mask = fe["attention_mask"][0]
        _, n = self.model.model.audio_tower._get_feat_extract_output_lengths(mask.sum())
        hit = (fe["input_features"][0], mask, int(n))
        self._features[digest] = hit
        while len(self._features) > self._feature_cache:
            self._features.popitem(last=False)
        return hit

    # ---- prefill ------------------------------------------------------------------------

    def _prefill(self, seq: _Seq, out: list[Output]) -> bool:
        """Prefill `seq` and emit its first token; True when it should join the batch."""
        req = seq.req
        if req.max_new_tokens < 1:
            raise RequestError("max_new_tokens must be at least 1")
        t0 = time.perf_counter()
        seq.stats.timings["queue"] = t0 - seq.t_submit
        seq.prompt = prompt = self.build_prompt(req)
        seq.stats.prompt_tokens = len(prompt.ids)
        held = self._take_held(req)
        if req.speculative:
            self.drop_turn(req.session_id, req.turn_id)
        if held is not None and held.prompt is not None and held.prompt.ids == prompt.ids \
                and held.prompt.spans == prompt.spans and held.kv is not None:
            # The speculative prefill already covers this exact prompt: continue from it.
            seq.kv, first = held.kv, held.generated[0]
            seq.stats.reused_tokens = len(prompt.ids)
            seq.stats.timings["speculative_prefill"] = held.stats.timings.get("prefill", 0.0)
        else:
            first = self._run_prefill(seq, prompt)
        t1 = time.perf_counter()
        seq.stats.timings["prefill"] = t1 - t0
        seq.generated = [first]
        if req.speculative:  # hold: no decoding until the final request commits
            self._held[seq.rid] = seq
            seq.stats.timings["total"] = t1 - seq.t_submit
            out.append(Output(seq.rid, "", True, seq.stats))
            return False
        seq.t_first = t1
        seq.stats.timings["ttft"] = t1 - seq.t_submit
        if self._finished(seq, first):
            self._save_session(seq, None)
            out.append(self._finish(seq, first))
            return False
        out.append(Output(seq.rid, seq.detok.push(first), token_ids=[first]))
        return True

    def _take_held(self, req: GenerationRequest) -> _Seq | None:
        for rid, seq in list(self._held.items()):
            if seq.req.session_id == req.session_id and seq.req.turn_id == req.turn_id:
                return self._held.pop(rid)
        return None

    def _reusable(self, session_id: str, prompt: Prompt) -> tuple[int, _SessionCache | None]:
        """Longest cached prefix that does not cut through an audio span (or change an audio)."""
        entry = self._sessions.get(session_id)
        if entry is None:
            return 0, None
        self._sessions.move_to_end(session_id)
        n = min(_lcp(entry.ids, prompt.ids), len(prompt.ids) - 1)  # keep ≥1 token for logits
        cached = set(entry.spans)
        for span in prompt.spans:
            start, end, _ = span
            if start >= n:
                break
            if end > n or span not in cached:
                n = start
                break
        return n, (entry if n > 0 else None)

    def _run_prefill(self, seq: _Seq, prompt: Prompt) -> int:
        from transformers import DynamicCache

        past, entry = self._reusable(seq.req.session_id, prompt)
        seq.stats.reused_tokens = past
        if entry is not None:
            cache = DynamicCache(ddp_cache_data=[(k[:, :, :past], v[:, :, :past]) for k, v in entry.kv])
        else:
            cache = DynamicCache()
        new_ids = prompt.ids[past:]
        kwargs: dict[str, Any] = {}
        # Only the audios whose placeholders lie in the new suffix: the model scatters features
        # into positions where input_ids == audio_token_id, in order.
        new_audio = [(a, span[2]) for a, span in zip(prompt.audios, prompt.spans) if span[0] >= past]
        if new_audio:
            feats = [self._audio_features(a, h) for a, h in new_audio]
            kwargs["input_features"] = torch.stack([f[0] for f in feats]).to(self.device, self.model.dtype)
            kwargs["feature_attention_mask"] = torch.stack([f[1] for f in feats]).to(self.device)
        total = past + len(new_ids)
        out = self.model.model(
            input_ids=torch.tensor([new_ids], device=self.device),
            attention_mask=torch.ones(1, total, dtype=torch.long, device=self.device),  # past + new
            position_ids=torch.arange(past, total, device=self.device)[None],
            use_cache=True, **{self._cache_kw: cache}, **kwargs)
        logits = self._suppress_eos(self.model.lm_head(out.last_hidden_state[:, -1]), [seq])
        seq.kv = [(layer.keys, layer.values) for layer in cache.layers]
        return int(logits.argmax(-1)[0])

    # ---- batched decode -----------------------------------------------------------------

    def _join(self, seqs: list[_Seq]) -> None:
        """Re-pack: the new rows join the left-padded batch cache."""
        from transformers import DynamicCache

        lengths = [s.kv[0][0].shape[2] for s in seqs]  # type: ignore[index]
        old_t = 0 if self._mask is None else self._mask.shape[1]
        t = max([old_t, *lengths])

        def lpad(x: torch.Tensor, n: int) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, 0, n, 0)) if n else x

        layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        for li in range(len(seqs[0].kv)):  # type: ignore[arg-type]
            ks, vs = [], []
            if self._cache is not None:
                layer = self._cache.layers[li]
                ks.append(lpad(layer.keys, t - old_t))
                vs.append(lpad(layer.values, t - old_t))
            for s, n in zip(seqs, lengths):
                k, v = s.kv[li]  # type: ignore[index]
                ks.append(lpad(k, t - n))
                vs.append(lpad(v, t - n))
            layers.append((torch.cat(ks), torch.cat(vs)))
        masks = [] if self._mask is None else [torch.nn.functional.pad(self._mask, (t - old_t, 0))]
        for n in lengths:
            row = torch.zeros(1, t, dtype=torch.long, device=self.device)
            row[:, t - n:] = 1
            masks.append(row)
        pos = [] if self._pos is None else [self._pos]
        pos.append(torch.tensor(lengths, dtype=torch.long, device=self.device))
        self._cache = DynamicCache(ddp_cache_data=layers)
        self._mask, self._pos = torch.cat(masks), torch.cat(pos)
        for s in seqs:
            s.kv = None
        self._batch.extend(seqs)

    def _remove(self, rows: list[int]) -> None:
        """Rows leave the batch now; trim the left padding nobody needs any more."""
        keep = [i for i in range(len(self._batch)) if i not in set(rows)]
        self._batch = [self._batch[i] for i in keep]
        if not keep:
            self._cache, self._mask, self._pos = None, None, None
            return
        assert self._mask is not None and self._pos is not None
        idx = torch.tensor(keep, device=self.device)
        mask = self._mask[idx]
        first = int(torch.nonzero(mask.any(0))[0, 0])
        for layer in self._cache.layers:
            layer.keys = layer.keys[idx, :, first:]
            layer.values = layer.values[idx, :, first:]
        self._mask, self._pos = mask[:, first:], self._pos[idx]

    def _decode(self, out: list[Output]) -> None:
        assert self._mask is not None and self._pos is not None
        b = len(self._batch)
        ids = torch.tensor([[s.generated[-1]] for s in self._batch], device=self.device)
        mask = torch.cat([self._mask, torch.ones(b, 1, dtype=torch.long, device=self.device)], dim=1)
        res = self.model.model(input_ids=ids, attention_mask=mask, position_ids=self._pos[:, None],
                               use_cache=True, **{self._cache_kw: self._cache})
        logits = self._suppress_eos(self.model.lm_head(res.last_hidden_state[:, -1]), self._batch)
        tokens = logits.argmax(-1).tolist()
        self._mask, self._pos = mask, self._pos + 1
        done: list[int] = []
        for i, (seq, token) in enumerate(zip(self._batch, tokens)):
            seq.generated.append(int(token))
            if self._finished(seq, token):
                self._save_session(seq, i)
                out.append(self._finish(seq, token))
                done.append(i)
            else:
                out.append(Output(seq.rid, seq.detok.push(token), token_ids=[token]))
        if done:
            self._remove(done)

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

    def _save_session(self, seq: _Seq, row: int | None) -> None:
        """Keep the KV of prompt + generated tokens (all but the last, never fed) for the
        session's next turn, LRU-evicting other sessions beyond the token budget."""
        if seq.prompt is None:
            return
        if row is None:
            kv = seq.kv
        else:
            assert self._pos is not None
            n = int(self._pos[row])
            kv = [(layer.keys[row:row + 1, :, -n:].clone(), layer.values[row:row + 1, :, -n:].clone())
                  for layer in self._cache.layers]
        if kv is None:
            return
        ids = seq.prompt.ids + seq.generated[:-1]
        ids = ids[:kv[0][0].shape[2]]
        sid = seq.req.session_id
        self._sessions.pop(sid, None)
        if len(ids) > self.kv_budget_tokens:
            return
        self._sessions[sid] = _SessionCache(ids, seq.prompt.spans, kv)
        total = self.cached_tokens
        while total > self.kv_budget_tokens:
            _, evicted = self._sessions.popitem(last=False)
            total -= len(evicted.ids)
