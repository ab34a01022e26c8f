"""The training loop and the whole job.

`fit` trains a drafter on a DistillData with the base frozen: the hyperparameters are one
FitConfig; a plan (split, draft vocabulary, examples, step counts) is fixed before the first
step; the run's changing state (drafter, optimizer, data order, curves) is checkpointed to
`work_dir/checkpoint` every N steps and on Ctrl-C, and a resumed run is bit-identical to an
uninterrupted one. `train_drafter` is the whole job: load the base, build the data set, fit,
write the log.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..drafter import init_drafter, load_drafter, save_drafter
from ..env import DTYPES, machine
from ..errors import DrafterError, TrainError, TrainInterrupted
from ..loading import load
from .data import (
    DATA_SEED,
    DEFAULT_GEN_BATCH,
    DEFAULT_SHARD_SIZE,
    DistillData,
    build_dataset,
    describe_model,
    model_fingerprint,
    progress_bar,
    same_model,
    stop_ids,
)
from .objective import (
    LOSSES,
    Batches,
    Positions,
    coverage,
    draft_vocabulary,
    evaluate,
    head_targets,
    loss_terms,
    make_positions,
    size_for_coverage,
    summarise,
    target_counts,
    vocabulary_index,
)

DEFAULT_CHECKPOINT_EVERY = 200
DEFAULT_TOP_K = 32  # the teacher's distribution kept per position for the distillation losses
SAVE_DTYPES = (None, "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class FitConfig:
    """The training hyperparameters of one `fit`.

    A batch is `batch_size` positions; each epoch visits every training position once in a
    seeded order. The learning rate warms up linearly over `warmup_fraction` of the steps to
    `learning_rate`, then follows a cosine to 0. `max_steps` stops early (with a checkpoint);
    `save_dtype` is the saved drafter's dtype (None: float32).

    Drafter v2 levers: `loss` "ce" (labels), "kd" (the base's top-k distribution) or "mix"
    (`kd_weight` on the distribution, the rest on the label); `feature_layers` (base blocks
    the context reads besides the last); `feature_noise` (Gaussian noise on the context,
    times its RMS); `patience` (stop after that many evaluations without a better held-out
    predicted tokens per step, and keep the best); `draft_vocab_coverage` (the smallest
    draft vocabulary covering that share of the training targets; overrides the size).
    """

    epochs: int = 1
    learning_rate: float = 1e-3
    batch_size: int = 256
    num_predict: int = 5
    num_layers: int = 2
    draft_vocab_size: int = 0
    exit_dim: int | None = None
    seed: int = 0
    eval_fraction: float = 0.05
    eval_every: int | None = None
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    warmup_fraction: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    save_dtype: str | None = None
    max_steps: int | None = None
    loss: str = "ce"
    kd_weight: float = 0.5
    feature_layers: tuple[int, ...] = ()
    feature_noise: float = 0.0
    patience: int | None = None
    draft_vocab_coverage: float | None = None

    @property
    def kd(self) -> float:
        """The weight of the distillation term."""
        return {"ce": 0.0, "kd": 1.0, "mix": self.kd_weight}[self.loss]

    def check(self) -> None:
        """Raise TrainError for a setting out of range."""
        for name, low in (
            ("epochs", 1),
            ("batch_size", 1),
            ("num_predict", 1),
            ("num_layers", 0),
            ("draft_vocab_size", 0),
            ("checkpoint_every", 1),
        ):
            value = getattr(self, name)
            if value < low:
                raise TrainError(f"{name} must be >= {low}, got {value}")
        if self.learning_rate <= 0:
            raise TrainError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.loss not in LOSSES:
            raise TrainError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise TrainError(f"kd_weight must be in [0, 1], got {self.kd_weight}")
        if self.feature_noise < 0:
            raise TrainError(f"feature_noise must be >= 0, got {self.feature_noise}")
        if self.patience is not None and self.patience < 1:
            raise TrainError(f"patience must be >= 1, got {self.patience}")
        if self.save_dtype not in SAVE_DTYPES:
            raise TrainError(
                f"save_dtype must be float32, float16 or bfloat16, got {self.save_dtype!r}"
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
# Checkpoints


def save_checkpoint(ckpt: Path, drafter, optimizer, state: dict, order: np.ndarray | None):
    """drafter weights, optimizer state, data order and counters, replaced atomically."""
    tmp, old = ckpt.with_name(ckpt.name + ".tmp"), ckpt.with_name(ckpt.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_drafter(drafter, tmp / "drafter")
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
    if order is not None:
        np.save(tmp / "order.npy", order)
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(old, ignore_errors=True)
    if ckpt.exists():
        os.replace(ckpt, old)
    os.replace(tmp, ckpt)
    shutil.rmtree(old, ignore_errors=True)


def check_resumable(path: Path, saved: dict, settings: dict) -> None:
    """A checkpoint resumes only the run it was made by: same base, data and settings."""
    if not same_model(saved["data"]["base_model"], settings["data"]["base_model"]):
        raise TrainError(
            f"the checkpoint in {path} was made for another base model "
            f"({describe_model(saved['data']['base_model'])}): use another work dir or "
            "--no-resume"
        )
    changed = [k for k in settings if k != "data" and saved.get(k) != settings[k]]
    if changed or saved["data"] != settings["data"]:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {settings[k]!r}" for k in changed)
        raise TrainError(
            f"the checkpoint in {path} was made with other settings "
            f"({diffs or 'the training data changed'}): use the same settings to resume, or "
            "--no-resume to start over"
        )


def find_checkpoint(ckpt: Path) -> Path | None:
    """The checkpoint to resume from: `ckpt`, or the one a crash mid-save left as .old."""
    for path in (ckpt, ckpt.with_name(ckpt.name + ".old")):
        if (path / "state.json").exists():
            return path
    return None


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
class _Plan:
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


def _check_inputs(model, data: DistillData, config: FitConfig) -> None:
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


def _plan(model, data: DistillData, config: FitConfig, eos_token_ids: Sequence[int]) -> _Plan:
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
    head_index = vocabulary_index(vocab, V)
    train_pos = make_positions(data, train_seqs, config.num_predict)
    eval_pos = make_positions(data, eval_seqs, config.num_predict)
    if len(train_pos) == 0:
        raise TrainError("no training examples: the responses are too short (need >= 2 tokens)")
    bs = min(config.batch_size, len(train_pos))
    steps_per_epoch = len(train_pos) // bs
    total = config.epochs * steps_per_epoch
    plan = _Plan(
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
    plan.settings = _settings(plan, data)
    return plan


def _settings(plan: _Plan, data: DistillData) -> dict:
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
        "data": {k: v for k, v in data.fingerprint.items()},
        "sequences": data.num_sequences,
    }


# ---------------------------------------------------------------------------------------------
# The run's state: what changes step by step, and what a checkpoint holds


@dataclass
class _State:
    drafter: object
    optimizer: optim.Optimizer
    rng: np.random.Generator
    step: int = 0
    order: np.ndarray | None = None  # this epoch's permutation of the training positions
    order_epoch: int = -1
    curves: dict = field(
        default_factory=lambda: {"loss": [], "head_accuracy": [], "learning_rate": []}
    )
    evals: list = field(default_factory=list)
    seconds: dict = field(default_factory=lambda: {"train": 0.0, "eval": 0.0})

    def counters(self, settings: dict) -> dict:
        """The checkpoint's state.json."""
        return {
            "version": 1,
            "settings": settings,
            "step": self.step,
            "rng": self.rng.bit_generator.state,
            "order_epoch": self.order_epoch,
            "curves": self.curves,
            "evals": self.evals,
            "seconds": self.seconds,
        }

    def save(self, ckpt_dir: Path, settings: dict) -> None:
        save_checkpoint(ckpt_dir, self.drafter, self.optimizer, self.counters(settings), self.order)


def _start(model, plan: _Plan, ckpt_dir: Path, resume: bool) -> _State:
    """A fresh drafter and optimizer, or the checkpoint's when resuming."""
    c = plan.config
    drafter = init_drafter(
        model,
        seed=c.seed,
        exit_dim=c.exit_dim,
        num_draft_layers=c.num_layers,
        draft_vocab_ids=None if plan.vocab is None else plan.vocab.tolist(),
        feature_layers=c.feature_layers,
    )
    optimizer = optim.AdamW(
        learning_rate=lr_schedule(c.learning_rate, plan.warmup, plan.total),
        weight_decay=c.weight_decay,
    )
    state = _State(drafter, optimizer, np.random.default_rng(c.seed))
    found = find_checkpoint(ckpt_dir) if resume else None
    if not resume:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    if found is not None:
        saved = json.loads((found / "state.json").read_text())
        check_resumable(found, saved["settings"], plan.settings)
        state.drafter = load_drafter(found / "drafter", base=model)
        state.optimizer.state = tree_unflatten(
            list(mx.load(str(found / "optimizer.safetensors")).items())
        )
        state.step = saved["step"]
        state.rng.bit_generator.state = saved["rng"]
        state.order_epoch = saved["order_epoch"]
        if (found / "order.npy").exists():
            state.order = np.load(found / "order.npy")
        state.curves, state.evals = saved["curves"], saved["evals"]
        state.seconds = saved["seconds"]
    return state


# ---------------------------------------------------------------------------------------------
# Steps and evaluations


def _step_function(state: _State, max_grad_norm: float, kd: float):
    """The compiled update: loss and gradients, clipping, the optimizer step."""
    drafter, optimizer = state.drafter, state.optimizer
    loss_and_grad = nn.value_and_grad(drafter, loss_terms)

    def train_step(hidden, embeddings, targets, *teacher):
        (loss, head_loss, counts), grads = loss_and_grad(
            drafter, hidden, embeddings, targets, *teacher, kd=kd
        )
        if max_grad_norm:
            grads, _ = optim.clip_grad_norm(grads, max_grad_norm)
        optimizer.update(drafter, grads)
        return loss, head_loss, counts

    compiled_state = [drafter.state, optimizer.state]
    return mx.compile(train_step, inputs=compiled_state, outputs=compiled_state)


def _one_step(state: _State, plan: _Plan, train_step, batches: Batches) -> dict:
    """One optimizer step on the next batch of this epoch's order; -> its metrics."""
    epoch, k = divmod(state.step, plan.steps_per_epoch)
    if state.order_epoch != epoch:
        state.order, state.order_epoch = state.rng.permutation(len(plan.train_pos)), epoch
    bs = plan.batch_size
    idx = state.order[k * bs : (k + 1) * bs]
    t0 = time.perf_counter()
    loss, head_loss, counts = train_step(*batches.get(idx, state.step))
    mx.eval(loss, head_loss, counts, state.drafter.parameters(), state.optimizer.state)
    metrics = summarise(np.array(head_loss, np.float64), np.array(counts, np.int64))
    state.curves["loss"].append(float(loss.item()))
    state.curves["head_accuracy"].append(metrics["head_accuracy"])
    c = plan.config
    state.curves["learning_rate"].append(
        lr_at(c.learning_rate, plan.warmup, plan.total, state.step)
    )
    state.step += 1
    state.seconds["train"] += time.perf_counter() - t0
    return metrics


def _evaluate_now(state: _State, plan: _Plan, model, data: DistillData) -> None:
    """Evaluate on the held-out positions (if any) and log it at this step."""
    if len(plan.eval_pos) == 0:
        return
    t0 = time.perf_counter()
    result = evaluate(
        state.drafter,
        model,
        data,
        plan.eval_pos,
        plan.eval_targets,
        batch_size=max(plan.batch_size, 256),
    )
    state.seconds["eval"] += time.perf_counter() - t0
    state.evals.append({"step": state.step, "epoch": state.step / plan.steps_per_epoch, **result})


def _show(bar, state: _State, metrics: dict) -> None:
    if bar is None:
        return
    bar.update(1)
    acc = "/".join(f"{a:.2f}" for a in metrics["head_accuracy"])
    post = f"loss {np.mean(state.curves['loss'][-20:]):.3f} acc {acc}"
    if state.evals:
        post += f" | eval {state.evals[-1]['expected_tokens_per_step_w1']:.2f} tok/step"
    bar.set_postfix_str(post, refresh=False)


# ---------------------------------------------------------------------------------------------
# Training


def _train(model, data, plan: _Plan, state: _State, work_dir: Path, progress, callback) -> None:
    """Step from the state's step to the plan's last, evaluating and checkpointing; on Ctrl-C
    save a checkpoint of the last finished step and raise TrainInterrupted."""
    ckpt_dir = work_dir / "checkpoint"
    c = plan.config
    train_step = _step_function(state, c.max_grad_norm, c.kd)
    batches = Batches(
        model,
        data,
        plan.train_pos,
        plan.train_targets,
        features=c.feature_layers,
        head_index=plan.head_index,
        teacher=c.kd > 0,
        noise=c.feature_noise,
        seed=c.seed,
    )
    bar = progress_bar(progress, total=plan.total, initial=state.step, desc="training", unit="step")
    snapshot = None  # the state before the step under way, None between steps
    try:
        step = state.step
        if (
            step > 0
            and plan.eval_due(step)
            and not (state.evals and state.evals[-1]["step"] == step)
        ):
            _evaluate_now(state, plan, model, data)  # interrupted during this step's evaluation
            _keep_best(state, plan, work_dir)
        while state.step < plan.last and not _stop_early(state, plan):
            snapshot = (state.drafter.parameters(), tree_map(lambda x: x, state.optimizer.state))
            metrics = _one_step(state, plan, train_step, batches)
            snapshot = None
            if plan.eval_due(state.step):
                _evaluate_now(state, plan, model, data)
                _keep_best(state, plan, work_dir)
            _show(bar, state, metrics)
            if callback is not None:
                callback(state.step, {"loss": state.curves["loss"][-1], **metrics})
            if (
                state.step % plan.config.checkpoint_every == 0
                or state.step == plan.last
                or _stop_early(state, plan)
            ):
                state.save(ckpt_dir, plan.settings)
    except KeyboardInterrupt:
        if snapshot is not None:  # the step did not finish: keep the state from before it
            state.drafter.update(snapshot[0])
            state.optimizer.state = snapshot[1]
        state.save(ckpt_dir, plan.settings)
        raise TrainInterrupted(
            f"training interrupted at step {state.step}/{plan.total}; checkpoint saved in "
            f"{ckpt_dir}: run the same command again to resume",
            step=state.step,
            work_dir=work_dir,
        ) from None
    finally:
        if bar is not None:
            bar.close()


SCORE = "expected_tokens_per_step_w1"  # what early stopping maximises


def _best_eval(state: _State) -> dict | None:
    """The held-out evaluation with the most predicted tokens per step (the first of ties)."""
    best = None
    for e in state.evals:
        if best is None or e[SCORE] > best[SCORE]:
            best = e
    return best


def _keep_best(state: _State, plan: _Plan, work_dir: Path) -> None:
    """With early stopping, save the drafter of the best evaluation so far beside the
    checkpoint (the drafter written at the end)."""
    if plan.config.patience and state.evals and _best_eval(state) is state.evals[-1]:
        save_drafter(state.drafter, work_dir / "best")


def _stop_early(state: _State, plan: _Plan) -> bool:
    """Whether `patience` evaluations have passed without beating the best one."""
    patience = plan.config.patience
    if not patience or not state.evals:
        return False
    best = _best_eval(state)
    return len(state.evals) - 1 - state.evals.index(best) >= patience


def fit(
    model,
    data: DistillData,
    out_dir: str | os.PathLike,
    *,
    work_dir: str | os.PathLike,
    config: FitConfig = FitConfig(),
    eos_token_ids: Sequence[int] = (),
    resume: bool = True,
    progress: bool = True,
    callback: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train a drafter on `data` with the base frozen; write it to `out_dir`; return the log.

    One example is one position t of a sequence (its context H_t and the N+1 tokens after
    it), so a batch is `config.batch_size` positions drawn from all sequences. The loss is the
    mean over heads of each head's mean cross-entropy over its trained targets. The run
    checkpoints to `work_dir/checkpoint` every `config.checkpoint_every` steps and on Ctrl-C
    (raising TrainInterrupted); calling again with the same arguments resumes it, with the
    same result as an uninterrupted run. `config.max_steps` stops (with a checkpoint) after
    that many steps in all; `callback(step, metrics)` runs after every step. `eos_token_ids`
    are always in the draft vocabulary.
    """
    _check_inputs(model, data, config)
    t_start = time.perf_counter()
    work_dir, out_dir = Path(work_dir), Path(out_dir)
    plan = _plan(model, data, config, eos_token_ids)
    state = _start(model, plan, work_dir / "checkpoint", resume)
    if state.step == 0:  # an earlier run's best is not this run's
        shutil.rmtree(work_dir / "best", ignore_errors=True)
    _train(model, data, plan, state, work_dir, progress, callback)
    if config.patience and state.evals and (work_dir / "best").exists():
        best = load_drafter(work_dir / "best", base=model, dtype=mx.float32)
        state.drafter.update(best.parameters())
    if config.save_dtype is not None and config.save_dtype != "float32":
        state.drafter.set_dtype(DTYPES[config.save_dtype])
    save_drafter(state.drafter, out_dir)
    return _fit_log(plan, state, out_dir, time.perf_counter() - t_start)


def _fit_log(plan: _Plan, state: _State, out_dir: Path, this_run: float) -> dict:
    seconds, vocab, drafter = state.seconds, plan.vocab, state.drafter
    best = _best_eval(state) if plan.config.patience else None
    return {
        "finished": state.step == plan.total or _stop_early(state, plan),
        "stopped_early": state.step < plan.total and _stop_early(state, plan),
        "best_step": best["step"] if best else None,
        "steps": state.step,
        "settings": plan.settings,
        "draft_vocab": {
            "size": 0 if vocab is None else len(vocab),
            "coverage_train": round(coverage(plan.counts_train, vocab), 5),
            "coverage_eval": round(coverage(plan.counts_eval, vocab), 5),
        },
        "data": {
            "train_sequences": len(plan.train_seqs),
            "eval_sequences": len(plan.eval_seqs),
            "train_positions": len(plan.train_pos),
            "eval_positions": len(plan.eval_pos),
            "train_tokens_seen": state.step * plan.batch_size,
        },
        "drafter": {
            "path": str(out_dir),
            "description": drafter.describe(),
            "parameters": drafter.num_parameters,
            "bytes": drafter.nbytes,
            "dtype": plan.config.save_dtype or "float32",
        },
        "curves": state.curves,
        "evals": state.evals,
        "final_eval": best or (state.evals[-1] if state.evals else None),
        "seconds": {
            "train": round(seconds["train"], 2),
            "eval": round(seconds["eval"], 2),
            "this_run": round(this_run, 2),
        },
        "steps_per_s": round(state.step / seconds["train"], 4) if seconds["train"] else None,
    }


# ---------------------------------------------------------------------------------------------
# The whole job


def train_drafter(
    model=None,
    prompts_file: str | os.PathLike = "",
    out_dir: str | os.PathLike = "",
    *,
    tokenizer=None,
    num_prompts: int | None = 1000,
    new_tokens: int = 128,
    epochs: int = 1,
    learning_rate: float = 1e-3,
    batch_size: int = 256,
    num_predict: int = 5,
    num_layers: int = 2,
    draft_vocab_size: int = 0,
    exit_dim: int | None = None,
    seed: int = 0,
    target: str = "self",
    eval_fraction: float = 0.05,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    work_dir: str | os.PathLike | None = None,
    resume: bool = True,
    progress: bool = True,
    dtype: str | None = None,
    gen_batch_size: int = DEFAULT_GEN_BATCH,
    shard_size: int = DEFAULT_SHARD_SIZE,
    save_dtype: str | None = None,
    eval_every: int | None = None,
    max_steps: int | None = None,
    callback: Callable[[int, dict], None] | None = None,
    loss: str = "ce",
    kd_weight: float = 0.5,
    top_k: int | None = None,
    feature_layers: Sequence[int] | str = (),
    data_feature_layers: Sequence[int] | str | None = None,
    feature_noise: float = 0.0,
    weight_decay: float = 0.0,
    patience: int | None = None,
    draft_vocab_coverage: float | None = None,
    time_budget: float | None = None,
    workers: int = 1,
) -> dict:
    """Distil a drafter for `model` from `prompts_file` into `out_dir`; return the log.

    model: a model directory, .gguf or Hugging Face id, None for the default model, or a
    loaded model object (then pass `tokenizer`). Writes the drafter (config.json +
    model.safetensors, loadable with `load_drafter`) and `training_log.json` to `out_dir`;
    data shards and checkpoints go to `work_dir` (default: `<out_dir>-work` beside it).
    Interrupted runs (Ctrl-C raises TrainInterrupted) resume from there when called again.

    The data stores the base's top-`top_k` distribution (default 32 for the "kd" and "mix"
    losses, else none) and the states of `data_feature_layers` (default: the drafter's
    `feature_layers`; a superset lets drafters with fewer layers share the data); "auto"
    for either is the blocks one third and two thirds deep.
    `time_budget` (seconds) bounds data generation; `workers` processes make it (see
    build_dataset). See FitConfig for the rest.
    """
    t0 = time.perf_counter()
    out_dir, work_dir = _output_dirs(out_dir, work_dir)
    model_arg = model
    model, tokenizer, model_name = _base_model(model, tokenizer, dtype)
    t_load = time.perf_counter() - t0
    n_blocks = model.args.num_hidden_layers
    feature_layers = auto_feature_layers(n_blocks) if feature_layers == "auto" else feature_layers
    if data_feature_layers == "auto":
        data_feature_layers = auto_feature_layers(n_blocks)
    config = FitConfig(
        epochs=epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        num_predict=num_predict,
        num_layers=num_layers,
        draft_vocab_size=draft_vocab_size,
        exit_dim=exit_dim,
        seed=seed,
        eval_fraction=eval_fraction,
        eval_every=eval_every,
        checkpoint_every=checkpoint_every,
        save_dtype=save_dtype,
        max_steps=max_steps,
        loss=loss,
        kd_weight=kd_weight,
        feature_layers=tuple(int(i) for i in feature_layers),
        feature_noise=feature_noise,
        weight_decay=weight_decay,
        patience=patience,
        draft_vocab_coverage=draft_vocab_coverage,
    )
    config.check()
    if top_k is None:
        top_k = DEFAULT_TOP_K if config.kd else 0
    data_layers = config.feature_layers if data_feature_layers is None else data_feature_layers
    data_layers = tuple(int(i) for i in data_layers)
    missing = [i for i in config.feature_layers if i not in data_layers]
    if missing:
        raise TrainError(f"the data's feature layers {list(data_layers)} lack {missing}")
    by_name = isinstance(model_arg, (str, os.PathLike)) or model_arg is None
    source = (None if model_arg is None else str(model_arg), dtype) if by_name else None

    t1 = time.perf_counter()
    data = build_dataset(
        model,
        tokenizer,
        prompts_file,
        work_dir,
        num_prompts=num_prompts,
        new_tokens=new_tokens,
        target=target,
        batch_size=gen_batch_size,
        shard_size=shard_size,
        resume=resume,
        progress=progress,
        top_k=top_k,
        feature_layers=data_layers,
        time_budget=time_budget,
        workers=workers,
        model_source=source,
    )
    t_data = time.perf_counter() - t1
    result = fit(
        model,
        data,
        out_dir,
        work_dir=work_dir,
        config=config,
        eos_token_ids=stop_ids(tokenizer),
        resume=resume,
        progress=progress,
        callback=callback,
    )
    job = {
        "prompts_file": str(Path(prompts_file).resolve()),
        "num_prompts": num_prompts,
        "new_tokens": new_tokens,
        "target": target,
        "gen_batch_size": gen_batch_size,
        "top_k": top_k,
        "data_feature_layers": list(data_layers),
        "workers": workers,
        "save_dtype": save_dtype,
        "work_dir": str(work_dir.resolve()),
    }
    times = {"load": round(t_load, 2), "data_this_run": round(t_data, 2)}
    log = _job_log(model, model_name, data, result, job, times, t0)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    return log


def _job_log(model, model_name, data, result: dict, job: dict, times: dict, t0: float) -> dict:
    """training_log.json: the base, the job's settings and fit's log, timings, the machine."""
    log = {
        "base_model": {
            "name": model_name,
            **model_fingerprint(model),
            "dtype": str(model.model.norm.weight.dtype).split(".")[-1],
        },
        "settings": {
            **job,
            **{k: v for k, v in result.pop("settings").items() if k != "data"},
        },
        "data": {**data.stats, **result.pop("data")},
        **result,
    }
    log["seconds"].update(
        **times,
        generation_total=data.stats["generation_seconds"],
        total_this_run=round(time.perf_counter() - t0, 2),
    )
    log["machine"] = machine()
    return log


def auto_feature_layers(num_blocks: int) -> tuple[int, ...]:
    """The blocks one third and two thirds deep (EAGLE-3 reads a low, a middle and a high
    layer; the last is always read)."""
    return tuple(sorted({max(0, num_blocks // 3 - 1), max(0, 2 * num_blocks // 3 - 1)}))


def _output_dirs(out_dir, work_dir) -> tuple[Path, Path]:
    """The drafter's directory and the work directory (default: `<out_dir>-work`)."""
    if not str(out_dir):
        raise TrainError("no output directory given")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainError(f"output {out_dir} exists and is not a directory")
    work_dir = Path(work_dir) if work_dir is not None else out_dir.with_name(out_dir.name + "-work")
    return out_dir, work_dir


def _base_model(model, tokenizer, dtype: str | None):
    """-> (frozen base model, tokenizer, name for the log), loading it if given by name."""
    if isinstance(model, (str, os.PathLike)) or model is None:
        model_name = "default" if model is None else str(model)
        model, loaded_tokenizer = load(model, dtype=dtype)
        tokenizer = tokenizer or loaded_tokenizer
    else:
        model_name = "<in-memory model>"
        if tokenizer is None:
            raise TrainError("pass the tokenizer along with a loaded model")
    model.freeze()
    return model, tokenizer, model_name
