"""Recursive rejection sampling over a draft tree with one proposal per sibling (RSD).

At a node with target distribution r, children are tried in slot order; slot i proposed its
token x_i from q_i: the node's drafter distribution q minus the node's earlier *sampled*
draws, renormalised (a token drawn without replacement, `rsd_draft.py`), or a point mass (a
deterministic beam, a lookup copy). Accept x_i with probability min(1, r(x_i) / q_i(x_i)); on
rejection r <- normalise(max(r - q_i, 0)); when every slot is rejected, emit a token drawn
from r. The emitted sequence has exactly the distribution of plain sampling from the target.
With point masses only this is accept.py's deterministic-children rule (which stays the
faster path for such trees). docs/tree-attention.md has the argument and a worked example.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .accept import (
    Acceptance,
    AcceptanceBatch,
    SamplingConfig,
    dense_logprobs,
    walk_chosen,
    warp_candidates,
)
from .rsd_draft import (
    GUMBEL_TOPK,
    STOCHASTIC_BEAM,
    RecurrentStep,
    SampledDraft,
    gumbel_topk_tree,
    stochastic_beam_tree,
)
from .tree import Tree, pack_sequences

BEAM = "beam"  # deterministic beam search (the drafter's children are point masses)
DRAFT_CHOICES = (BEAM, GUMBEL_TOPK, STOCHASTIC_BEAM)


# Below this temperature sampled drafts gain little over beams (BENCHMARKS.md section 13:
# <= 3% at the budgets a CPU verifies, T = 0.3) and cost more to draft; above it Stochastic
# Beam Search won at most budgets (T = 0.7 and 1.0).
SAMPLED_DRAFT_MIN_TEMPERATURE = 0.5


def default_draft_method(sampling: SamplingConfig, beam_width: int = 2) -> str:
    """How the drafter drafts for this request: beams when greedy or nearly so, or when the
    tree is one chain (W = 1: a chain has no siblings for sampling without replacement to
    improve, and at the defaults beams were as good per step and cheaper to draft: BENCHMARKS
    section 13); Stochastic Beam Search when sampling at SAMPLED_DRAFT_MIN_TEMPERATURE or
    above with W >= 2."""
    if sampling.greedy or sampling.temperature < SAMPLED_DRAFT_MIN_TEMPERATURE:
        return BEAM
    if beam_width < 2:
        return BEAM
    return STOCHASTIC_BEAM


def draft_sampled(
    model,
    drafter,
    context: mx.array,
    g0: int,
    method: str,
    shape: tuple[int, int],
    sampling: SamplingConfig,
) -> SampledDraft:
    """One tree drawn without replacement from the RNN drafter for a W x L budget: Stochastic
    Beam Search with W beams, or Gumbel-Top-k with W children at the root and one below
    (W chains), both W * (L - 1) nodes at most."""
    width, length = shape
    step = RecurrentStep(drafter, model, context)
    if method == STOCHASTIC_BEAM:
        return stochastic_beam_tree(step, g0, width, length, sampling)
    if method == GUMBEL_TOPK:
        return gumbel_topk_tree(step, g0, (width,) + (1,) * (length - 2), sampling)
    raise ValueError(f"unknown sampled draft method {method!r}; use one of {DRAFT_CHOICES}")


def node_key(j: int) -> int:
    """The pseudo-token that stands for sampled node j while the tree is chosen (sizing)."""
    return -1 - j


def split_choice(
    sequences: Sequence[Sequence[int]], draft: SampledDraft | None
) -> tuple[list[tuple[int, ...]], list[int]]:
    """A sizing choice's sequences -> (deterministic sequences, kept sampled nodes), the kept
    set closed under parents and earlier-drawn siblings (ties in the estimates)."""
    det, kept = [], set()
    for seq in sequences:
        keys = [int(t) for t in seq[1:]]
        if any(k < 0 for k in keys):
            kept.update(node_key(k) for k in keys)
        else:
            det.append(tuple(int(t) for t in seq))
    if draft is None or not kept:
        return det, sorted(kept)
    parents, ranks = draft.parents[0], draft.ranks[0]
    todo = list(kept)
    while todo:
        j = todo.pop()
        p = int(parents[j])
        extra = [i for i in np.flatnonzero(parents == p) if ranks[i] < ranks[j]]
        extra += [p] if p > 0 else []
        for i in extra:
            if int(i) not in kept and draft.valid[0, i]:
                kept.add(int(i))
                todo.append(int(i))
    return det, sorted(kept)


def accepted_keys(
    tree: Tree, proposals: Proposals, path: np.ndarray, draft: SampledDraft | None
) -> list[tuple[int, ...]]:
    """The accepted prefixes (root excluded) as sizing knows them: token tuples, and the key
    tuples of the sampled nodes on the path."""
    tokens = [int(t) for t in tree.tokens[path]]
    out = [tuple(tokens[: k + 1]) for k in range(1, len(path))]
    if draft is None:
        return out
    for k in range(1, len(path)):
        j = int(proposals.sampled_node[path[k]])
        if j > 0:
            chain = []
            while j > 0:
                chain.append(node_key(j))
                j = int(draft.parents[0, j])
            out.append((tokens[0], *reversed(chain)))
    return out


@dataclass(frozen=True, eq=False)
class Proposals:
    """How a tree's children were proposed, in the order acceptance tries them.

    nodes   int32 (N, T)  the child node slot t of node u tries (-1: padding); a node can sit
                          in two slots of its parent (a token a sample and a copy both chose)
    sampled bool  (N, T)  True: drawn without replacement from node u's q after its earlier
                          sampled slots; False: a point mass
    q_rows  int32 (N,)    row of the draft's logq that is node u's q (-1: no sampled slot)
    sampled_node int32 (N,) the kept draft node at node u (-1: none)
    """

    nodes: np.ndarray
    sampled: np.ndarray
    q_rows: np.ndarray
    sampled_node: np.ndarray | None = None

    @property
    def any_sampled(self) -> bool:
        return bool(self.sampled.any())


def point_mass_proposals(tree: Tree) -> Proposals:
    """Every child a point mass, in node order (the deterministic-children rule)."""
    nodes = tree.children.astype(np.int32)
    none = np.full(tree.num_nodes, -1, np.int32)
    return Proposals(nodes, np.zeros(nodes.shape, bool), none, none.copy())


def build_round(
    sequences: Sequence[Sequence[int]],
    draft: SampledDraft | None = None,
    kept: Sequence[int] = (),
    tree_index: int = 0,
) -> tuple[Tree, Proposals]:
    """Pack deterministic candidate `sequences` (point masses: beams, lookup copies) and the
    `kept` nodes of one sampled draft tree into one prefix tree, with each child's proposal.

    Sampled children of a node go first, in the order they were drawn, then the point masses
    in node order. `kept` must hold each kept node's parent and, among a node's sampled
    children, a first-drawn prefix (the proposal of a later draw removes the earlier ones).
    """
    prefixes = draft.prefixes(tree_index) if draft is not None else []
    kept = sorted(int(j) for j in kept if j > 0)
    _check_kept(draft, kept, tree_index)
    has_kept_child = {int(draft.parents[tree_index, j]) for j in kept} if kept else set()
    leaves = [prefixes[j] for j in kept if j not in has_kept_child]
    all_sequences = [tuple(int(t) for t in s) for s in sequences] + leaves
    if not all_sequences:
        raise ValueError("a round needs at least one candidate sequence or sampled node")
    tree = pack_sequences(all_sequences)
    node_of = _node_index(tree, all_sequences)

    slots: list[list[tuple[int, bool]]] = [[] for _ in range(tree.num_nodes)]
    q_rows = np.full(tree.num_nodes, -1, np.int32)
    sampled_node = np.full(tree.num_nodes, -1, np.int32)
    by_parent: dict[int, list[int]] = {}
    for j in kept:
        sampled_node[node_of[prefixes[j]]] = j
        by_parent.setdefault(int(draft.parents[tree_index, j]), []).append(j)
    for parent, children in by_parent.items():
        u = node_of[prefixes[parent]]
        q_rows[u] = parent
        for j in sorted(children, key=lambda j: int(draft.ranks[tree_index, j])):
            slots[u].append((node_of[prefixes[j]], True))
    point = set()
    for seq in sequences:
        for k in range(1, len(seq)):
            point.add((node_of[tuple(seq[:k])], node_of[tuple(seq[: k + 1])]))
    for u, v in sorted(point, key=lambda e: e[1]):
        slots[u].append((v, False))
    width = max(1, max(len(s) for s in slots))
    nodes = np.full((tree.num_nodes, width), -1, np.int32)
    sampled = np.zeros((tree.num_nodes, width), bool)
    for u, row in enumerate(slots):
        for t, (v, is_sampled) in enumerate(row):
            nodes[u, t], sampled[u, t] = v, is_sampled
    return tree, Proposals(nodes, sampled, q_rows, sampled_node)


def _check_kept(draft: SampledDraft | None, kept: list[int], b: int) -> None:
    if not kept:
        return
    if draft is None:
        raise ValueError("kept sampled nodes were given without their draft")
    kept_set = set(kept)
    for j in kept:
        if not draft.valid[b, j]:
            raise ValueError(f"sampled node {j} holds no draw")
        parent = int(draft.parents[b, j])
        if parent > 0 and parent not in kept_set:
            raise ValueError(f"sampled node {j} is kept without its parent {parent}")
        rank = int(draft.ranks[b, j])
        earlier = [
            i
            for i in np.flatnonzero(draft.parents[b] == parent)
            if draft.ranks[b, i] < rank and i not in kept_set
        ]
        if earlier:
            raise ValueError(f"sampled node {j} is kept without its earlier-drawn siblings")


def _node_index(tree: Tree, sequences: list[tuple[int, ...]]) -> dict[tuple[int, ...], int]:
    """Prefix -> packed node, from the tree's paths."""
    out = {}
    for row, seq in enumerate(sequences):
        for k in range(len(seq)):
            out[seq[: k + 1]] = int(tree.paths[row, k])
    return out


