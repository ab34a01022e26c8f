"""What a training run fixes before its first step: the learning-rate schedule, the split
into training and held-out sequences, the draft vocabulary, the examples and step counts
(`Plan`), the checks of the data against the base model and the settings, and the settings a
checkpoint must match to resume the run."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..drafter import WEIGHTS_FILE
from ..errors import DrafterError, TrainError
from .config import FitConfig
from .data import DATA_SEED, DistillData, describe_model, model_fingerprint, same_model
from .objective import (
    Positions,
    draft_vocabulary,
    head_targets,
    make_positions,
    size_for_coverage,
    target_counts,
    vocabulary_index,
)

# ---------------------------------------------------------------------------------------------
# Learning-rate schedule: linear warm-up, then a cosine to 0


def lr_schedule(peak: float, warmup: int, total: int):
    def schedule(step):
        step = step.astype(mx.float32)
        warm = peak * (step + 1) / warmup
        progress = mx.clip((step - warmup) / max(1, total - warmup), 0.0, 1.0)
        return mx.where(step < warmup, warm, 0.5 * peak * (1 + mx.cos(math.pi * progress)))

    return schedule


def lr_at(peak: float, warmup: int, total: int, step: int) -> float:
    """The schedule's value at `step`, on the host (for the log)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
    return 0.5 * peak * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# The plan: what a run fixes before its first step


