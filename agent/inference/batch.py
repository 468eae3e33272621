"""The engine's KV cache: one preallocated store of rows (slots), written in place.

Per layer, keys and values live in `[rows, kv_heads, width, head_dim]` tensors allocated once
and grown geometrically (never per token): a decode step writes only its new token's K/V at each
row's own position (`index_put_`), a prefill chunk writes only its chunk. Rows are not padded to
a common length; each keeps its own length and the attention mask (built here, 4D and
additive, so transformers' mask code is skipped) hides the rest. The engine keeps its decoding rows at
`[0, decoding)` and its prefilling rows after them, so both are plain views of the store.

A forward that fails half-way (out of memory) has only written past the rows' lengths: the
store is unchanged as far as anyone reads it, and `lengths` move only once a step commits.
Moving rows (a request leaves, a prefill starts decoding) copies one row's tokens in place (a
swap goes through a small scratch buffer allocated with the store): no allocation, so it cannot
run out of memory.
"""

from __future__ import annotations

from typing import Any

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [1, heads, len, head_dim]
SCRATCH = 256  # tokens per piece of a row swap


class KVStore:
    def __init__(self, device: torch.device, layers: int, heads: int, head_dim: int, dtype: torch.dtype) -> None:
        self.device, self.layers, self.heads, self.head_dim, self.dtype = device, layers, heads, head_dim, dtype
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.lengths: list[int] = []  # tokens in each used row, rows 0..n-1
        self._scratch: torch.Tensor | None = None  # [heads, SCRATCH, head_dim]: swaps go through it

    # ---- capacity -------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, width) every layer can hold (layers can be larger after a failed growth)."""
        if not self.k:
            return 0, 0
        return min(t.shape[0] for t in self.k), min(t.shape[2] for t in self.k)

    @property
    def allocated_tokens(self) -> int:
        return sum(t.shape[0] * t.shape[2] for t in self.k) // max(1, len(self.k))

    @staticmethod
    def plan(have: tuple[int, int], rows: int, width: int, limit: int | None = None) -> tuple[int, int]:
        """The shape `ensure(rows, width)` grows to: ×2 on the dimension that is short (amortised),
        exactly what is needed where the doubled shape would exceed `limit` tokens."""
        if rows <= have[0] and width <= have[1]:
            return have
        grow_rows = max(have[0], rows if rows <= have[0] else max(rows, 2 * have[0]))
        grow_width = max(have[1], width if width <= have[1] else max(width, 2 * have[1]))
        if limit is not None and grow_rows * grow_width > limit:
            return max(have[0], rows), max(have[1], width)
        return grow_rows, grow_width

    def ensure(self, rows: int, width: int, limit: int | None = None) -> None:
        """Room for `rows` rows of `width` tokens. Grows one layer at a time,
        so a growth holds at most one extra layer; an out-of-memory half-way leaves the layers
        already grown larger, which loses nothing."""
        have = self.shape
        want = self.plan(have, rows, width, limit)
        if want == have:
            return
        if self._scratch is None:
            self._scratch = torch.empty(self.heads, SCRATCH, self.head_dim, dtype=self.dtype, device=self.device)
        for li in range(self.layers):
            for store in (self.k, self.v):
                old = store[li] if li < len(store) else None
                if old is not None and old.shape[0] >= want[0] and old.shape[2] >= want[1]:
                    continue
                new = torch.zeros(want[0], self.heads, want[1], self.head_dim, dtype=self.dtype, device=self.device)
                if old is not None:
                    new[:old.shape[0], :, :old.shape[2]] = old
                    store[li] = new
                else:
                    store.append(new)

    def shrink(self, rows: int, width: int) -> None:
        """Give back capacity beyond `rows` × `width` (which must hold every used row), one
        layer at a time; an out-of-memory half-way leaves the other layers as they were."""
        assert len(self.lengths) <= rows and max(self.lengths, default=0) <= width
        for store in (self.k, self.v):
            for li, old in enumerate(store):
                if old.shape[0] > rows or old.shape[2] > width:
                    new = torch.zeros(rows, self.heads, width, self.head_dim, dtype=self.dtype, device=self.device)
                    new.copy_(old[:rows, :, :width])
                    store[li] = new

    def clear(self) -> None:
        self.k, self.v, self.lengths, self._scratch = [], [], [], None

    # ---- rows -----------------------------------------------------------------------------

    def add(self, kv: KV | None = None, n: int = 0) -> int:
        """A new row at the end, holding the first `n` tokens of `kv` (a history) if given."""
        row = len(self.lengths)
        assert row < self.shape[0], "ensure() first"
        if kv is not None and n:
            for li, (k, v) in enumerate(kv):
                self.k[li][row, :, :n] = k[0, :, :n]
                self.v[li][row, :, :n] = v[0, :, :n]
        self.lengths.append(n)
        return row

    def move(self, src: int, dst: int) -> None:
        """Row `src`'s tokens into row `dst` (an in-place copy of its length only)."""
        n = self.lengths[src]
        if src != dst and n:
            for store in (self.k, self.v):
                for t in store:
                    t[dst, :, :n] = t[src, :, :n]
        self.lengths[dst] = n

    def swap(self, a: int, b: int) -> None:
        """Exchange two rows, piece by piece through the scratch buffer."""
        if a == b:
            return
        assert self._scratch is not None
        n = max(self.lengths[a], self.lengths[b])
        for store in (self.k, self.v):
            for t in store:
                for s in range(0, n, SCRATCH):
                    e = min(n, s + SCRATCH)
                    tmp = self._scratch[:, :e - s]
                    tmp.copy_(t[a, :, s:e])
                    t[a, :, s:e] = t[b, :, s:e]
                    t[b, :, s:e] = tmp
        self.lengths[a], self.lengths[b] = self.lengths[b], self.lengths[a]

    def pop(self) -> None:
        """The last row leaves. The store keeps its capacity when it empties: a conversation's
        next turn would otherwise allocate (and the OS zero) its whole width again, a cost that
        grows with the history (the engine gives the capacity back when the budget needs it)."""
        self.lengths.pop()

    def row_kv(self, row: int, n: int | None = None) -> KV:
        """A copy of one row's first `n` tokens (default: all), e.g. for the session's history."""
        n = self.lengths[row] if n is None else n
        return [(k[row:row + 1, :, :n].clone(), v[row:row + 1, :, :n].clone()) for k, v in zip(self.k, self.v, strict=True)]

    # ---- one forward ----------------------------------------------------------------------

    def forward_args(self, start: int, past: list[int], new: list[int]) -> tuple[_Writes, dict[str, Any], torch.Tensor]:
        """Cache, attention mask and position ids for a forward over rows [start, start+len(past)):
        row i has `past[i]` tokens and feeds `new[i]` (queries right-padded to the longest;
        padded queries write nothing and their outputs are ignored)."""
        b, q = len(past), max(new)
        width = max(p + n for p, n in zip(past, new, strict=True))
        dev = self.device
        offsets = torch.tensor(past, device=dev)
        pos = offsets[:, None] + torch.arange(q, device=dev)[None]  # [b, q]
        hide = (torch.arange(width, device=dev)[None, None] > pos[:, :, None])[:, None]  # [b, 1, q, width]
        # additive, made once per forward: a bool mask is converted again in every layer
        # (`where` over two scalars: ~1.6x faster than zeros + masked_fill_ on the CPU)
        low = torch.full((), torch.finfo(self.dtype).min, dtype=self.dtype, device=dev)
        mask = torch.where(hide, low, torch.zeros((), dtype=self.dtype, device=dev))
        if q == 1:
            writes = _Writes(self, start, start + b, width, torch.arange(start, start + b, device=dev), offsets, None)
        else:  # the real (row, position) pairs, listed on the host: no device sync to find them
            rows = [start + i for i, n in enumerate(new) for _ in range(n)]
            where = [p + j for p, n in zip(past, new, strict=True) for j in range(n)]
            sel = None if all(n == q for n in new) else \
                torch.tensor([i * q + j for i, n in enumerate(new) for j in range(n)], device=dev)
            writes = _Writes(self, start, start + b, width, torch.tensor(rows, device=dev),
                             torch.tensor(where, device=dev), sel)
        return writes, {"full_attention": mask}, pos


class _Writes:
    """What the model's attention layers see as their cache for one forward: `update` writes the
    new keys/values in place and returns the rows' views of the store."""

    is_compileable = False

    def __init__(self, store: KVStore, start: int, stop: int, width: int, rows: torch.Tensor, pos: torch.Tensor,
                 sel: torch.Tensor | None) -> None:
        self.store, self.start, self.stop, self.width = store, start, stop, width
        self.rows, self.pos, self.sel = rows, pos, sel

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.store.k[layer_idx], self.store.v[layer_idx]
        for src, dst in ((key_states, k), (value_states, v)):
            flat = src[:, :, 0] if src.shape[2] == 1 else src.transpose(1, 2).flatten(0, 1)  # [b·q, heads, dim]
            dst[self.rows, :, self.pos] = flat if self.sel is None else flat[self.sel]
        return k[self.start:self.stop, :, :self.width], v[self.start:self.stop, :, :self.width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width