# ---------------------------------------------------------------------------------------------
# Acceptance


def dense_draft_logq(
    proposals: Proposals, draft: SampledDraft | None, vocab: int, tree_index: int = 0
) -> mx.array:
    """float32 (N, V): node u's warped drafter log-probs over the vocabulary (-inf rows for
    nodes without sampled children)."""
    n = proposals.q_rows.shape[0]
    if draft is None or not proposals.any_sampled:
        return mx.full((n, vocab), -mx.inf, mx.float32)
    logq = draft.logq[tree_index : tree_index + 1]
    return draft_logq_rows(logq, draft.vocab_ids, proposals.q_rows[None], vocab)[0]


def draft_logq_rows(
    logq: mx.array, vocab_ids: mx.array | None, q_rows: np.ndarray, vocab: int
) -> mx.array:
    """logq (B, E, K) of B drafts and rows (B, N) (-1: none) -> float32 (B, N, V) over the
    vocabulary, -inf rows where there is none."""
    rows = mx.array(np.maximum(q_rows, 0).astype(np.int32))
    out = mx.take_along_axis(logq, rows[..., None], axis=1)  # (B, N, K)
    if vocab_ids is not None:
        dense = mx.full((*out.shape[:2], vocab), -mx.inf, mx.float32)
        ids = mx.broadcast_to(vocab_ids, out.shape)
        out = mx.put_along_axis(dense, ids, out, axis=-1)
    elif out.shape[-1] != vocab:
        raise ValueError(f"the draft's q has {out.shape[-1]} columns, the target {vocab}")
    return mx.where(mx.array(q_rows >= 0)[..., None], out, -mx.inf)


