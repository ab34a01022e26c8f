"""Acceptance over a verified prefix tree: greedy, and exact sampling with deterministic children.

Also owns how tokens are drawn (`SamplingConfig`) and the warped target distribution
(`process_logits`), so plain sampling, tree acceptance and sampled drafts (rsd.py) share one
definition. docs/tree-attention.md walks through the rules.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .env import fast_path
from .errors import GenerationError
from .model import fast_exp, fast_kernels_available
from .tree import Tree

_NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn, the one description that plain sampling, tree acceptance and
    sampled drafting share. Fields (and constructor arguments) in the order temperature
    (0 = greedy), top_p (1.0 = off), top_k (0 = off); `process_logits` applies them."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1

    def validate(self) -> None:
        if self.temperature < 0:
            raise GenerationError(
                f"temperature must be >= 0, got {self.temperature}", param="temperature"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0, got {self.top_k}", param="top_k")


def _fast_cpu(x: mx.array) -> bool:
    """float32 work on the CPU goes through the compiled exp (see model.py): MLX's own CPU exp
    costs ~25 ns an element, and warping a vocabulary per node is mostly exp."""
    return (
        x.dtype == mx.float32
        and mx.default_device() == mx.cpu
        and fast_path()
        and fast_kernels_available()
    )


def _exp(x: mx.array) -> mx.array:
    return fast_exp(x) if _fast_cpu(x) else mx.exp(x)


def _logsumexp(x: mx.array, axis: int = -1, keepdims: bool = False) -> mx.array:
    """mx.logsumexp through `_exp`; rows of -inf give -inf."""
    if not _fast_cpu(x):
        return mx.logsumexp(x, axis=axis, keepdims=keepdims)
    top = mx.max(x, axis=axis, keepdims=True)
    top = mx.where(mx.isinf(top), mx.array(0.0, x.dtype), top)
    out = mx.log(mx.sum(fast_exp(x - top), axis=axis, keepdims=True)) + top
    return out if keepdims else mx.squeeze(out, axis)


@dataclass
class Acceptance:
    """Outcome of one round.

    path   int32 (n+1,)  packed node indices from the root (0) to the last accepted node
    tokens list of n+1   the drafted tokens along path[1:], then the target's own token
    """

    path: np.ndarray
    tokens: list[int]

    @property
    def num_accepted(self) -> int:
        return len(self.path) - 1


@dataclass
class AcceptanceBatch:
    """S independent outcomes for one tree (statistical tests), padded with -1 to length L.

    paths        int32 (S, L)  as Acceptance.path, row s valid up to num_accepted[s]
    tokens       int32 (S, L)  as Acceptance.tokens, row s valid up to num_accepted[s]
    num_accepted int32 (S,)
    """

    paths: np.ndarray
    tokens: np.ndarray
    num_accepted: np.ndarray

    def __len__(self) -> int:
        return int(self.num_accepted.shape[0])

    def __getitem__(self, s: int) -> Acceptance:
        n = int(self.num_accepted[s])
        return Acceptance(self.paths[s, : n + 1].copy(), self.tokens[s, : n + 1].tolist())


# ---------------------------------------------------------------------------------------------
# The target distribution


def process_logits(logits: mx.array, sampling: SamplingConfig) -> mx.array:
    """Warp logits (..., V) into float32 log-probabilities (..., V); removed tokens get -inf.

    Order: temperature (divides the logits), then top-k (keep the k largest; 0 = off),
    then top-p (keep the smallest most-likely set whose mass is >= p, always at least the top
    token; 1.0 = off). temperature <= 0 gives the one-hot argmax distribution.
    """
    temperature, top_p, top_k = sampling.temperature, sampling.top_p, sampling.top_k
    logits = logits.astype(mx.float32)
    vocab = logits.shape[-1]
    if sampling.greedy:
        best = mx.argmax(logits, axis=-1, keepdims=True)
        hot = mx.arange(vocab) == best
        return mx.where(hot, mx.array(0.0, mx.float32), mx.array(_NEG_INF, mx.float32))
    logits = logits / temperature
    if 0 < top_k < vocab:
        # Indices past the k-th after a partition of the negated logits are the V-k smallest.
        drop = mx.argpartition(-logits, kth=top_k - 1, axis=-1)[..., top_k:]
        logits = mx.put_along_axis(logits, drop, mx.array(_NEG_INF, mx.float32), axis=-1)
    logprobs = logits - _logsumexp(logits, axis=-1, keepdims=True)
    if top_p < 1.0:
        ranked = -mx.sort(-logprobs, axis=-1)  # (..., V) descending
        threshold, _ = _top_p_cut(ranked, top_p)
        logprobs = mx.where(logprobs >= threshold, logprobs, mx.array(_NEG_INF, mx.float32))
        logprobs = logprobs - _logsumexp(logprobs, axis=-1, keepdims=True)
    return logprobs


def _top_p_cut(ranked: mx.array, top_p: float) -> tuple[mx.array, mx.array]:
    """ranked (..., K): log-probabilities sorted descending (a prefix of the vocabulary's).

    Returns (threshold (..., 1), decided (...)): top-p keeps every token whose
    log-probability is >= threshold, the last of the smallest most-likely run whose mass
    reaches top_p (ties with it included, so the set does not depend on the sort order).
    `decided` is False where the K values hold less than top_p mass and nothing after them is
    known to be dropped: the cut may then lie beyond the prefix.
    """
    probs = _exp(ranked)
    mass_before = mx.cumsum(probs, axis=-1) - probs
    num_kept = mx.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1: mass_before[0] = 0
    threshold = mx.take_along_axis(ranked, num_kept - 1, axis=-1)
    decided = (num_kept[..., 0] < ranked.shape[-1]) & (ranked[..., -1] < threshold[..., 0])
    return threshold, decided


# Candidates kept per node when top-p alone truncates the distribution: top-p needs only the
# most likely tokens, ordered, whenever they hold top_p of the mass; a round falls back to the
# full sort when they do not.
TOP_P_CANDIDATES = 256


def warp_candidates(
    logits: mx.array, sampling: SamplingConfig
) -> tuple[mx.array, mx.array, mx.array]:
    """`process_logits` restricted to the tokens it can keep, for top-k and/or top-p.

    logits (N, V) -> (ids int32 (N, K), logprobs float32 (N, K) with -inf for dropped
    candidates, decided bool (N,)). Where decided, exp(logprobs) at ids is exactly the
    distribution `process_logits` gives (every other token has probability 0); elsewhere
    (top-p mass beyond the K candidates) use `process_logits`. A partial selection
    (argpartition) and a sort of K values replace the sort of the whole vocabulary.
    """
    temperature, top_p, top_k = sampling.temperature, sampling.top_p, sampling.top_k
    logits = logits.astype(mx.float32) / temperature
    vocab = logits.shape[-1]
    truncated = 0 < top_k < vocab
    k = top_k if truncated else min(vocab, TOP_P_CANDIDATES)
    if k < vocab:
        ids = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k]
    else:
        ids = mx.broadcast_to(mx.arange(vocab), logits.shape)
    values = mx.take_along_axis(logits, ids, axis=-1)
    order = mx.argsort(-values, axis=-1)
    ids = mx.take_along_axis(ids, order, axis=-1).astype(mx.int32)
    values = mx.take_along_axis(values, order, axis=-1)  # (N, K) descending
    # The normaliser is over what survives top-k: the candidates themselves, or everything.
    norm = values if truncated or k == vocab else logits
    logprobs = values - _logsumexp(norm, axis=-1, keepdims=True)
    decided = mx.ones(logprobs.shape[:-1], mx.bool_)
    if top_p < 1.0:
        threshold, decided = _top_p_cut(logprobs, top_p)
        decided = decided | truncated | (k == vocab)
        logprobs = mx.where(logprobs >= threshold, logprobs, mx.array(_NEG_INF, mx.float32))
        logprobs = logprobs - _logsumexp(logprobs, axis=-1, keepdims=True)
    return ids, logprobs, decided


def dense_logprobs(logits: mx.array, sampling: SamplingConfig) -> mx.array:
    """`process_logits` (..., V), through `warp_candidates` when top-k or top-p truncate: a
    partial selection instead of a sort of the vocabulary (one host sync to check that the
    candidates decided every row; the full sort otherwise)."""
    vocab = logits.shape[-1]
    if sampling.greedy or not (0 < sampling.top_k < vocab or sampling.top_p < 1.0):
        return process_logits(logits, sampling)
    shape = logits.shape
    flat = logits.reshape(-1, vocab)
    ids, logprobs, decided = warp_candidates(flat, sampling)
    if not mx.all(decided).item():
        return process_logits(logits, sampling)
    dense = mx.full(flat.shape, _NEG_INF, mx.float32)
    return mx.put_along_axis(dense, ids, logprobs, axis=-1).reshape(shape)


def sample_token(
    logits: mx.array, sampling: SamplingConfig, key: mx.array | None = None
) -> mx.array:
    """Plain sampling from `process_logits`; logits (..., V) -> int32 token ids (...)."""
    if sampling.greedy:
        return mx.argmax(logits, axis=-1).astype(mx.int32)
    logprobs = process_logits(logits, sampling)
    return mx.random.categorical(logprobs, axis=-1, key=key).astype(mx.int32)


# ---------------------------------------------------------------------------------------------
# Greedy


def greedy_accept(tree: Tree, logits: mx.array) -> Acceptance:
    """Follow the target's argmax from the root while a child carries it.

    logits (N, V): row u is the target's distribution for the token after node u.
    Token-identical to plain greedy decoding by construction.
    """
    _check_logits(tree, logits)
    best = np.array(mx.argmax(logits, axis=-1))  # (N,), the one host sync
    child_tokens = _child_tokens(tree)
    path = [0]
    while True:
        u = path[-1]
        hit = np.flatnonzero(child_tokens[u] == best[u])
        if hit.size == 0:
            break
        path.append(int(tree.children[u, hit[0]]))
    return _acceptance(tree, np.array(path, dtype=np.int32), int(best[path[-1]]))


# ---------------------------------------------------------------------------------------------
# Sampling


def uniforms_shape(tree: Tree) -> tuple[int, int]:
    """Shape of the pre-drawn uniforms for one round: (N, C + 1).

    Column c < C decides child slot c of each node; column C draws the emitted token when no
    child is accepted.
    """
    return tree.num_nodes, tree.children.shape[1] + 1


def sample_accept(
    tree: Tree, logits: mx.array, sampling: SamplingConfig, uniforms: mx.array | None = None
) -> Acceptance:
    """Exact speculative sampling over the tree (deterministic-children rule).

    At node u with r = the warped target distribution p(u) and children x_1..x_k in node
    order: accept x_i with probability r(x_i); on rejection zero r(x_i) and renormalise; if
    no child is accepted, emit a token drawn from the final r (at a leaf that is p(u)).
    The emitted sequence has exactly the distribution of plain sampling from p.

    logits (N, V); uniforms in [0, 1) with shape `uniforms_shape(tree)`, drawn here if None.
    """
    if uniforms is None:
        uniforms = mx.random.uniform(shape=uniforms_shape(tree))
    if tuple(uniforms.shape) != uniforms_shape(tree):
        raise ValueError(
            f"uniforms must have shape {uniforms_shape(tree)} (nodes, child slots + 1), "
            f"got {tuple(uniforms.shape)}"
        )
    batch = sample_accept_batch(tree, logits, sampling, uniforms[None])
    return batch[0]


def sample_accept_batch(
    tree: Tree, logits: mx.array, sampling: SamplingConfig, uniforms: mx.array
) -> AcceptanceBatch:
    """`sample_accept` for S independent draws at once: uniforms (S, N, C + 1)."""
    _check_logits(tree, logits)
    expected = (None, *uniforms_shape(tree))
    if uniforms.ndim != 3 or tuple(uniforms.shape[1:]) != expected[1:]:
        raise ValueError(
            f"uniforms must have shape (S, {expected[1]}, {expected[2]}), "
            f"got {tuple(uniforms.shape)}"
        )
    uniforms = uniforms.astype(mx.float32)
    vocab = logits.shape[-1]
    if not sampling.greedy and (0 < sampling.top_k < vocab or sampling.top_p < 1.0):
        # Only the candidates top-k/top-p can keep: no sort or cumsum over the vocabulary.
        ids, logprobs, decided = warp_candidates(logits, sampling)
        outcome = mx.stack(_node_outcomes(tree, logprobs, uniforms, ids))
        decided = mx.all(decided)
        mx.eval(outcome, decided)  # the one host sync
        if decided.item():
            outcome = np.array(outcome)
            return _walk_batch(tree, outcome[0], outcome[1])
        # Some node's top-p mass lies beyond its candidates: the whole-vocabulary path.
    logprobs = process_logits(logits, sampling)
    chosen, fallback = _node_outcomes(tree, logprobs, uniforms)
    outcome = np.array(mx.stack([chosen, fallback]))  # (2, S, N), the one host sync
    return _walk_batch(tree, outcome[0], outcome[1])


def _node_outcomes(
    tree: Tree, logprobs: mx.array, uniforms: mx.array, ids: mx.array | None = None
) -> tuple[mx.array, mx.array]:
    """Per sample and node: the accepted child (node index, -1 if none) and the token to emit
    if no child is accepted. logprobs (N, V) float32, uniforms (S, N, C + 1).

    With ids (N, K), logprobs (N, K) covers only those tokens (`warp_candidates`; every other
    token has probability 0) and the work is over K columns instead of V.
    """
    n, vocab = logprobs.shape  # vocab: the columns, V or K
    num_slots = tree.children.shape[1]
    child_tokens = mx.array(_child_tokens(tree))  # (N, C), -1 padding
    valid = child_tokens >= 0
    if ids is not None:
        # Column of each child's token among the node's candidates (none: probability 0).
        hit = (child_tokens[:, :, None] == ids[:, None, :]) & valid[:, :, None]  # (N, C, K)
        valid = mx.any(hit, axis=-1)
        child_tokens = mx.argmax(hit.astype(mx.int32), axis=-1)
    # Padding points at an extra -inf column so gathers and scatters through it are harmless.
    padded = mx.concatenate([logprobs, mx.full((n, 1), _NEG_INF, mx.float32)], axis=1)
    index = mx.where(valid, child_tokens, vocab)  # (N, C)
    child_lp = mx.take_along_axis(padded, index, axis=1)  # (N, C)
    rest = mx.put_along_axis(padded, index, mx.array(_NEG_INF, mx.float32), axis=1)[:, :vocab]
    rest_lse = _logsumexp(rest, axis=1)  # (N,) log mass outside every child

    # After rejecting slots < c, r is p restricted to {x_c, ..., x_C} and the rest, so
    # r(x_c) = p(x_c) / (p(x_c) + ... + p(x_C) + rest). Summing what remains (in log space)
    # instead of subtracting what was removed avoids cancellation when r is nearly spent.
    remaining = rest_lse
    accept_prob = [None] * num_slots
    for c in reversed(range(num_slots)):
        remaining = mx.logaddexp(remaining, child_lp[:, c])
        ratio = mx.exp(child_lp[:, c] - remaining)
        accept_prob[c] = mx.where(child_lp[:, c] == _NEG_INF, 0.0, ratio)
    accept_prob = mx.stack(accept_prob, axis=1)  # (N, C)

    accepted = uniforms[..., :num_slots] < accept_prob  # (S, N, C)
    any_accepted = mx.any(accepted, axis=-1)
    first_slot = mx.argmax(accepted.astype(mx.int32), axis=-1)  # first True
    child_node = mx.take_along_axis(
        mx.broadcast_to(mx.array(tree.children), (*first_slot.shape, num_slots)),
        first_slot[..., None],
        axis=-1,
    )[..., 0]
    chosen = mx.where(any_accepted, child_node, -1).astype(mx.int32)

    # Emitted token when every child is rejected: the residual r = the rest, renormalised.
    # If it holds no mass (only possible through rounding or u == 1), fall back to p.
    source = mx.where((rest_lse == _NEG_INF)[:, None], logprobs, rest)
    shifted = _exp(source - mx.max(source, axis=1, keepdims=True))  # (N, V), max is 1
    cdf = mx.cumsum(shifted, axis=1)
    target = uniforms[..., num_slots] * cdf[:, -1]  # (S, N)
    token = mx.sum(cdf <= target[..., None], axis=-1)  # first index with cdf > target
    # u * total can round up to total; never step past the last token with mass.
    last = vocab - 1 - mx.argmax((shifted > 0)[:, ::-1].astype(mx.int32), axis=1)
    fallback = mx.minimum(token, last).astype(mx.int32)  # (S, N), a column
    if ids is not None:
        fallback = mx.take_along_axis(ids, fallback.T, axis=1).T  # the column's token
    return chosen, fallback


def walk_chosen(chosen: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Follow `chosen` (S, N: each node's accepted child, -1 for none) from the root for every
    sample: the paths (S, length; -1 past the end), the node each walk stopped at (S,) and
    the number of accepted drafted tokens (S,)."""
    rows = np.arange(chosen.shape[0])
    paths = np.full((chosen.shape[0], length), -1, dtype=np.int32)
    paths[:, 0] = 0
    node = np.zeros(chosen.shape[0], dtype=np.int64)
    alive = np.ones(chosen.shape[0], dtype=bool)
    for depth in range(1, length):
        nxt = chosen[rows, node]
        alive &= nxt >= 0
        node = np.where(alive, nxt, node)
        paths[alive, depth] = node[alive]
    num_accepted = (paths >= 0).sum(axis=1).astype(np.int32) - 1
    return paths, node, num_accepted


def _walk_batch(tree: Tree, chosen: np.ndarray, fallback: np.ndarray) -> AcceptanceBatch:
    """Follow `chosen` (S, N) from the root for every sample; emit `fallback` where it stops."""
    samples = chosen.shape[0]
    length = tree.paths.shape[1]
    rows = np.arange(samples)
    paths, node, num_accepted = walk_chosen(chosen, length)
    tokens = np.full((samples, length), -1, dtype=np.int32)
    drafted = paths[:, 1:] >= 0
    tokens[:, :-1][drafted] = tree.tokens[paths[:, 1:][drafted]]
    tokens[rows, num_accepted] = fallback[rows, node]
    return AcceptanceBatch(paths, tokens, num_accepted)


# ---------------------------------------------------------------------------------------------
# Helpers


def _child_tokens(tree: Tree) -> np.ndarray:
    """int32 (N, C): token of each child slot, -1 for padding."""
    return np.where(tree.children >= 0, tree.tokens[np.maximum(tree.children, 0)], -1).astype(
        np.int32
    )


def _acceptance(tree: Tree, path: np.ndarray, last_token: int) -> Acceptance:
    return Acceptance(path, [int(t) for t in tree.tokens[path[1:]]] + [last_token])


def _check_logits(tree: Tree, logits: mx.array) -> None:
    if logits.ndim != 2 or logits.shape[0] != tree.num_nodes:
        raise ValueError(
            f"logits must have shape (num_nodes={tree.num_nodes}, V), got {tuple(logits.shape)}"
        )