def split_sequences(n: int, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) sequence indices; the split depends only on n and the fraction."""
    if not 0.0 <= eval_fraction < 1.0:
        raise TrainError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    order = np.random.default_rng(DATA_SEED + 1).permutation(n)
    n_eval = int(round(eval_fraction * n))
    if eval_fraction > 0 and n >= 2:
        n_eval = max(1, n_eval)
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


@dataclass
class Plan:
    """The split, the draft vocabulary, the examples and the step counts of a run, and the
    settings a checkpoint must match to resume it."""

    config: FitConfig
    train_seqs: np.ndarray
    eval_seqs: np.ndarray
    counts_train: np.ndarray
    counts_eval: np.ndarray
    vocab: np.ndarray | None
    head_index: np.ndarray | None
    train_pos: Positions
    eval_pos: Positions
    train_targets: np.ndarray
    eval_targets: np.ndarray
    batch_size: int  # the config's, at most the number of training positions
    steps_per_epoch: int
    total: int
    warmup: int
    settings: dict = field(default_factory=dict)
    init_record: dict | None = None  # a warm start's drafter (name, weights digest)

    @property
    def last(self) -> int:
        """The step this call stops at."""
        max_steps = self.config.max_steps
        return self.total if max_steps is None else min(self.total, max_steps)

    @property
    def eval_every(self) -> int | None:
        """Steps between evaluations besides epoch ends (early stopping needs a few)."""
        every = self.config.eval_every
        if every is None and self.config.patience:
            every = max(1, self.steps_per_epoch // 4)
        return every

    def eval_due(self, step: int) -> bool:
        every = self.eval_every
        return (
            step == self.total
            or step % self.steps_per_epoch == 0
            or bool(every and step % every == 0)
        )


def check_inputs(model, data: DistillData, config: FitConfig) -> None:
    config.check()
    h = model.args.hidden_size
    if data.hidden.shape[1] != h:
        raise TrainError(
            f"the data's hidden states have size {data.hidden.shape[1]} but the base model's "
            f"hidden size is {h}: the data was made for another base model"
        )
    base_fp = model_fingerprint(model)
    if data.fingerprint.get("base_model") and not same_model(
        data.fingerprint["base_model"], base_fp
    ):
        raise TrainError(
            f"the data was made for another base model ({describe_model(data.fingerprint['base_model'])})"
        )
    try:
        model.check_features(config.feature_layers)
    except DrafterError as e:
        raise TrainError(str(e)) from None
    missing = [i for i in config.feature_layers if i not in data.feature_layers]
    if missing:
        raise TrainError(
            f"the data holds feature layers {list(data.feature_layers)}, not {missing}: make "
            "it with those feature layers"
        )
    if config.kd and data.top_ids is None:
        raise TrainError(
            "the distillation losses need the base's top-k in the data: make it with "
            "--top-k (e.g. 32)"
        )


def make_plan(
    model,
    data: DistillData,
    config: FitConfig,
    eos_token_ids: Sequence[int],
    vocab_ids: Sequence[int] | None = None,
) -> Plan:
    """The run's split, vocabulary, examples and steps; `vocab_ids`: a warm start's draft
    vocabulary, kept as it is (else one is chosen from the training targets)."""
    V = model.args.vocab_size
    train_seqs, eval_seqs = split_sequences(data.num_sequences, config.eval_fraction)
    counts_train = target_counts(data, train_seqs, V)
    counts_eval = target_counts(data, eval_seqs, V)
    size = config.draft_vocab_size
    if config.draft_vocab_coverage is not None:
        size = size_for_coverage(counts_train, config.draft_vocab_coverage)
        if size:  # EOS ids are always in; count those the most frequent would not hold
            top = set(np.lexsort((np.arange(V), -counts_train))[:size].tolist())
            size += len({int(t) for t in eos_token_ids if 0 <= int(t) < V} - top)
    vocab = draft_vocabulary(counts_train, size, eos_token_ids)
    if vocab_ids is not None:
        vocab = np.array(sorted(int(t) for t in vocab_ids), np.int32)
    head_index = vocabulary_index(vocab, V)
    train_pos = make_positions(data, train_seqs, config.num_predict)
    eval_pos = make_positions(data, eval_seqs, config.num_predict)
    if len(train_pos) == 0:
        raise TrainError("no training examples: the responses are too short (need >= 2 tokens)")
    bs = min(config.batch_size, len(train_pos))
    steps_per_epoch = len(train_pos) // bs
    total = config.epochs * steps_per_epoch
    plan = Plan(
        config=config,
        train_seqs=train_seqs,
        eval_seqs=eval_seqs,
        counts_train=counts_train,
        counts_eval=counts_eval,
        vocab=vocab,
        head_index=head_index,
        train_pos=train_pos,
        eval_pos=eval_pos,
        train_targets=head_targets(train_pos.labels, head_index),
        eval_targets=head_targets(eval_pos.labels, head_index),
        batch_size=bs,
        steps_per_epoch=steps_per_epoch,
        total=total,
        warmup=max(1, int(round(config.warmup_fraction * total))),
    )
    plan.init_record = warm_start_record(config)
    plan.settings = _settings(plan, data)
    return plan


def warm_start_record(config: FitConfig) -> dict | None:
    """What the settings and the log say of a warm start: the drafter's name and weights."""
    if not config.init_from:
        return None
    path = Path(config.init_from)
    digest = hashlib.sha256((path / WEIGHTS_FILE).read_bytes()).hexdigest()[:16]
    return {"drafter": path.name, "weights_sha256": digest}


def _settings(plan: Plan, data: DistillData) -> dict:
    """What a checkpoint must match to resume (and the log's settings)."""
    c = plan.config
    return {
        "epochs": c.epochs,
        "learning_rate": c.learning_rate,
        "batch_size": plan.batch_size,
        "num_predict": c.num_predict,
        "num_layers": c.num_layers,
        "draft_vocab_size": c.draft_vocab_size,
        "exit_dim": c.exit_dim,
        "seed": c.seed,
        "eval_fraction": c.eval_fraction,
        "eval_every": c.eval_every,
        "warmup_steps": plan.warmup,
        "weight_decay": c.weight_decay,
        "max_grad_norm": c.max_grad_norm,
        "total_steps": plan.total,
        "train_positions": len(plan.train_pos),
        "loss": c.loss,
        "kd_weight": c.kd_weight,
        "feature_layers": list(c.feature_layers),
        "feature_noise": c.feature_noise,
        "patience": c.patience,
        "draft_vocab_coverage": c.draft_vocab_coverage,
        "rnn_context": c.rnn_context,
        "rnn_gate": c.rnn_gate,
        "init_from": plan.init_record,
        "data": {k: v for k, v in data.fingerprint.items()},
        "sequences": data.num_sequences,
    }