def rsd_accept(
    tree: Tree,
    proposals: Proposals,
    logits: mx.array,
    sampling: SamplingConfig,
    draft: SampledDraft | None = None,
    uniforms: mx.array | None = None,
) -> Acceptance:
    """One round's exact acceptance. logits (N, V): the target's logits per node; uniforms
    (N, T + 1), drawn here if None.

    With top-k/top-p, p and q have mass only on their candidates: the recursion then runs
    over those columns and the slot tokens (a few hundred instead of the vocabulary)."""
    if logits.ndim != 2 or logits.shape[0] != tree.num_nodes:
        raise ValueError(
            f"logits must have shape (num_nodes={tree.num_nodes}, V), got {tuple(logits.shape)}"
        )
    vocab = logits.shape[1]
    logq = dense_draft_logq(proposals, draft, vocab)
    shape = (tree.num_nodes, proposals.nodes.shape[1] + 1)
    if uniforms is None:
        uniforms = mx.random.uniform(shape=shape)
    folded = _folded_target(tree, proposals, logits, logq, sampling)
    if folded is None:
        logp, cols = dense_logprobs(logits, sampling), None
        tokens = tree.tokens
    else:
        logp, logq, cols = folded
        tokens = np.searchsorted(cols, tree.tokens).astype(np.int32)  # slot tokens are in cols
    batch = accept_batch(
        tokens[None], tree.depths[None], proposals_batch([proposals]),
        logp[None], logq[None], uniforms[None],
    )  # fmt: skip
    result = batch[0]
    if cols is not None:
        result.tokens = [int(cols[t]) for t in result.tokens]
    return result


