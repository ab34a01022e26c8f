"""Candidate sequences -> deduplicated prefix tree: packed tokens, depths, parents, children and the mask.

Host-side numpy: W and L are tiny and the drafter's beams come to the host once per round.
The node order is Apple's (`tree_attention.py:pack`); docs/tree-attention.md has the worked
example.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np


@dataclass(frozen=True, eq=False)
class Tree:
    """A prefix tree over S candidate sequences (drafter beams, lookup continuations); node 0
    is the root g0.

    tokens   int32 (N,)    token of each node
    depths   int32 (N,)    0 for the root
    parents  int32 (N,)    -1 for the root
    paths    int32 (S, L)  packed node index of each sequence position (L = the longest
                           sequence; -1 past a shorter one's end): tokens[paths] == sequences
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
        mask = np.zeros((n, n), dtype=bool)
        # Parents precede their children in node order, so each row extends its parent's.
        for i in range(n):
            p = self.parents[i]
            if p >= 0:
                mask[i] = mask[p]
            mask[i, i] = True
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
    return pack_sequences(beams.tolist())


def pack_sequences(sequences: Sequence[Sequence[int]]) -> Tree:
    """Deduplicate shared prefixes of token sequences of any lengths into a prefix tree.

    Every sequence starts with the root token. Nodes are numbered in the order their prefix
    is first seen walking the sequences one by one, position by position (Apple's order for
    equal-length beams). `paths` is (S, max length), padded with -1 after a short sequence.
    """
    if len(sequences) < 1 or any(len(s) < 1 for s in sequences):
        raise ValueError("sequences must be a non-empty list of non-empty token sequences")
    root = int(sequences[0][0])
    if any(int(s[0]) != root for s in sequences):
        raise ValueError(
            f"all sequences must share the root token, got {[int(s[0]) for s in sequences]}"
        )
    length = max(len(s) for s in sequences)
    paths = np.full((len(sequences), length), -1, dtype=np.int32)
    node_of: dict[tuple[int, ...], int] = {}
    tokens: list[int] = []
    depths: list[int] = []
    parents: list[int] = []
    for row, seq in enumerate(sequences):
        prefix: tuple[int, ...] = ()
        parent = -1
        for depth, token in enumerate(seq):
            prefix = (*prefix, int(token))
            node = node_of.get(prefix)
            if node is None:
                node = node_of[prefix] = len(tokens)
                tokens.append(int(token))
                depths.append(depth)
                parents.append(parent)
            paths[row, depth] = node
            parent = node
    tokens_np = np.array(tokens, dtype=np.int32)
    parents_np = np.array(parents, dtype=np.int32)
    num_nodes = len(tokens)

    # Children in node order: a stable sort by parent keeps node order within each parent.
    kids = np.flatnonzero(parents_np >= 0)
    kids = kids[np.argsort(parents_np[kids], kind="stable")]
    counts = np.bincount(parents_np[kids], minlength=num_nodes)
    first = np.cumsum(counts) - counts  # (N,) start of each parent's run in `kids`
    slot = np.arange(kids.shape[0]) - first[parents_np[kids]]
    children = np.full((num_nodes, max(1, int(counts.max(initial=0)))), -1, dtype=np.int32)
    children[parents_np[kids], slot] = kids

    return Tree(
        tokens=tokens_np,
        depths=np.array(depths, dtype=np.int32),
        parents=parents_np,
        paths=paths,
        children=children,
    )
