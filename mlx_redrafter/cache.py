"""Preallocated KV cache: a forward pass writes T entries at `offset`; `commit` keeps some.

A verify pass over a packed tree writes one entry per node. `commit(indices)` gathers the
accepted nodes' K/V into contiguous slots at `offset` and advances `offset` by their count.
A node at depth d was rotated with position `offset + d`, its final sequence position, so the
kept entries need no re-rotation.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

GROW_STEP = 256  # slots added at a time when the cache is full


class LayerCache:
    """One layer's keys and values, shaped (B, H_kv, capacity, D)."""

    def __init__(self, parent: KVCache):
        self._parent = parent
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def _grow(self, needed: int, like_k: mx.array, like_v: mx.array) -> None:
        step = self._parent.step
        new_cap = ((needed + step - 1) // step) * step
        if self._parent.max_size is not None:
            new_cap = max(needed, min(new_cap, self._parent.max_size))
        B, H, _, Dk = like_k.shape
        Dv = like_v.shape[3]
        keys = mx.zeros((B, H, new_cap, Dk), like_k.dtype)
        values = mx.zeros((B, H, new_cap, Dv), like_v.dtype)
        if self.keys is not None:
            used = self._parent.offset
            keys[..., :used, :] = self.keys[..., :used, :]
            values[..., :used, :] = self.values[..., :used, :]
        self.keys, self.values = keys, values

    def update(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Write k, v (B, H, T, D) at the cache offset; return all keys/values up to them."""
        offset = self._parent.offset
        end = offset + k.shape[2]
        if end > self.capacity:
            self._grow(end, k, v)
        self.keys[..., offset:end, :] = k
        self.values[..., offset:end, :] = v
        return self.keys[..., :end, :], self.values[..., :end, :]

    def gather_into_place(self, offset: int, idx: mx.array) -> None:
        n = idx.shape[0]
        self.keys[..., offset : offset + n, :] = mx.take(self.keys, idx, axis=2)
        self.values[..., offset : offset + n, :] = mx.take(self.values, idx, axis=2)


class KVCache:
    """Shared-offset KV cache for all layers of one model.

    `tokens` records the ids whose K/V the cache holds (as far as its user keeps it: the
    generation loop, chat and the server do, via `hold`); `common_prefix` tells how much of a
    new prompt it already holds.
    """

    def __init__(self, num_layers: int, max_size: int | None = None, step: int = GROW_STEP):
        self.tokens: list[int] = []
        self.offset = 0
        self.pending = 0  # entries written past `offset` by the last forward pass
        self.max_size = max_size
        self.step = step
        self.layers = [LayerCache(self) for _ in range(num_layers)]

    def written(self, n: int) -> None:
        """Called by the model after a forward pass wrote `n` entries at `offset`."""
        self.pending = n

    def commit(self, indices: Sequence[int] | np.ndarray | None = None) -> int:
        """Keep the given entries (relative to `offset`) of the last forward pass.

        None keeps all of them. Indices must be increasing; a prefix 0..n-1 costs nothing.
        Returns the new offset.
        """
        if indices is None:
            n = self.pending
        else:
            idx = np.asarray(indices, dtype=np.int64).reshape(-1)
            n = int(idx.size)
            if n and (idx.min() < 0 or idx.max() >= self.pending):
                raise IndexError(
                    f"commit indices {idx.tolist()} outside the {self.pending} pending entries"
                )
            if n and np.any(idx != np.arange(n)):
                gather = mx.array(idx + self.offset, dtype=mx.int32)
                for layer in self.layers:
                    layer.gather_into_place(self.offset, gather)
        self.offset += n
        self.pending = 0
        return self.offset

    def trim(self, n: int) -> int:
        """Forget the last n committed entries."""
        n = min(n, self.offset)
        self.offset -= n
        self.pending = 0
        return n

    def reset(self) -> None:
        self.offset = 0
        self.pending = 0
        self.tokens = []

    def common_prefix(self, ids: Sequence[int]) -> int:
        """How many leading `ids` the cache's `tokens` agree with."""
        n = 0
        for a, b in zip(self.tokens, ids, strict=False):
            if a != b:
                break
            n += 1
        return n

    def hold(self, tokens: Sequence[int]) -> None:
        """Record that the cache holds `tokens`, trimming the entries past them."""
        self.tokens = list(tokens)
        self.trim(self.offset - len(self.tokens))

    def state(self) -> list[mx.array]:
        """Arrays to evaluate together with a step's outputs."""
        return [a for layer in self.layers for a in (layer.keys, layer.values) if a is not None]

    # Batch row operations (continuous batching in `batch.py`)

    def join_rows(self, rows: np.ndarray, other=None, other_rows: np.ndarray | None = None):
        """Keep `rows` of this cache and append `other_rows` of cache `other`, right-aligned at the
        longer length (the shorter is padded on the left with zeros, which stay masked).
        Returns how far the columns of this cache and of `other` moved right."""
        L = self.offset if other is None else max(self.offset, other.offset)
        sources = [(self, rows)] + ([] if other is None else [(other, other_rows)])
        for i, layer in enumerate(self.layers):
            keys, values = [], []
            for src, sel in sources:
                n, idx = src.offset, mx.array(sel, dtype=mx.int32)
                widths = [(0, 0), (0, 0), (L - n, 0), (0, 0)]
                keys.append(mx.pad(src.layers[i].keys[:, :, :n][idx], widths))
                values.append(mx.pad(src.layers[i].values[:, :, :n][idx], widths))
            layer.keys = mx.concatenate(keys, axis=0)
            layer.values = mx.concatenate(values, axis=0)
        shift = L - self.offset
        other_shift = 0 if other is None else L - other.offset
        self.offset = L
        return shift, other_shift

    def drop_columns_before(self, start: np.ndarray) -> np.ndarray:
        """Forget the columns before every row's first one (no row attends to them any more);
        return the rows' first columns after the shift. Without this the cache only grows:
        every join right-aligns at its length."""
        m = int(start.min())
        if m > 0:
            for layer in self.layers:
                layer.keys = layer.keys[:, :, m : self.offset]
                layer.values = layer.values[:, :, m : self.offset]
            self.offset -= m
        return start - m
