"""Drafter training by self-distillation: the base model, frozen, teaches the drafter its
own next tokens.

The pipeline, one file per stage, each resumable from a work directory:
  config.py     what a job is asked to do: `DataConfig` (the data) and `FitConfig` (the
                training run), every default written once.
  data.py       prompts -> the distillation data set: sequences (last prompt token + the
                response) with the base's hidden state before each token, in float16 shards
                on disk (`build_dataset`, `DistillData`); the response is the base's greedy
                output (target "self") or the prompt file's answer (targets "dataset" and
                "relabel"). shards.py makes the shards (optionally with the base's top-k
                log-probabilities and the states of a few more layers, from the same
                forward), in this process or several worker processes, within a time budget.
  objective.py  what is learnt: the draft vocabulary (by size or by coverage), the training
                examples (one per position), the teacher-forced forward that equals beam
                search's (`draft_logits`), the losses (cross-entropy to the label, to the
                teacher's top-k, or a mix) and the evaluation.
  plan.py       what a run fixes before its first step: split, vocabulary, step counts,
                the learning-rate schedule.
  checkpoint.py the run's state and its checkpoints (a resumed run is bit-identical to an
                uninterrupted one).
  loop.py       the training loop (`fit`): steps, evaluations, early stopping on held-out
                predicted tokens per step.
  job.py        `train_drafter`, the whole job: data, fit, the log.
The library never prints; progress goes through tqdm bars that `progress=False` turns off.
"""

from ..errors import TrainError, TrainInterrupted
from .config import (
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_GEN_BATCH,
    DEFAULT_SHARD_SIZE,
    TARGETS,
    DataConfig,
    FitConfig,
    auto_feature_layers,
)
from .data import (
    DATA_SEED,
    MAX_PROMPT_TOKENS,
    DistillData,
    build_dataset,
    model_fingerprint,
    select_prompts,
    stop_ids,
)
from .job import train_drafter
from .loop import fit
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
from .plan import lr_at, lr_schedule, split_sequences

__all__ = [
    "DATA_SEED",
    "DEFAULT_CHECKPOINT_EVERY",
    "DEFAULT_GEN_BATCH",
    "DEFAULT_SHARD_SIZE",
    "MAX_PROMPT_TOKENS",
    "TARGETS",
    "DataConfig",
    "DistillData",
    "FitConfig",
    "Positions",
    "TrainError",
    "TrainInterrupted",
    "auto_feature_layers",
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
