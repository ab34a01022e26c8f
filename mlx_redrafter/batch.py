"""The base model over many sequences at once: greedy generation with continuous batching
(the drafter's training data, and the benchmark's reference answers) and the hidden states
of given responses under teacher forcing (the `dataset` and `relabel` training targets)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx
import numpy as np

from .errors import GenerationError


def _prefill_group(model, prompts: Sequence[Sequence[int]]):
    """Left-padded prefill of a few prompts in their own cache.

    -> (cache, last hidden (b, h), first tokens (b,), left pads (b,)). Every row gets its own
    positions and a boolean mask over its real tokens, so it computes what it would alone.
    Padding queries attend to themselves: a fully masked row gives NaN, and NaN values poison
    the other rows even under a False mask (0 * NaN).
    """
    lens = np.array([len(p) for p in prompts], dtype=np.int64)
    P = int(lens.max())
    pad = P - lens
    tokens = np.zeros((len(prompts), P), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, pad[b] :] = p
    col = np.arange(P)
    positions = np.maximum(col[None] - pad[:, None], 0)  # (b, P)
    real = col[None, :] >= pad[:, None]  # (b, P)
    mask = (col[None, :] <= col[:, None])[None] & real[:, None, :]  # (b, P, P)
    mask |= np.eye(P, dtype=bool)[None]
    cache = model.make_cache()
    hidden, logits = model(
        mx.array(tokens), cache, mx.array(positions, mx.int32), mx.array(mask[:, None])
    )
    cache.commit()
    return cache, hidden[:, -1], mx.argmax(logits[:, -1], axis=-1), pad


def generate_greedy_batch(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Sequence[int],
    batch_size: int | None = None,
    on_finish: Callable[[int], None] | None = None,
) -> list[tuple[list[int], np.ndarray]]:
    """Greedy responses to prompts, with the hidden state that produced each token.

    Returns per prompt (response ids, hidden (len(response), h) float32): hidden[k] is the
    post-norm hidden state of the token fed before response[k] (the last prompt token for
    k = 0), i.e. what a teacher-forced pass over prompt + response gives at those positions.
    A response ends at a stop id (kept) or after max_new_tokens.

    Continuous batching: up to `batch_size` rows decode together in one cache, each with its
    own positions and a mask over its own columns. A finished row leaves the cache, and when
    enough slots are free the next prompts are prefilled on their own and their K/V joined
    in, right-aligned at the cache length (the columns before them are masked out). So the
    batch stays full, which matters because a decode step costs almost as much for 1 row as
    for 16 on a CPU. `on_finish(num_tokens)` is called as each response ends.
    """
    n = len(prompts)
    if n == 0:
        return []
    if min(len(p) for p in prompts) < 1:
        raise GenerationError("cannot generate from an empty prompt")
    batch_size = batch_size or n
    refill_at = max(1, batch_size // 8)
    stop = set(int(t) for t in stop_ids)
    responses: list[list[int]] = [[] for _ in range(n)]
    hiddens: list[list[np.ndarray]] = [[] for _ in range(n)]

    def record(rows: list[int], tokens: mx.array, hidden: mx.array) -> list[int]:
        """Append each row's new token and hidden state; the positions of unfinished rows."""
        mx.eval(tokens, hidden)
        tok_np = np.array(tokens).reshape(-1)
        h_np = np.array(hidden.astype(mx.float32))
        going = []
        for j, b in enumerate(rows):
            responses[b].append(int(tok_np[j]))
            hiddens[b].append(h_np[j])
            if int(tok_np[j]) not in stop and len(responses[b]) < max_new_tokens:
                going.append(j)
            elif on_finish is not None:
                on_finish(len(responses[b]))
        return going

    queue = list(range(n))
    cache = None
    live: list[int] = []  # prompt index of each cache row
    start = np.zeros(0, np.int64)  # first column each row may attend to
    feed = mx.zeros((0,), mx.int32)  # the token each row feeds next
    while queue or live:
        free = batch_size - len(live)
        if queue and (free >= refill_at or not live):
            group, queue = queue[:free], queue[free:]
            g_cache, g_hidden, g_tokens, g_pad = _prefill_group(model, [prompts[i] for i in group])
            going = record(group, g_tokens, g_hidden)
            if going:
                keep = np.array(going)
                if not live:
                    cache, start = g_cache, np.zeros(0, np.int64)
                    shift, g_shift = cache.join_rows(keep)
                    start = g_pad[keep] + shift
                else:
                    shift, g_shift = cache.join_rows(np.arange(len(live)), g_cache, keep)
                    start = np.concatenate([start + shift, g_pad[keep] + g_shift])
                live += [group[j] for j in going]
                feed = mx.concatenate([feed, g_tokens[mx.array(keep)].astype(mx.int32)])
                start = cache.drop_columns_before(start)
        if not live:
            continue
        S = cache.offset + 1
        mask = (np.arange(S)[None, :] >= start[:, None])[:, None, None, :]  # (B, 1, 1, S)
        # The fed token is response[-1], at position len(prompt) + len(response) - 1.
        positions = np.array([len(prompts[b]) + len(responses[b]) - 1 for b in live])
        hidden, logits = model(
            feed[:, None], cache, mx.array(positions[:, None], mx.int32), mx.array(mask)
        )
        cache.commit()
        tokens = mx.argmax(logits[:, 0], axis=-1).astype(mx.int32)
        going = record(live, tokens, hidden[:, 0])
        if len(going) < len(live):
            keep = np.array(going, dtype=np.int64)
            if going:
                cache.join_rows(keep)
                tokens = tokens[mx.array(keep)]
            else:
                tokens = mx.zeros((0,), mx.int32)
            start = start[keep]
            if going:
                start = cache.drop_columns_before(start)
            live = [live[j] for j in going]
        feed = tokens
    return [(responses[b], np.stack(hiddens[b])) for b in range(n)]


def teacher_forced_hidden(
    model,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    with_labels: bool = False,
) -> list:
    """Hidden states (len(response), h) float32 before each response token, in one pass.

    Rows are right-padded, so the plain causal mask and default positions are exact. With
    `with_labels`, each entry is (hidden, labels): labels[k] is the base model's greedy choice
    for response[k] given the prompt and response[:k] (logits only at those rows).
    """
    seqs = [list(p) + list(r[:-1]) for p, r in zip(prompts, responses, strict=True)]
    T = max(len(s) for s in seqs)
    tokens = np.zeros((len(seqs), T), np.int32)
    for b, s in enumerate(seqs):
        tokens[b, : len(s)] = s
    hidden, _ = model(mx.array(tokens), return_logits=False)
    spans = [(len(p) - 1, len(p) - 1 + len(r)) for p, r in zip(prompts, responses, strict=True)]
    labels = []
    if with_labels:
        labels = [
            mx.argmax(model.logits(hidden[b, s:e]), axis=-1) for b, (s, e) in enumerate(spans)
        ]
        mx.eval(labels)
    hidden = np.array(hidden.astype(mx.float32))
    out = [hidden[b, s:e] for b, (s, e) in enumerate(spans)]
    if with_labels:
        return [(h, np.array(y.astype(mx.int32))) for h, y in zip(out, labels, strict=True)]
    return out
