"""Sampled drafting without replacement (Recursive Speculative Decoding, arXiv 2402.14160).

Two ways to draw a draft tree from the drafter's own warped distribution q, for B independent
trees at once, keeping q for every expanded node (the acceptance in `rsd.py` needs it):

- Gumbel-Top-k (`gumbel_topk_tree`): at every node of level d, the b_d largest of
  log q + Gumbel noise: b_d distinct children, a sample without replacement from q.
- Stochastic Beam Search (`stochastic_beam_tree`): beam search on Gumbel-perturbed sequence
  log-probabilities, each node's children perturbations conditioned on their parent's
  (Kool et al. 2019), so that the W kept prefixes of every level are a sample without
  replacement of sequences; unlikely branches drop out early.

Every node any level kept stays in the tree (not only the prefixes of the last level's
beams): whether a node is kept then depends only on draws made before it among its siblings,
never on its own token, which is what makes each sibling's proposal q minus the earlier
siblings, renormalised (docs/tree-attention.md). The drafter is reached through a step
function (`RecurrentStep` for the RNN drafter); tests drive the same code with tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import mlx.core as mx
import numpy as np

from .accept import SamplingConfig, process_logits, warp_candidates

GUMBEL_TOPK = "gumbel-topk"
STOCHASTIC_BEAM = "sbs"
DRAFT_METHODS = (GUMBEL_TOPK, STOCHASTIC_BEAM)
ROOT_TOP = 16


class DraftStep(Protocol):
    """The drafter as the samplers see it. `vocab_ids` (K,) maps head columns to token ids
    (None: the head covers the vocabulary)."""

    vocab_ids: mx.array | None

    def start(self, batch: int) -> mx.array:
        """The state before the root token: (B, 1, ...)."""

    def __call__(self, state: mx.array, tokens: mx.array) -> tuple[mx.array, mx.array]:
        """state (B, n, ...) and the n nodes' tokens (B, n) -> (their state, float32 head
        logits (B, n, K) for their children)."""


class RecurrentStep:
    """`DraftStep` for the recurrent drafter: s_t = rnn(s_{t-1}, E[x]), logits = head(c, s_t)."""

    def __init__(self, drafter, base_model, context: mx.array):
        self.drafter = drafter
        self.base_model = base_model
        self.context = context.reshape(1, 1, -1).astype(drafter.dtype)  # (1, 1, context)
        self.context_term = drafter.context_term(self.context)  # None unless rnn_context
        self.vocab_ids = drafter.draft_vocab_ids

    def start(self, batch: int) -> mx.array:
        return self.drafter.initial_state(batch)[:, None, :]  # (B, 1, h)

    def __call__(self, state: mx.array, tokens: mx.array) -> tuple[mx.array, mx.array]:
        emb = self.base_model.embed(tokens)
        state = self.drafter.next_state(state, emb, self.context_term)  # (B, n, h)
        return state, self.drafter.head(self.context, state).astype(mx.float32)


@dataclass
class SampledDraft:
    """B draft trees drawn without replacement; node 0 is the root g0, nodes in level order.

    tokens  int32 (B, M)  token of each node
    parents int32 (B, M)  parent node (-1 for the root)
    ranks   int32 (B, M)  the node's place among its parent's draws (0 = drawn first)
    valid   bool  (B, M)  False where q had no token left to draw (top-k/top-p, a tiny vocab)
    depths  int32 (M,)    level of each node (the same in every tree)
    logq    float32 (B, E, K) on the device: the warped drafter log-probs of nodes 0..E-1,
            every node above the last level, over the head's K columns
    vocab_ids int32 (K,) or None: the token id of each head column
    root_top float32 (B, R): the R largest probabilities of the root's q, descending (what
            the tree sizing may know before it looks at any drawn token)
    """

    tokens: np.ndarray
    parents: np.ndarray
    ranks: np.ndarray
    valid: np.ndarray
    depths: np.ndarray
    logq: mx.array
    vocab_ids: mx.array | None
    root_top: np.ndarray

    @property
    def num_expanded(self) -> int:
        return int(self.logq.shape[1])

    def prefixes(self, b: int = 0) -> list[tuple[int, ...] | None]:
        """Token sequence from the root to each node of tree b (None for invalid nodes)."""
        out: list[tuple[int, ...] | None] = []
        for j in range(self.tokens.shape[1]):
            parent = int(self.parents[b, j])
            if not self.valid[b, j]:
                out.append(None)
            elif parent < 0:
                out.append((int(self.tokens[b, j]),))
            else:
                out.append(out[parent] + (int(self.tokens[b, j]),))
        return out


def _take_rows(x: mx.array, index: mx.array) -> mx.array:
    """x (B, n, ...) and index (B, m) -> x[b, index[b, i]] as (B, m, ...)."""
    batch, n = x.shape[:2]
    flat = x.reshape(batch * n, *x.shape[2:])
    rows = (index + mx.arange(batch, dtype=mx.int32)[:, None] * n).reshape(-1)
    return flat[rows].reshape(batch, index.shape[1], *x.shape[2:])


def _warp(logits: mx.array, sampling: SamplingConfig) -> mx.array:
    """The drafter's q (..., K): its logits warped as the target's are. With top-k/top-p,
    over the candidates `warp_candidates` keeps (no sort of K, no host sync): where their
    top-p mass falls short this is the warp of the most likely candidates, a slightly
    different q, which is fine: the acceptance only needs the q the draws came from."""
    k = logits.shape[-1]
    if sampling.greedy or not (0 < sampling.top_k < k or sampling.top_p < 1.0):
        return process_logits(logits, sampling)
    flat = logits.reshape(-1, k)
    ids, logprobs, _ = warp_candidates(flat, sampling)
    dense = mx.full(flat.shape, -mx.inf, mx.float32)
    return mx.put_along_axis(dense, ids, logprobs, axis=-1).reshape(logits.shape)


def _log1mexp(a: mx.array) -> mx.array:
    """log(1 - exp(a)) for a <= 0, accurate on both sides of -log 2."""
    a = mx.minimum(a, 0.0)
    near = mx.log(-mx.expm1(mx.minimum(a, -1e-30)))
    far = mx.log1p(-mx.exp(a))
    return mx.where(a > -0.6931472, near, far)


def _conditioned_gumbels(perturbed: mx.array, parent_value: mx.array) -> mx.array:
    """Shift Gumbels G (B, n, K) so that each row's maximum becomes its parent's perturbed
    value T (B, n): -log(exp(-T) - exp(-Z) + exp(-G)), Z the row maximum, in a stable form.
    Monotone within a row, so the order of the children is unchanged."""
    top = mx.max(perturbed, axis=-1, keepdims=True)
    t = parent_value[..., None]
    v = t - perturbed + _log1mexp(perturbed - top)
    shifted = t - mx.maximum(v, 0.0) - mx.log1p(mx.exp(-mx.abs(v)))
    return mx.where(perturbed == -mx.inf, -mx.inf, shifted)


def _top_sorted(scores: mx.array, k: int) -> mx.array:
    """Indices (..., k) of the k largest entries of the last axis, largest first."""
    k = min(k, scores.shape[-1])
    idx = mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k]
    order = mx.argsort(-mx.take_along_axis(scores, idx, axis=-1), axis=-1)
    return mx.take_along_axis(idx, order, axis=-1).astype(mx.int32)


def _token_ids(step: DraftStep, columns: mx.array) -> mx.array:
    return columns if step.vocab_ids is None else step.vocab_ids[columns]


def _finish(levels: list[tuple], logq: list[mx.array], step: DraftStep) -> SampledDraft:
    """Stack per-level (tokens, parents, ranks, valid) (B, n_d) into one node numbering
    (parents are level-local on input) and bring them to the host in one sync."""
    offsets = np.cumsum([0] + [lv[0].shape[1] for lv in levels])
    parts = [[], [], [], []]
    for d, (tokens, parents, ranks, valid) in enumerate(levels):
        parent_offset = offsets[d - 1] if d > 0 else 0
        parts[0].append(tokens)
        parts[1].append(parents + int(parent_offset) if d > 0 else parents)
        parts[2].append(ranks)
        parts[3].append(valid)
    stacked = [mx.concatenate(p, axis=1) for p in parts]
    logq_all = mx.concatenate(logq, axis=1)  # (B, E, K)
    top = mx.exp(mx.topk(logq_all[:, 0], min(ROOT_TOP, logq_all.shape[-1]), axis=-1))
    top = -mx.sort(-top, axis=-1)  # (B, R)
    mx.eval(*stacked, logq_all, top)
    depths = np.concatenate([np.full(lv[0].shape[1], d) for d, lv in enumerate(levels)])
    tokens, parents, ranks, valid = (np.array(a) for a in stacked)
    return SampledDraft(
        tokens.astype(np.int32),
        parents.astype(np.int32),
        ranks.astype(np.int32),
        valid.astype(bool),
        depths.astype(np.int32),
        logq_all,
        step.vocab_ids,
        np.array(top),
    )


def _root_level(g0: mx.array, batch: int) -> tuple:
    tokens = mx.broadcast_to(g0.reshape(1, 1).astype(mx.int32), (batch, 1))
    minus = mx.full((batch, 1), -1, mx.int32)
    return tokens, minus, mx.zeros((batch, 1), mx.int32), mx.ones((batch, 1), mx.bool_)


def gumbel_topk_tree(
    step: DraftStep,
    g0: int | mx.array,
    branching: tuple[int, ...],
    sampling: SamplingConfig,
    batch: int = 1,
    key: mx.array | None = None,
) -> SampledDraft:
    """Draft B trees whose nodes at level d have branching[d] children each, drawn without
    replacement from q by Gumbel-Top-k (len(branching) levels below the root)."""
    if not branching or min(branching) < 1:
        raise ValueError(f"branching must be positive counts per level, got {branching}")
    keys = mx.random.split(key, len(branching)) if key is not None else [None] * len(branching)
    g0 = mx.array(g0) if not isinstance(g0, mx.array) else g0
    levels = [_root_level(g0, batch)]
    state = step.start(batch)
    logq_levels = []
    for d, width in enumerate(branching):
        tokens, _, _, valid = levels[-1]
        state, logits = step(state, tokens)
        logq = _warp(logits, sampling)  # (B, n, K)
        logq_levels.append(logq)
        n = logq.shape[1]
        noise = mx.random.gumbel(shape=logq.shape, key=keys[d])
        columns = _top_sorted(logq + noise, width)  # (B, n, b)
        b = columns.shape[-1]
        drawn = mx.take_along_axis(logq, columns, axis=-1) > -mx.inf
        child_valid = (drawn & valid[..., None]).reshape(batch, n * b)
        parents = mx.broadcast_to(mx.arange(n, dtype=mx.int32)[None, :, None], (batch, n, b))
        ranks = mx.broadcast_to(mx.arange(b, dtype=mx.int32), (batch, n, b))
        levels.append(
            (
                _token_ids(step, columns).reshape(batch, n * b),
                parents.reshape(batch, n * b),
                ranks.reshape(batch, n * b),
                child_valid,
            )
        )
        state = mx.repeat(state, b, axis=1)  # (B, n * b, ...): each child starts from its parent
    return _finish(levels, logq_levels, step)


def stochastic_beam_tree(
    step: DraftStep,
    g0: int | mx.array,
    beam_width: int,
    beam_length: int,
    sampling: SamplingConfig,
    batch: int = 1,
    key: mx.array | None = None,
) -> SampledDraft:
    """Stochastic Beam Search: W prefixes per level drawn without replacement from q's
    sequence distribution (beam_length counts the root, as in `beam_search`). Every kept
    prefix of every level is a node."""
    if beam_width < 1 or beam_length < 2:
        raise ValueError(
            f"stochastic beam search needs beam_width >= 1 and beam_length >= 2 (the root "
            f"counts), got {beam_width} x {beam_length}"
        )
    keys = mx.random.split(key, beam_length - 1) if key is not None else [None] * beam_length
    g0 = mx.array(g0) if not isinstance(g0, mx.array) else g0
    levels = [_root_level(g0, batch)]
    state = step.start(batch)
    phi = mx.zeros((batch, 1), mx.float32)  # log q of each live prefix
    value = mx.zeros((batch, 1), mx.float32)  # its perturbed log-prob
    logq_levels = []
    for d in range(beam_length - 1):
        tokens, _, _, valid = levels[-1]
        state, logits = step(state, tokens)
        logq = _warp(logits, sampling)  # (B, n, K)
        logq_levels.append(logq)
        n, k = logq.shape[1], logq.shape[2]
        child_phi = mx.where(valid[..., None], phi[..., None] + logq, -mx.inf)  # (B, n, K)
        noise = mx.random.gumbel(shape=logq.shape, key=keys[d])
        perturbed = _conditioned_gumbels(child_phi + noise, value)
        flat = _top_sorted(perturbed.reshape(batch, n * k), beam_width)  # (B, W)
        parents, columns = flat // k, flat % k
        kept_value = mx.take_along_axis(perturbed.reshape(batch, n * k), flat, axis=-1)
        phi = mx.take_along_axis(child_phi.reshape(batch, n * k), flat, axis=-1)
        child_valid = kept_value > -mx.inf
        # Kept siblings are their parent's best draws, best first: rank = earlier same-parent.
        same = parents[:, :, None] == parents[:, None, :]  # (B, W, W)
        earlier = mx.arange(flat.shape[1])[:, None] > mx.arange(flat.shape[1])[None, :]
        ranks = mx.sum(same & earlier, axis=-1).astype(mx.int32)
        levels.append((_token_ids(step, columns), parents.astype(mx.int32), ranks, child_valid))
        value = mx.where(child_valid, kept_value, -mx.inf)
        state = _take_rows(state, parents.astype(mx.int32))
    return _finish(levels, logq_levels[: beam_length - 1], step)
