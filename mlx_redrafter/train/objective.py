"""What the drafter learns: the draft vocabulary, the training examples, the training forward
and its loss, and the teacher-forced evaluation.

One example is one position t of a sequence: its context H_t and the N+1 tokens after it.
Head i (1..N) reads x_{t+1..t+i} through the RNN (x_{t+1} plays g0, which H_t already fixes)
and predicts x_{t+i+1}, or its label. `draft_logits` runs all heads at once, teacher-forced,
and equals what beam search computes step by step. The loss is the mean over heads of each
head's loss: cross-entropy to the label ("ce"), cross-entropy to the base model's top-k
distribution at the position the head predicts, renormalised over the draft vocabulary
("kd"), or a weighted mix of the two ("mix").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..errors import TrainError
from .data import DistillData

# ---------------------------------------------------------------------------------------------
# Draft vocabulary


def target_counts(data: DistillData, sequences: Sequence[int], vocab_size: int) -> np.ndarray:
    """How often each token is a training target (a response token) in `sequences`."""
    if len(sequences) == 0:
        return np.zeros(vocab_size, np.int64)
    flat = np.concatenate([data.targets(i)[1:] for i in sequences])
    return np.bincount(flat, minlength=vocab_size)[:vocab_size].astype(np.int64)


def draft_vocabulary(
    counts: np.ndarray, size: int, always: Sequence[int] = ()
) -> np.ndarray | None:
    """The `size` most frequent target tokens (ties to the lower id) plus `always` (EOS), as
    sorted int32 ids; None for the full vocabulary (size 0 or >= V)."""
    V = len(counts)
    if size <= 0 or size >= V:
        return None
    always = sorted(set(int(t) for t in always if 0 <= int(t) < V))
    if size < len(always):
        raise TrainError(f"draft vocabulary size {size} cannot hold the {len(always)} EOS ids")
    by_freq = np.lexsort((np.arange(V), -counts))  # most frequent first
    chosen = list(always)
    taken = set(always)
    for t in by_freq:
        if len(chosen) == size:
            break
        if int(t) not in taken:
            chosen.append(int(t))
            taken.add(int(t))
    return np.array(sorted(chosen), np.int32)


def size_for_coverage(counts: np.ndarray, target: float) -> int:
    """The smallest draft vocabulary (most frequent tokens first) whose share of the target
    tokens reaches `target` (in (0, 1]); 0 (the full vocabulary) when only all of it does."""
    if not 0.0 < target <= 1.0:
        raise TrainError(f"draft vocabulary coverage must be in (0, 1], got {target}")
    total = counts.sum()
    if total == 0:
        return 0
    share = np.cumsum(np.sort(counts)[::-1]) / total
    size = int(np.searchsorted(share, target - 1e-12) + 1)
    return 0 if size >= len(counts) else size


def coverage(counts: np.ndarray, ids: np.ndarray | None) -> float:
    """Fraction of target tokens inside the draft vocabulary."""
    total = counts.sum()
    if ids is None or total == 0:
        return 1.0
    return float(counts[ids].sum() / total)


def vocabulary_index(vocab: np.ndarray | None, vocab_size: int) -> np.ndarray | None:
    """Full-vocabulary id -> head row (-1 outside the draft vocabulary); None for all of it."""
    if vocab is None:
        return None
    head_index = np.full(vocab_size, -1, np.int32)
    head_index[vocab] = np.arange(len(vocab), dtype=np.int32)
    return head_index


# ---------------------------------------------------------------------------------------------
# Training examples: one per (sequence, position)


@dataclass
class Positions:
    """Training examples: context row t of a sequence and the N+1 tokens after it."""

    rows: np.ndarray  # (P,) int64 rows of DistillData.hidden: H_t
    windows: np.ndarray  # (P, N+1) int32: x_{t+1} .. x_{t+N+1}, -1 past the sequence end
    labels: np.ndarray  # (P, N+1) int32: the same window of DistillData.targets

    def __len__(self) -> int:
        return len(self.rows)


def make_positions(data: DistillData, sequences: Sequence[int], num_predict: int) -> Positions:
    """Every position t with at least one target: head i (1..N) at t reads x_{t+1..t+i} through
    the RNN (x_{t+1} plays g0) and predicts x_{t+i+1} (or its label y_{t+i+1}); H_t already
    fixes x_{t+1}."""
    N = num_predict
    rows, windows, labels = [], [], []

    def window(x: np.ndarray, n: int) -> np.ndarray:
        padded = np.concatenate([x[1:], np.full(N + 1, -1, np.int32)]).astype(np.int32)
        return np.lib.stride_tricks.sliding_window_view(padded, N + 1)[:n]

    for i in sequences:
        x = data.tokens[i]
        n = len(x) - 2  # t = 0 .. T-3 have a target for head 1
        if n <= 0:
            continue
        windows.append(window(x, n))
        if data.labels is not None:
            labels.append(window(data.labels[i], n))
        rows.append(data.hidden_start[i] + np.arange(n, dtype=np.int64))
    if not rows:
        empty = np.zeros((0, N + 1), np.int32)
        return Positions(np.zeros((0,), np.int64), empty, empty)
    windows = np.ascontiguousarray(np.concatenate(windows))
    labels = windows if data.labels is None else np.ascontiguousarray(np.concatenate(labels))
    return Positions(np.concatenate(rows), windows, labels)


def head_targets(windows: np.ndarray, head_index: np.ndarray | None) -> np.ndarray:
    """(P, N+1) windows -> (P, N) head rows to predict: -1 = outside the draft vocabulary (not
    trained, counted as a miss), -2 = past the end of the sequence (not counted)."""
    tokens = windows[:, 1:]
    out = tokens if head_index is None else head_index[np.maximum(tokens, 0)]
    return np.where(tokens < 0, -2, out).astype(np.int32)


def teacher_targets(
    data: DistillData, pos: Positions, idx: np.ndarray, head_index: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """The base's top-k distribution at the position each head predicts, over head rows.

    Head i at position t predicts x_{t+i+1}, whose distribution is stored at hidden row
    t + i. -> (rows (N, B, k) int32 into the head, weights (N, B, k) float32): the
    teacher's probabilities renormalised over its top-k ids inside the draft vocabulary
    (the others get row 0 and weight 0); all weights 0 where the head has no target.
    """
    N = pos.windows.shape[1] - 1
    k = data.top_k
    rows = pos.rows[idx][None, :] + np.arange(1, N + 1)[:, None]  # (N, B)
    exists = pos.windows[idx, 1:].T >= 0  # (N, B)
    rows = np.where(exists, rows, 0)
    ids = data.top_ids[rows]  # (N, B, k)
    logp = data.top_logprobs[rows].astype(np.float32)
    head_rows = ids if head_index is None else head_index[ids]
    inside = (head_rows >= 0) & exists[..., None]
    p = np.where(inside, np.exp(logp - logp.max(axis=-1, keepdims=True)), 0.0)
    total = p.sum(axis=-1, keepdims=True)
    weights = np.where(total > 0, p / np.maximum(total, 1e-30), 0.0).astype(np.float32)
    return np.maximum(head_rows, 0).astype(np.int32).reshape(N, len(idx), k), weights


class Batches:
    """Host-side batch assembly: contexts (float16 -> float32, with the feature layers the
    drafter reads), embeddings, targets, and the teacher's top-k for the distillation losses.

    `noise` > 0 adds Gaussian noise to each context row, `noise` times the row's RMS, drawn
    from `seed` and the batch's step (so a resumed run draws the same noise)."""

    def __init__(
        self,
        model,
        data: DistillData,
        pos: Positions,
        targets: np.ndarray,
        *,
        features: Sequence[int] = (),
        head_index: np.ndarray | None = None,
        teacher: bool = False,
        noise: float = 0.0,
        seed: int = 0,
    ):
        self.model, self.data, self.pos, self.targets = model, data, pos, targets
        self.num_predict = targets.shape[1]
        self.features = tuple(features)
        self.head_index = head_index
        self.teacher = teacher
        self.noise = noise
        self.seed = seed
        if teacher and data.top_ids is None:
            raise TrainError(
                "the distillation losses need the base's top-k in the data: make it with "
                "--top-k (e.g. 32)"
            )

    def get(self, idx: np.ndarray, step: int | None = None):
        """-> (context, embeddings, targets (N, B)[, teacher rows, teacher weights])."""
        idx = np.sort(idx)  # contiguous reads; the loss does not depend on the order
        context = mx.array(self.data.context(self.pos.rows[idx], self.features))
        context = context.astype(mx.float32)
        if self.noise and step is not None:
            key = mx.random.key(self.seed * 1_000_003 + step)
            rms = mx.sqrt(mx.mean(context * context, axis=-1, keepdims=True))
            context = context + self.noise * rms * mx.random.normal(context.shape, key=key)
        inputs = np.maximum(self.pos.windows[idx, : self.num_predict], 0)
        embeddings = self.model.embed(mx.array(inputs)).astype(mx.float32)
        out = (context, embeddings, mx.array(self.targets[idx].T))
        if self.teacher:
            rows, weights = teacher_targets(self.data, self.pos, idx, self.head_index)
            out += (mx.array(rows), mx.array(weights))
        return out