def _folded_target(tree, proposals, logits, logq, sampling):
    """(logp, logq, columns) restricted to the columns where p or q has mass, or None when
    p is not truncated (or its top-p reaches past the candidates)."""
    vocab = logits.shape[1]
    if sampling.greedy or not (0 < sampling.top_k < vocab or sampling.top_p < 1.0):
        return None
    ids, lp, decided = warp_candidates(logits, sampling)
    q_support = mx.any(logq > -mx.inf, axis=0)  # (V,)
    mx.eval(ids, decided, q_support)
    if not bool(mx.all(decided).item()):
        return None
    slot_tokens = tree.tokens[proposals.nodes[proposals.nodes >= 0]]
    cols = np.union1d(np.array(ids).ravel(), np.flatnonzero(np.array(q_support)))
    cols = np.union1d(cols, slot_tokens).astype(np.int32)
    keep = mx.array(cols)
    dense = mx.full(logits.shape, -mx.inf, mx.float32)
    logp = mx.put_along_axis(dense, ids, lp, axis=1)[:, keep]
    return logp, logq[:, keep], cols


@dataclass(frozen=True, eq=False)
class SlotsBatch:
    """Proposals of B trees padded to (B, N, T)."""

    nodes: np.ndarray
    sampled: np.ndarray


def proposals_batch(items: Sequence[Proposals], num_nodes: int | None = None) -> SlotsBatch:
    n = num_nodes or max(p.nodes.shape[0] for p in items)
    t = max(p.nodes.shape[1] for p in items)
    nodes = np.full((len(items), n, t), -1, np.int32)
    sampled = np.zeros((len(items), n, t), bool)
    for b, p in enumerate(items):
        nodes[b, : p.nodes.shape[0], : p.nodes.shape[1]] = p.nodes
        sampled[b, : p.nodes.shape[0], : p.nodes.shape[1]] = p.sampled
    return SlotsBatch(nodes, sampled)


def accept_batch(
    node_tokens: np.ndarray,
    depths: np.ndarray,
    slots: SlotsBatch,
    logp: mx.array,
    logq: mx.array,
    uniforms: mx.array,
) -> AcceptanceBatch:
    """Recursive rejection sampling for B trees at once (padded to N nodes, T slots).

    node_tokens, depths int (B, N); logp, logq float32 (B, N, V) warped target and drafter
    log-probs; uniforms (B, N, T + 1): column t decides slot t, column T the emitted token.
    """
    b, n, t = slots.nodes.shape
    if tuple(uniforms.shape) != (b, n, t + 1):
        raise ValueError(f"uniforms must have shape {(b, n, t + 1)}, got {tuple(uniforms.shape)}")
    node_tokens = np.asarray(node_tokens)
    safe = np.maximum(slots.nodes, 0)
    slot_tokens = np.where(
        slots.nodes >= 0,
        np.take_along_axis(node_tokens, safe.reshape(b, -1), 1).reshape(safe.shape),
        -1,
    )
    chosen_slot, fallback = _slot_outcomes(
        logp, logq, mx.array(slot_tokens), mx.array(slots.sampled), uniforms
    )
    out = np.array(mx.stack([chosen_slot, fallback]))  # (2, B, N), the one host sync
    rows = np.arange(b)[:, None]
    chosen = np.where(out[0] >= 0, slots.nodes[rows, np.arange(n)[None], np.maximum(out[0], 0)], -1)
    return _walk(node_tokens, np.asarray(depths), chosen, out[1])


