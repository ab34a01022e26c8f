"""What the drafter learns: the draft vocabulary, the training examples, the training forward
and its loss, and the teacher-forced evaluation.

One example is one position t of a sequence: its context H_t and the N+1 tokens after it.
Head i (1..N) reads x_{t+1..t+i} through the RNN (x_{t+1} plays g0, which H_t already fixes)
and predicts x_{t+i+1}, or its label. `draft_logits` runs all heads at once, teacher-forced,
and equals what beam search computes step by step. The loss is the mean over heads of each
head's mean cross-entropy over its trained targets.
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


class Batches:
    """Host-side batch assembly: hidden rows (float16 -> float32), embeddings, targets."""

    def __init__(self, model, data: DistillData, pos: Positions, targets: np.ndarray):
        self.model, self.data, self.pos, self.targets = model, data, pos, targets
        self.num_predict = targets.shape[1]

    def get(self, idx: np.ndarray):
        idx = np.sort(idx)  # contiguous reads; the loss does not depend on the order
        hidden = mx.array(self.data.hidden[self.pos.rows[idx]]).astype(mx.float32)
        inputs = np.maximum(self.pos.windows[idx, : self.num_predict], 0)
        embeddings = self.model.embed(mx.array(inputs)).astype(mx.float32)
        return hidden, embeddings, mx.array(self.targets[idx].T)


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
    states = []
    for i in range(N):
        state = drafter.next_state(state, embeddings[:, i])
        states.append(state)
    return drafter.head(hidden[None], mx.stack(states))


@mx.custom_function
def _cross_entropy(logits: mx.array, targets: mx.array):
    """-> (cross-entropy (...,), softmax (..., K)). One exp pass serves the loss and, kept as
    the second output, its gradient: on a CPU the exps over (N, B, K) logits cost about as
    much as the head's matmuls, and logsumexp's own gradient would run them again."""
    top = mx.max(logits, axis=-1, keepdims=True)
    e = mx.exp(logits - top)
    total = e.sum(axis=-1, keepdims=True)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return (mx.log(total) + top)[..., 0] - picked, e / total


@_cross_entropy.vjp
def _cross_entropy_vjp(primals, cotangents, outputs):
    logits, targets = primals
    g = cotangents[0][..., None]
    grad = outputs[1] * g  # softmax - onehot, scaled
    idx = targets[..., None]
    grad = mx.put_along_axis(grad, idx, mx.take_along_axis(grad, idx, axis=-1) - g, axis=-1)
    return grad, mx.zeros_like(targets)


def loss_terms(drafter, hidden, embeddings, targets):
    """targets (N, B) from head_targets (transposed). -> (loss, per-head loss sum, counts
    (4, N): trained targets, correct, chain-correct, existing targets)."""
    logits = draft_logits(drafter, hidden, embeddings).astype(mx.float32)  # (N, B, K)
    trained = targets >= 0
    ce = _cross_entropy(logits, mx.maximum(targets, 0))[0] * trained
    n_trained = trained.sum(axis=1)
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
    batches = Batches(model, data, pos, targets)
    N = targets.shape[1]
    head_loss, counts = np.zeros(N), np.zeros((4, N), np.int64)
    for start in range(0, len(pos), batch_size):
        idx = np.arange(start, min(start + batch_size, len(pos)))
        _, hl, c = loss_terms(drafter, *batches.get(idx))
        mx.eval(hl, c)
        head_loss += np.array(hl, np.float64)
        counts += np.array(c, np.int64)
    return summarise(head_loss, counts)