# ---------------------------------------------------------------------------------------------
# The training forward and the loss


def draft_logits(drafter, hidden: mx.array, embeddings: mx.array) -> mx.array:
    """Teacher-forced drafter logits for all heads at once: (N, B, K).

    hidden (B, h): H_t, the context. embeddings (B, N, h): E[x_{t+1}] .. E[x_{t+N}]. Head i
    runs the RNN over the first i of them from s_0 = 0, exactly as beam search does from
    g0 = x_{t+1}, so logits[i-1] is the drafter's inference-time distribution for x_{t+i+1}.
    """
    B, N, _ = embeddings.shape
    state = drafter.initial_state(B)
    term = drafter.context_term(hidden)
    states = []
    for i in range(N):
        state = drafter.next_state(state, embeddings[:, i], term)
        states.append(state)
    return drafter.head(hidden[None], mx.stack(states))


@mx.custom_function
def _soft_cross_entropy(logits: mx.array, ids: mx.array, weights: mx.array):
    """-> (sum_j w_j * (logsumexp(logits) - logits[ids_j]) (...,), softmax (..., K)): the
    cross-entropy to a target distribution given as (ids, weights) (..., k); one-hot is
    k = 1. One exp pass serves the loss and, kept as the second output, its gradient: on a
    CPU the exps over (N, B, K) logits cost about as much as the head's matmuls, and
    logsumexp's own gradient would run them again."""
    top = mx.max(logits, axis=-1, keepdims=True)
    e = mx.exp(logits - top)
    total = e.sum(axis=-1, keepdims=True)
    lse = mx.log(total) + top
    picked = mx.take_along_axis(logits, ids, axis=-1)
    return (weights * (lse - picked)).sum(axis=-1), e / total


