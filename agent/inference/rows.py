"""The requests in the KV store's rows: decoding ones at [0, decoding), prefilling ones after.

Keeps `seqs[i].row == i` and the store's rows in step through every move, so a decode step
and a batch of prefill chunks are each a plain view of the store."""

from __future__ import annotations

from agent.inference.batch import KV, KVStore
from agent.inference.sequence import Seq


class Rows:
    def __init__(self, store: KVStore) -> None:
        self.store = store
        self.seqs: list[Seq] = []
        self.decoding = 0

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def running(self) -> list[Seq]:
        return self.seqs[:self.decoding]

    def add(self, seq: Seq, kv: KV | None, n: int, shape: tuple[int, int]) -> None:
        """A row for `seq` at the end, holding `n` tokens of `kv`; the store grown to `shape`."""
        self.store.ensure(*shape)
        seq.row = self.store.add(kv, n)
        self.seqs.append(seq)

    def drop(self, seq: Seq) -> None:
        """Its row leaves; the last decoding row fills the hole, the last row fills that one."""
        i = seq.row
        assert i is not None and self.seqs[i] is seq
        last = len(self.seqs) - 1
        if i < self.decoding:
            self.decoding -= 1
            self._move(self.decoding, i)
            i = self.decoding
        self._move(last, i)
        self.seqs.pop()
        self.store.pop()
        seq.row = None

    def to_decoding(self, seq: Seq) -> None:
        assert seq.row is not None and seq.row >= self.decoding
        self.swap(seq.row, self.decoding)
        self.decoding += 1

    def place(self, seqs: list[Seq]) -> None:
        """Prefilling `seqs` on consecutive rows right after the decoding ones, in order."""
        for t, seq in enumerate(seqs):
            assert seq.row is not None
            self.swap(seq.row, self.decoding + t)

    def swap(self, a: int, b: int) -> None:
        if a != b:
            self.store.swap(a, b)
            self.seqs[a], self.seqs[b] = self.seqs[b], self.seqs[a]
            self.seqs[a].row, self.seqs[b].row = a, b

    def _move(self, src: int, dst: int) -> None:
        if src != dst:
            self.store.move(src, dst)
            self.seqs[dst] = self.seqs[src]
            self.seqs[dst].row = dst
