"""Drafter training by self-distillation: the base model, frozen, teaches the drafter its
own next tokens.

The pipeline, one file per stage, each resumable from a work directory:
  data.py       prompts -> the distillation data set: sequences (last prompt token + the
                response) with the base's hidden state before each token, in float16 shards
                on disk (`build_dataset`, `DistillData`); the response is the base's greedy
                output (target "self") or the prompt file's answer (targets "dataset" and
                "relabel"). Optionally the base's top-k log-probabilities at each position
                and the states of a few more layers, from the same forward; several worker
                processes and a time budget.
  objective.py  what is learnt: the draft vocabulary (by size or by coverage), the training
                examples (one per position), the teacher-forced forward that equals beam
                search's (`draft_logits`), the losses (cross-entropy to the label, to the
                teacher's top-k, or a mix) and the evaluation.
  loop.py       the training loop (`fit`, its hyperparameters in one `FitConfig`): the
                learning-rate schedule, checkpoints (a resumed run is bit-identical to an
                uninterrupted one), early stopping on held-out predicted tokens per step,
                and `train_drafter`, the whole job.
The library never prints; progress goes through tqdm bars that `progress=False` turns off.
"""

from ..errors import TrainError, TrainInterrupted
from .data import (
    DATA_SEED,
    DEFAULT_GEN_BATCH,
    DEFAULT_SHARD_SIZE,
    MAX_PROMPT_TOKENS,
    TARGETS,
    DistillData,
    build_dataset,
    model_fingerprint,
    select_prompts,
    stop_ids,
)
from .loop import (
    DEFAULT_CHECKPOINT_EVERY,
    FitConfig,
    fit,
    lr_at,
    lr_schedule,
    split_sequences,
    train_drafter,
)
from .objective import (
    Positions,
    coverage,
    draft_logits,
    draft_vocabulary,
    evaluate,
    head_targets,
    loss_terms,
    make_positions,
    summarise,
    target_counts,
)

__all__ = [
    "DATA_SEED",
    "DEFAULT_CHECKPOINT_EVERY",
    "DEFAULT_GEN_BATCH",
    "DEFAULT_SHARD_SIZE",
    "MAX_PROMPT_TOKENS",
    "TARGETS",
    "DistillData",
    "FitConfig",
    "Positions",
    "TrainError",
    "TrainInterrupted",
    "build_dataset",
    "coverage",
    "draft_logits",
    "draft_vocabulary",
    "evaluate",
    "fit",
    "head_targets",
    "loss_terms",
    "lr_at",
    "lr_schedule",
    "make_positions",
    "model_fingerprint",
    "select_prompts",
    "split_sequences",
    "stop_ids",
    "summarise",
    "target_counts",
    "train_drafter",
]