def _slot_outcomes(
    logp: mx.array, logq: mx.array, slot_tokens: mx.array, sampled: mx.array, uniforms: mx.array
) -> tuple[mx.array, mx.array]:
    """Per tree and node: the first accepted slot (-1: none) and the token emitted when none
    is, from the residual. logp, logq (B, N, V); slot_tokens (B, N, T), -1 padding."""
    num_slots = slot_tokens.shape[-1]
    accept, r = slot_probabilities(logp, logq, slot_tokens, sampled)
    accepted = uniforms[..., :num_slots] < accept
    first = mx.argmax(accepted.astype(mx.int32), axis=-1).astype(mx.int32)
    chosen = mx.where(mx.any(accepted, axis=-1), first, -1).astype(mx.int32)
    vocab = r.shape[-1]
    cdf = mx.cumsum(r, axis=-1)
    target = uniforms[..., num_slots] * cdf[..., -1]
    token = mx.sum(cdf <= target[..., None], axis=-1).astype(mx.int32)
    last = vocab - 1 - mx.argmax((r > 0)[..., ::-1].astype(mx.int32), axis=-1).astype(mx.int32)
    return chosen, mx.minimum(token, last).astype(mx.int32)


def slot_probabilities(
    logp: mx.array, logq: mx.array, slot_tokens: mx.array, sampled: mx.array
) -> tuple[mx.array, mx.array]:
    """P(slot t accepted | slots before it rejected) (B, N, T), and the final residual
    (B, N, V) a node emits from when every slot is rejected."""
    vocab = logp.shape[-1]
    num_slots = slot_tokens.shape[-1]
    columns = mx.arange(vocab)
    r = mx.exp(logp)  # the residual target, normalised
    q_left = mx.exp(logq)  # q without the node's sampled draws so far (not normalised)
    accept = []
    for s in range(num_slots):
        token = slot_tokens[..., s]
        valid = token >= 0
        draw = sampled[..., s] & valid
        at = mx.maximum(token, 0)[..., None]
        hot = columns == at  # (B, N, V)
        q_norm = q_left / mx.maximum(mx.sum(q_left, axis=-1, keepdims=True), 1e-30)
        proposal = mx.where(draw[..., None], q_norm, hot.astype(mx.float32))
        r_x = mx.take_along_axis(r, at, axis=-1)[..., 0]
        q_x = mx.take_along_axis(proposal, at, axis=-1)[..., 0]
        ratio = mx.minimum(1.0, r_x / mx.maximum(q_x, 1e-30))
        accept.append(mx.where(valid & (q_x > 0), ratio, 0.0))
        rest = mx.maximum(r - proposal, 0.0)
        mass = mx.sum(rest, axis=-1, keepdims=True)
        # No mass left means r <= q_i everywhere, so rejection had probability 0.
        r = mx.where(valid[..., None] & (mass > 0), rest / mx.maximum(mass, 1e-30), r)
        q_left = _remove_draw(q_left, hot, draw, valid)
    return mx.stack(accept, axis=-1), r


