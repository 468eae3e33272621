"""The running batch's KV cache: one left-padded DynamicCache with an attention mask and
explicit positions, re-packed when rows join or leave."""

from __future__ import annotations

from typing import Any

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [1, heads, len, head_dim]


class Batch:
    def __init__(self, device: torch.device, layers: int) -> None:
        self.device, self.layers = device, layers
        self.cache: Any = None  # DynamicCache, rows left-padded to a common width
        self.mask: torch.Tensor | None = None  # [B, T] 1 = real token
        self.pos: torch.Tensor | None = None  # [B] next position = tokens of the row

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def clear(self) -> None:
        self.cache, self.mask, self.pos = None, None, None

    def join(self, kvs: list[KV]) -> None:
        """New rows join, re-packed one layer at a time so the copy never holds more than one
        extra layer of the batch; each row's own cache is released once it is in. An OOM
        half-way restores the batch as it was (the rows' own caches are kept for a retry)."""
        from transformers import DynamicCache

        lengths = [kv[0][0].shape[2] for kv in kvs]
        old_t, b = self.width, 0 if self.pos is None else self.pos.shape[0]
        t = max([old_t, *lengths])

        def lpad(x: torch.Tensor, n: int) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, 0, n, 0)) if n else x

        def rows(li: int, which: int) -> list[torch.Tensor]:
            return [lpad(kv[li][which], t - n) for kv, n in zip(kvs, lengths, strict=True)]

        if self.cache is None:
            self.cache = DynamicCache(ddp_cache_data=[(torch.cat(rows(li, 0)), torch.cat(rows(li, 1)))
                                                      for li in range(self.layers)])
        else:
            done = 0
            try:
                for li, layer in enumerate(self.cache.layers):
                    layer.keys = torch.cat([lpad(layer.keys, t - old_t), *rows(li, 0)])
                    layer.values = torch.cat([lpad(layer.values, t - old_t), *rows(li, 1)])
                    done = li + 1
            except torch.OutOfMemoryError:
                for layer in self.cache.layers[:done]:
                    layer.keys = layer.keys[:b, :, t - old_t:]
                    layer.values = layer.values[:b, :, t - old_t:]
                raise
        masks = [] if self.mask is None else [torch.nn.functional.pad(self.mask, (t - old_t, 0))]
        for n in lengths:
            row = torch.zeros(1, t, dtype=torch.long, device=self.device)
            row[:, t - n:] = 1
            masks.append(row)
        pos = [] if self.pos is None else [self.pos]
        pos.append(torch.tensor(lengths, dtype=torch.long, device=self.device))
        self.mask, self.pos = torch.cat(masks), torch.cat(pos)

    def keep(self, rows: list[int]) -> None:
        """Only `rows` stay; the left padding nobody needs any more is trimmed."""
        if not rows:
            self.clear()
            return
        assert self.mask is not None and self.pos is not None
        idx = torch.tensor(rows, device=self.device)
        mask = self.mask[idx]
        first = int(torch.nonzero(mask.any(0))[0, 0])
        for layer in self.cache.layers:
            layer.keys = layer.keys[idx, :, first:]
            layer.values = layer.values[idx, :, first:]
        self.mask, self.pos = mask[:, first:], self.pos[idx]

    def row_kv(self, row: int) -> KV:
        """A copy of one row's cache (its real tokens only), e.g. for the session's history."""
        assert self.pos is not None
        n = int(self.pos[row])
        return [(layer.keys[row:row + 1, :, -n:].clone(), layer.values[row:row + 1, :, -n:].clone())
                for layer in self.cache.layers]


def crop(cache: Any, width: int) -> None:
    """Undo a forward that failed half-way: layers it extended go back to `width` tokens."""
    if cache is None:
        return
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.shape[-2] > width:
            layer.keys = layer.keys[..., :width, :]
            layer.values = layer.values[..., :width, :]