@_soft_cross_entropy.vjp
def _soft_cross_entropy_vjp(primals, cotangents, outputs):
    logits, ids, weights = primals
    g = cotangents[0][..., None]
    grad = outputs[1] * (g * weights.sum(axis=-1, keepdims=True))  # softmax * sum(w)
    # minus the target distribution, scatter-added (an id may appear twice)
    K, k = logits.shape[-1], ids.shape[-1]
    flat = grad.reshape(-1, K)
    rows = mx.broadcast_to(mx.arange(flat.shape[0])[:, None], (flat.shape[0], k))
    flat = flat.at[rows, ids.reshape(-1, k)].add(-(g * weights).reshape(-1, k))
    return flat.reshape(grad.shape), mx.zeros_like(ids), mx.zeros_like(weights)


def _cross_entropy(logits: mx.array, targets: mx.array):
    """Cross-entropy to one target id per row: (loss (...,), softmax)."""
    ones = mx.ones(targets.shape + (1,), logits.dtype)
    return _soft_cross_entropy(logits, targets[..., None], ones)


def loss_terms(drafter, hidden, embeddings, targets, teacher_ids=None, teacher_w=None, kd=0.0):
    """targets (N, B) from head_targets (transposed); teacher_ids/teacher_w (N, B, k) from
    teacher_targets, kd the weight of the distillation term (0: cross-entropy to the labels
    only, 1: to the teacher only). -> (loss, per-head loss sum, counts (4, N): trained
    targets, correct, chain-correct, existing targets). The per-head loss is the label's
    cross-entropy (what evaluation reports) whatever the weights."""
    logits = draft_logits(drafter, hidden, embeddings).astype(mx.float32)  # (N, B, K)
    trained = targets >= 0
    n_trained = trained.sum(axis=1)
    if kd and teacher_ids is not None:
        # One pass: the label with weight (1 - kd) / n_trained and the teacher's
        # distribution with weight kd / n_taught, per head.
        taught = teacher_w.sum(axis=-1) > 0  # (N, B)
        n_taught = mx.maximum(taught.sum(axis=1), 1)[:, None]
        w_label = (1.0 - kd) * trained / mx.maximum(n_trained, 1)[:, None]
        ids = mx.concatenate([mx.maximum(targets, 0)[..., None], teacher_ids], axis=-1)
        w = mx.concatenate([w_label[..., None], teacher_w * (kd / n_taught)[..., None]], -1)
        loss = _soft_cross_entropy(logits, ids, w)[0].sum(axis=1).mean()
        lse = mx.logsumexp(mx.stop_gradient(logits), axis=-1)
        picked = mx.take_along_axis(mx.stop_gradient(logits), mx.maximum(targets, 0)[..., None], -1)
        head_loss = ((lse - picked[..., 0]) * trained).sum(axis=1)
    else:
        ce = _cross_entropy(logits, mx.maximum(targets, 0))[0] * trained
        head_loss = ce.sum(axis=1)
        loss = (head_loss / mx.maximum(n_trained, 1)).mean()
    exists = targets > -2
    correct = (mx.argmax(logits, axis=-1) == targets) & trained
    chain = mx.cumprod(correct.astype(mx.int32), axis=0) > 0
    counts = mx.stack(
        [n_trained, correct.sum(axis=1), (chain & exists).sum(axis=1), exists.sum(axis=1)]
    )  # (4, N)
    return loss, head_loss, counts


