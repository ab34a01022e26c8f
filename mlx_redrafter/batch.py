"""The base model over many sequences at once: generation with continuous batching, greedy
or sampled (the drafter's training data, and the benchmark's reference answers), and the
hidden states of given responses under teacher forcing (the `dataset` and `relabel` training
targets)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx
import numpy as np

from .accept import SamplingConfig, dense_logprobs
from .errors import GenerationError


def _prefill_group(model, prompts: Sequence[Sequence[int]], features: Sequence[int] = ()):
    """Left-padded prefill of a few prompts in their own cache.

    -> (cache, last hidden (b, h), last logits (b, V), left pads (b,)). Every row gets its own
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
    hidden, _ = model(
        mx.array(tokens),
        cache,
        mx.array(positions, mx.int32),
        mx.array(mask[:, None]),
        features=features,
        return_logits=False,
    )
    cache.commit()
    last = hidden[:, -1]
    # Only the last position's logits: the head over every prompt position would cost
    # b x P x V (a 1,800-token prompt: 88M floats a row) to keep one row of it.
    return cache, last, model.logits(last), pad


def top_log_probs(logits: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """The k most likely tokens of each row of logits (..., V): (ids int32 (..., k), their
    log-probabilities float32 (..., k)), in no particular order."""
    logits = logits.astype(mx.float32)
    ids = mx.argpartition(-logits, k - 1, axis=-1)[..., :k].astype(mx.int32)
    lse = mx.logsumexp(logits, axis=-1, keepdims=True)
    return ids, mx.take_along_axis(logits, ids, axis=-1) - lse


def generate_batch(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Sequence[int],
    batch_size: int | None = None,
    on_finish: Callable[[int], None] | None = None,
    features: Sequence[int] = (),
    top_k: int = 0,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
) -> list[tuple]:
    """Responses to prompts, greedy or sampled, with the hidden state that produced each token.

    Returns per prompt (response ids, hidden (len(response), h) float32): hidden[k] is the
    post-norm hidden state of the token fed before response[k] (the last prompt token for
    k = 0), i.e. what a teacher-forced pass over prompt + response gives at those positions.
    A response ends at a stop id (kept) or after max_new_tokens. With `features` (block
    indices) each hidden row also carries those layers' states (see Model.__call__).

    `sampling` (not greedy) draws each token from the warped distribution (random keys from
    `seed`: the same prompts in the same batches give the same answers), and each entry
    gains, third, labels (len,) int32: the base's greedy choice at each position of the
    sampled answer.
    With `top_k` > 0 each entry ends with (ids (len, k) int32, log-probs (len, k) float32):
    the base's k most likely tokens at each response position, from the same logits.

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
    sampling = None if sampling is None or sampling.greedy else sampling
    out = _Responses(n, max_new_tokens, stop_ids, top_k, on_finish, sampling, seed)
    batch = _Rows()
    # Shortest prompts first: a group is prefilled padded to its longest prompt, and a joined
    # row's columns stretch every row's cache, so one long prompt among short ones costs the
    # whole group (a 1,800-token document among 40-token chats).
    queue = sorted(range(n), key=lambda i: len(prompts[i]))
    while queue or batch.live:
        free = batch_size - len(batch.live)
        if queue and (free >= refill_at or not batch.live):
            group = _similar_lengths(queue[:free], prompts)
            queue = queue[len(group) :]
            _admit(model, batch, group, prompts, features, out)
        if batch.live:
            _decode_step(model, batch, prompts, features, out)
    return out.results()


def _similar_lengths(queue: list[int], prompts) -> list[int]:
    """The longest head of `queue` (shortest prompts first) that pads to at most 1.5x its real
    tokens when prefilled together; at least one prompt. The rest wait for the next group."""
    total = 0
    for k, i in enumerate(queue):
        total += len(prompts[i])
        if k and len(prompts[i]) * (k + 1) > 1.5 * total:
            return queue[:k]
    return queue


class _Responses:
    """What each prompt has generated so far: tokens, the hidden state before each, top-k."""

    def __init__(
        self, n: int, max_new_tokens: int, stop_ids, top_k: int, on_finish, sampling=None, seed=0
    ):
        self.max_new_tokens, self.top_k, self.on_finish = max_new_tokens, top_k, on_finish
        self.sampling = sampling
        self.key = mx.random.key(seed)
        self.stop = set(int(t) for t in stop_ids)
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.labels: list[list[int]] = [[] for _ in range(n)]  # greedy choices (sampling)
        self.hiddens: list[list[np.ndarray]] = [[] for _ in range(n)]
        self.tops: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(n)]

    def record(self, rows: list[int], logits: mx.array, hidden: mx.array):
        """Append each row's token (greedy or sampled) and hidden state (and greedy label,
        top-k); -> (the positions of unfinished rows, the tokens)."""
        top_k = self.top_k
        greedy = mx.argmax(logits, axis=-1).astype(mx.int32)
        tokens = greedy
        if self.sampling is not None:
            self.key, key = mx.random.split(self.key)
            logprobs = dense_logprobs(logits, self.sampling)
            tokens = mx.random.categorical(logprobs, axis=-1, key=key).astype(mx.int32)
        top = top_log_probs(logits, top_k) if top_k else ()
        mx.eval(tokens, greedy, hidden, *top)
        tok_np = np.array(tokens).reshape(-1)
        labels = None if self.sampling is None else np.array(greedy).reshape(-1)
        h_np = np.array(hidden.astype(mx.float32))
        if top_k:
            top_ids, top_lp = np.array(top[0]), np.array(top[1])
        going = []
        for j, b in enumerate(rows):
            self.tokens[b].append(int(tok_np[j]))
            if labels is not None:
                self.labels[b].append(int(labels[j]))
            self.hiddens[b].append(h_np[j])
            if top_k:
                self.tops[b].append((top_ids[j], top_lp[j]))
            if int(tok_np[j]) not in self.stop and len(self.tokens[b]) < self.max_new_tokens:
                going.append(j)
            elif self.on_finish is not None:
                self.on_finish(len(self.tokens[b]))
        return going, tokens

    def results(self) -> list[tuple]:
        out = []
        for b in range(len(self.tokens)):
            entry = [self.tokens[b], np.stack(self.hiddens[b])]
            if self.sampling is not None:
                entry.append(np.array(self.labels[b], np.int32))
            if self.top_k:
                entry += [np.stack(x) for x in zip(*self.tops[b], strict=True)]
            out.append(tuple(entry))
        return out


class _Rows:
    """The rows decoding together: one cache, the prompt of each row, the first column each
    row may attend to, and the token each row feeds next."""

    def __init__(self):
        self.cache = None
        self.live: list[int] = []  # prompt index of each cache row
        self.start = np.zeros(0, np.int64)
        self.feed = mx.zeros((0,), mx.int32)


def _admit(model, batch: _Rows, group: list[int], prompts, features, out: _Responses) -> None:
    """Prefill the prompts `group` on their own and join the unfinished ones to the batch,
    right-aligned at the cache length (the columns before them masked out)."""
    g_cache, g_hidden, g_logits, g_pad = _prefill_group(
        model, [prompts[i] for i in group], features
    )
    going, g_tokens = out.record(group, g_logits, g_hidden)
    if not going:
        return
    keep = np.array(going)
    if not batch.live:
        batch.cache, batch.start = g_cache, np.zeros(0, np.int64)
        shift, g_shift = batch.cache.join_rows(keep)
        start = g_pad[keep] + shift
    else:
        shift, g_shift = batch.cache.join_rows(np.arange(len(batch.live)), g_cache, keep)
        start = np.concatenate([batch.start + shift, g_pad[keep] + g_shift])
    batch.live += [group[j] for j in going]
    batch.feed = mx.concatenate([batch.feed, g_tokens[mx.array(keep)].astype(mx.int32)])
    batch.start = batch.cache.drop_columns_before(start)


def _decode_step(model, batch: _Rows, prompts, features, out: _Responses) -> None:
    """One token for every row; finished rows leave the cache."""
    cache, live, start = batch.cache, batch.live, batch.start
    S = cache.offset + 1
    mask = (np.arange(S)[None, :] >= start[:, None])[:, None, None, :]  # (B, 1, 1, S)
    # The fed token is response[-1], at position len(prompt) + len(response) - 1.
    positions = np.array([len(prompts[b]) + len(out.tokens[b]) - 1 for b in live])
    hidden, logits = model(
        batch.feed[:, None],
        cache,
        mx.array(positions[:, None], mx.int32),
        mx.array(mask),
        features=features,
    )
    cache.commit()
    going, tokens = out.record(live, logits[:, 0], hidden[:, 0])
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
        batch.start = start
        batch.live = [live[j] for j in going]
    batch.feed = tokens


def teacher_forced_hidden(
    model,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    with_labels: bool = False,
    features: Sequence[int] = (),
    top_k: int = 0,
) -> list:
    """Hidden states (len(response), h) float32 before each response token, in one pass.

    Rows are right-padded, so the plain causal mask and default positions are exact. Each
    entry is the hidden array alone, or a tuple: (hidden, labels) with `with_labels`
    (labels[k] is the base model's greedy choice for response[k] given the prompt and
    response[:k]), then (ids, log-probs) (len(response), top_k) with `top_k` > 0: the base's
    most likely tokens at those positions. Logits are computed only at the response rows.
    `features` appends those blocks' states to each hidden row (see Model.__call__).
    """
    seqs = [list(p) + list(r[:-1]) for p, r in zip(prompts, responses, strict=True)]
    T = max(len(s) for s in seqs)
    tokens = np.zeros((len(seqs), T), np.int32)
    for b, s in enumerate(seqs):
        tokens[b, : len(s)] = s
    hidden, _ = model(mx.array(tokens), return_logits=False, features=features)
    spans = [(len(p) - 1, len(p) - 1 + len(r)) for p, r in zip(prompts, responses, strict=True)]
    extras = [[] for _ in spans]
    if with_labels or top_k:
        for b, (s, e) in enumerate(spans):
            logits = model.logits(hidden[b, s:e])
            if with_labels:
                extras[b].append(mx.argmax(logits, axis=-1).astype(mx.int32))
            if top_k:
                extras[b] += top_log_probs(logits, top_k)
        mx.eval(extras)
    hidden = np.array(hidden.astype(mx.float32))
    out = [hidden[b, s:e] for b, (s, e) in enumerate(spans)]
    if not (with_labels or top_k):
        return out
    return [(h, *(np.array(x) for x in more)) for h, more in zip(out, extras, strict=True)]
