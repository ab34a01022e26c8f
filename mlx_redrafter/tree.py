"""Beams -> deduplicated prefix tree: packed tokens, depths, parents, children and the mask.

Host-side numpy: W and L are tiny and the drafter's beams come to the host once per round.
The node order is Apple's (`tree_attention.py:pack`); docs/tree-attention.md has the worked
example.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np


@dataclass(frozen=True, eq=False)
class Tree:
    """A prefix tree over W beams of length L; node 0 is the root g0.

    tokens   int32 (N,)    token of each node
    depths   int32 (N,)    0 for the root
    parents  int32 (N,)    -1 for the root
    paths    int32 (W, L)  packed node index of each beam position: tokens[paths] == beams
    children int32 (N, C)  children of each node in node order, padded with -1; C >= 1
    """

    tokens: np.ndarray
    depths: np.ndarray
    parents: np.ndarray
    paths: np.ndarray
    children: np.ndarray

    @property
    def num_nodes(self) -> int:
        return int(self.tokens.shape[0])

    def positions(self, offset: int) -> np.ndarray:
        """Sequence positions of the nodes when the root sits at `offset`. int32 (N,)"""
        return (offset + self.depths).astype(np.int32)

    def ancestor_mask(self) -> np.ndarray:
        """bool (N, N): [i, j] is True iff node j is node i or one of its ancestors."""
        n = self.num_nodes
        _, length = self.paths.shape
        # Every node lies on some beam, and along a beam the ancestors of position k are the
        # positions j <= k, so the (row, col) pairs of all beams cover the relation exactly.
        rows = np.broadcast_to(self.paths[:, :, None], (*self.paths.shape, length))
        cols = np.broadcast_to(self.paths[:, None, :], (*self.paths.shape, length))
        lower = np.tril(np.ones((length, length), dtype=bool))  # (L, L), j <= k
        mask = np.zeros((n, n), dtype=bool)
        mask[rows[:, lower], cols[:, lower]] = True
        return mask

    def attention_mask(self, offset: int) -> mx.array:
        """bool (1, 1, N, offset + N), True = attend: every committed column, then the
        ancestor-or-self block over the packed nodes."""
        n = self.num_nodes
        block = mx.array(self.ancestor_mask())
        if offset > 0:
            block = mx.concatenate([mx.ones((n, offset), dtype=mx.bool_), block], axis=1)
        return block[None, None]


def pack_beams(beams: np.ndarray) -> Tree:
    """Deduplicate shared prefixes of `beams` (W, L) into a prefix tree.

    All rows must start with the same root token. Nodes are numbered in the order their
    prefix is first seen walking the beams row by row, position by position.
    """
    beams = np.asarray(beams)
    if beams.ndim != 2 or beams.shape[0] < 1 or beams.shape[1] < 1:
        raise ValueError(f"beams must be a non-empty (W, L) array, got shape {beams.shape}")
    if not np.issubdtype(beams.dtype, np.integer):
        raise ValueError(f"beams must hold integer token ids, got dtype {beams.dtype}")
    if np.any(beams[:, 0] != beams[0, 0]):
        raise ValueError(f"all beams must share the root token, got {beams[:, 0].tolist()}")
    width, length = beams.shape

    # same[i, j, k]: beams i and j agree on positions 0..k.
    same = np.cumprod(beams[:, None, :] == beams[None, :, :], axis=-1).astype(bool)  # (W, W, L)
    owner = np.argmax(same, axis=1)  # (W, L): first beam holding the same prefix
    is_new = owner == np.arange(width)[:, None]  # (W, L): this beam emits the node
    # np.nonzero walks row by row, position by position: Apple's node order.
    node_rows, node_cols = np.nonzero(is_new)
    num_nodes = node_rows.shape[0]
    node_of = np.full((width, length), -1, dtype=np.int64)
    node_of[node_rows, node_cols] = np.arange(num_nodes)
    # An owner emits its own prefix (a beam matching the owner's prefix matches ours too).
    paths = node_of[owner, np.arange(length)[None, :]]  # (W, L)

    tokens = beams[node_rows, node_cols]
    depths = node_cols
    parents = np.full(num_nodes, -1, dtype=np.int64)
    deep = node_cols > 0
    parents[deep] = paths[node_rows[deep], node_cols[deep] - 1]

    # Children in node order: a stable sort by parent keeps node order within each parent.
    kids = np.flatnonzero(parents >= 0)
    kids = kids[np.argsort(parents[kids], kind="stable")]
    counts = np.bincount(parents[kids], minlength=num_nodes)
    first = np.cumsum(counts) - counts  # (N,) start of each parent's run in `kids`
    slot = np.arange(kids.shape[0]) - first[parents[kids]]
    children = np.full((num_nodes, max(1, int(counts.max(initial=0)))), -1, dtype=np.int32)
    children[parents[kids], slot] = kids

    return Tree(
        tokens=tokens.astype(np.int32),
        depths=depths.astype(np.int32),
        parents=parents.astype(np.int32),
        paths=paths.astype(np.int32),
        children=children,
    )