# ---------------------------------------------------------------------------------------------
# Metrics


def summarise(head_loss: np.ndarray, counts: np.ndarray) -> dict:
    """Per-head loss and accuracies from `loss_terms`' sums (over one batch or many)."""
    n_trained, correct, chain, exists = counts
    head_acc = correct / np.maximum(exists, 1)
    chain_acc = chain / np.maximum(exists, 1)
    return {
        "loss": float(np.mean(head_loss / np.maximum(n_trained, 1))),
        "head_loss": [round(float(x), 5) for x in head_loss / np.maximum(n_trained, 1)],
        "head_accuracy": [round(float(x), 5) for x in head_acc],
        "chain_accuracy": [round(float(x), 5) for x in chain_acc],
        # Tokens per step of W=1, L=N+1 decoding if acceptance followed the teacher-forced
        # chain accuracy: g0 plus each drafted token whose heads so far were all right.
        "expected_tokens_per_step_w1": round(1.0 + float(np.sum(chain_acc)), 4),
        "targets": int(exists.sum()),
    }


def evaluate(
    drafter, model, data: DistillData, pos: Positions, targets: np.ndarray, batch_size: int = 512
) -> dict:
    """Teacher-forced loss and per-head top-1 accuracy over a held-out set."""
    batches = Batches(model, data, pos, targets, features=drafter.feature_layers)
    N = targets.shape[1]
    head_loss, counts = np.zeros(N), np.zeros((4, N), np.int64)
    for start in range(0, len(pos), batch_size):
        idx = np.arange(start, min(start + batch_size, len(pos)))
        _, hl, c = loss_terms(drafter, *batches.get(idx))
        mx.eval(hl, c)
        head_loss += np.array(hl, np.float64)
        counts += np.array(c, np.int64)
    return summarise(head_loss, counts)