def expected_accepted(
    tree: Tree,
    proposals: Proposals,
    logp: mx.array,
    logq: mx.array | None = None,
    support: np.ndarray | None = None,
) -> float:
    """E[drafted tokens accepted] in one round over this tree, exactly (no uniforms drawn):
    the sum over nodes of P(the walk reaches the node). logp, logq (N, V) warped log-probs
    (logq None: point masses only). Used to replay acceptance without sampling noise.

    support: token ids outside which q is 0 (a drafter's draft vocabulary). The columns
    outside it and the slot tokens then only ever scale together, so they are summed into
    one column: the same probabilities from a fraction of the vocabulary.
    """
    safe = np.maximum(proposals.nodes, 0)
    slot_tokens = np.where(proposals.nodes >= 0, tree.tokens[safe], -1)  # (N, T)
    if logq is None or not proposals.any_sampled:
        accept = _point_mass_accept(logp, slot_tokens)
    else:
        if support is not None:
            logp, logq, slot_tokens = _fold_columns(logp, logq, slot_tokens, support)
        accept, _ = slot_probabilities(
            logp[None], logq[None], mx.array(slot_tokens[None]), mx.array(proposals.sampled[None])
        )
        accept = np.array(accept[0], dtype=np.float64)  # (N, T)
    reach = np.zeros(tree.num_nodes)
    reach[0] = 1.0
    for u in range(tree.num_nodes):  # parents precede their children
        left = reach[u]
        for t, v in enumerate(proposals.nodes[u]):
            if v < 0 or left <= 0:
                continue
            reach[v] += left * accept[u, t]
            left *= 1.0 - accept[u, t]
    return float(reach[1:].sum())


def _point_mass_accept(logp: mx.array, slot_tokens: np.ndarray) -> np.ndarray:
    """The deterministic-children rule's slot probabilities, from p at the slot tokens only:
    p(x_t) / (1 - p(x_1) - ... - p(x_{t-1})), repeated tokens counted once."""
    at = mx.array(np.maximum(slot_tokens, 0))
    p = np.array(mx.exp(mx.take_along_axis(logp, at, axis=1)), dtype=np.float64)
    p = np.where(slot_tokens >= 0, p, 0.0)
    accept = np.zeros_like(p)
    for u in range(p.shape[0]):
        used, left = set(), 1.0
        for t in range(p.shape[1]):
            tok = int(slot_tokens[u, t])
            if tok < 0 or tok in used:
                continue
            accept[u, t] = min(1.0, p[u, t] / left) if left > 0 else 0.0
            used.add(tok)
            left -= p[u, t]
    return accept


def _fold_columns(logp: mx.array, logq: mx.array, slot_tokens: np.ndarray, support):
    """Keep the columns of `support` and of the slot tokens; sum the rest into one."""
    cols = np.union1d(np.asarray(support), slot_tokens[slot_tokens >= 0]).astype(np.int32)
    keep = mx.array(cols)
    outside = mx.ones((1, logp.shape[1]), mx.bool_)
    outside = mx.put_along_axis(outside, keep[None], mx.array(False), axis=1)  # (1, V)
    rest = mx.logsumexp(mx.where(outside, logp, -mx.inf), axis=1, keepdims=True)
    logp = mx.concatenate([logp[:, keep], rest], axis=1)
    logq = mx.concatenate([logq[:, keep], mx.full(rest.shape, -mx.inf, mx.float32)], axis=1)
    where = np.searchsorted(cols, np.maximum(slot_tokens, 0))
    return logp, logq, np.where(slot_tokens >= 0, where, -1).astype(np.int32)


def _remove_draw(q_left: mx.array, hot: mx.array, draw: mx.array, valid: mx.array) -> mx.array:
    """q for the node's next sampled slot: a sampled draw leaves q (without replacement); a
    point mass never came from q and leaves it as it is."""
    del valid
    return mx.where(draw[..., None] & hot, 0.0, q_left)


def _walk(
    node_tokens: np.ndarray, depths: np.ndarray, chosen: np.ndarray, fallback: np.ndarray
) -> AcceptanceBatch:
    """Follow `chosen` (B, N) from each root; emit `fallback` where the walk stops."""
    b = chosen.shape[0]
    length = int(depths.max(initial=0)) + 1
    rows = np.arange(b)
    paths, node, num_accepted = walk_chosen(chosen, length)
    tokens = np.full((b, length), -1, np.int32)
    for depth in range(1, length):
        ok = paths[:, depth] >= 0
        tokens[ok, depth - 1] = node_tokens[rows[ok], paths[ok, depth]]
    tokens[rows, num_accepted] = fallback[rows, node]
    return AcceptanceBatch(paths, tokens, num_accepted)
