"""Beam search over the recurrent drafter (`beam_search`): the last committed token becomes W
candidate continuations of length L, scored by the drafter's log-probabilities. Deterministic,
ties broken by index; optionally one compiled function per step shape."""

from __future__ import annotations

import mlx.core as mx


def _top_flat(scores: mx.array, k: int) -> mx.array:
    """Indices of the k largest entries of a flat float32 array, best first, ties to the lower
    index. One partition over unique 64-bit keys: high word = the float's bits mapped so that
    a larger float gives a smaller word, low word = the index."""
    bits = mx.view(scores, mx.uint32)
    negative = (bits >> 31).astype(mx.bool_)
    order = mx.where(negative, bits, 0x7FFFFFFF - bits)  # ascending = descending float
    keys = (order.astype(mx.uint64) << 32) | mx.arange(scores.size, dtype=mx.uint64)
    best = mx.sort(mx.partition(keys, k - 1)[:k])
    return (best & 0xFFFFFFFF).astype(mx.int32)


def _top_k_mask(logits: mx.array, k: int) -> mx.array:
    """Keep each row's k largest logits (ties at the k-th kept), the rest -inf."""
    n = logits.shape[-1]
    if k >= n:
        return logits
    kth = mx.partition(logits, n - k, axis=-1)[..., n - k : n - k + 1]
    return mx.where(logits >= kth, logits, -mx.inf)


def _beam_step(drafter, width: int, top_k: int | None, context, state, emb, scores):
    """One draft step for n live beams: (context (1,h), state (n,h), emb (n,h), scores (n,))
    -> (state (W,h), scores (W,), parent (W,), head index (W,))."""
    state = drafter.next_state(state, emb, drafter.context_term(context))  # (n, h)
    logits = drafter.head(context, state).astype(mx.float32)  # (n, K)
    if top_k is not None:
        logits = _top_k_mask(logits, top_k)
    log_probs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    total = (scores[:, None] + log_probs).reshape(-1)  # (n*K,)
    flat = _top_flat(total, width)  # (W,)
    K = logits.shape[-1]
    parent = flat // K
    return state[parent], total[flat], parent, flat % K


def beam_search(
    drafter,
    base_model,
    context: mx.array,
    g0: int | mx.array,
    beam_width: int,
    beam_length: int,
    top_k: int | None = None,
    compiled: bool = False,
    prefix_scores: bool = False,
) -> tuple[mx.array, ...]:
    """Deterministic beam search over the drafter: -> (beams int32 (W, L), scores float32 (W,)).

    prefix_scores=True adds a third output, float32 (W, L): the draft log-prob of each beam's
    prefix up to each position (0 at the root), which the tree sizing reads per node.

    context: the base model's post-norm hidden state of the last committed token, (h,) or
    (1, h). g0: the token the base model produced after it. beams[:, 0] == g0 and L counts
    g0, so the drafter runs L-1 steps. A beam's score is the sum of its draft log-probs;
    beams are sorted best first, ties broken by the lower (beam, token) index.

    The search starts from beam 0 alone: the first step spreads its W best tokens over the
    W beams (the same result as Apple's initial scores [0, -inf, ...]). top_k=None scores with
    the drafter's plain log-softmax. Apple warps with top-k=50 first; with W <= top_k that
    never lets a masked token in, but it renormalises each beam over its own top k, which
    changes scores and can reorder beams across parents, so it is opt-in (top_k=50 for
    Apple's behaviour).

    Lazy: nothing is evaluated here (the caller evaluates beams and scores once). The first
    step runs on one row, the rest on W; the final head's matmul dominates every step.
    compiled=True runs each step through mx.compile; on a 2-core x86 CPU it made no
    measurable difference, so it is off by default.
    """
    h = drafter.context_size  # the head's fuse (if any) maps it to hidden_size
    K = drafter.head_size
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    if beam_length < 2:
        raise ValueError(f"beam_length counts g0 and must be >= 2, got {beam_length}")
    if beam_width > K:
        what = "draft vocabulary" if drafter.draft_vocab_ids is not None else "vocabulary"
        raise ValueError(f"beam_width {beam_width} is larger than the drafter's {what} ({K})")
    if top_k is not None and top_k < beam_width:
        raise ValueError(f"top_k {top_k} must be >= beam_width {beam_width}")
    if context.size != h:
        raise ValueError(f"context has shape {context.shape}; expected ({h},) or (1, {h})")

    step = _step_fn(drafter, beam_width, top_k, compiled)
    context = context.reshape(1, h).astype(drafter.dtype)
    if isinstance(g0, mx.array):
        tokens = g0.reshape(1).astype(mx.int32)
    else:
        tokens = mx.array([int(g0)], dtype=mx.int32)
    state = drafter.initial_state(1)  # (n, h), n = 1 live beam, then W
    scores = mx.zeros((1,), dtype=mx.float32)  # (n,)
    beams = tokens[:, None]  # (n, t)
    prefix = scores[:, None]  # (n, t)
    for _ in range(beam_length - 1):
        state, scores, parent, index = step(context, state, base_model.embed(tokens), scores)
        tokens = drafter.full_vocab_ids(index)  # (W,)
        beams = mx.concatenate([beams[parent], tokens[:, None]], axis=1)  # (W, t+1)
        if prefix_scores:
            prefix = mx.concatenate([prefix[parent], scores[:, None]], axis=1)  # (W, t+1)
    if prefix_scores:
        return beams, scores, prefix
    return beams, scores


# ---------------------------------------------------------------------------------------------
# Construction, saving and loading


def _step_fn(drafter, width: int, top_k: int | None, compiled: bool):
    """The step function for `width` beams, compiled once per (width, top_k) if asked."""
    if not compiled:
        return lambda *a: _beam_step(drafter, width, top_k, *a)
    key = (width, top_k)
    if key not in drafter._compiled:
        # The module's state is an implicit input, so weight updates are seen.
        drafter._compiled[key] = mx.compile(
            lambda *a: _beam_step(drafter, width, top_k, *a), inputs=drafter.state
        )
    return drafter._compiled[key]
