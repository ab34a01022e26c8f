"""The training loop: `fit` trains a drafter on a DistillData with the base frozen.

The hyperparameters are one FitConfig; a plan (plan.py: split, draft vocabulary, examples,
step counts) is fixed before the first step; the run's changing state (checkpoint.py) is
checkpointed to `work_dir/checkpoint` every N steps and on Ctrl-C, and a resumed run is
bit-identical to an uninterrupted one. Early stopping keeps the drafter of the best held-out
evaluation. The whole job (data, then fit, then the log) is `train_drafter` in job.py.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from ..drafter import load_drafter, save_drafter
from ..env import DTYPES
from ..errors import TrainInterrupted
from .checkpoint import State, start_run, warm_start
from .config import FitConfig
from .data import DistillData, progress_bar
from .objective import Batches, coverage, evaluate, loss_terms, summarise
from .plan import Plan, check_inputs, lr_at, make_plan

# ---------------------------------------------------------------------------------------------
# Steps and evaluations


def _step_function(state: State, max_grad_norm: float, kd: float):
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


def _one_step(state: State, plan: Plan, train_step, batches: Batches) -> dict:
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


def _evaluate_now(state: State, plan: Plan, model, data: DistillData) -> None:
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


def _show(bar, state: State, metrics: dict) -> None:
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


def _train(model, data, plan: Plan, state: State, work_dir: Path, progress, callback) -> None:
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


def _best_eval(state: State) -> dict | None:
    """The held-out evaluation with the most predicted tokens per step (the first of ties)."""
    best = None
    for e in state.evals:
        if best is None or e[SCORE] > best[SCORE]:
            best = e
    return best


def _keep_best(state: State, plan: Plan, work_dir: Path) -> None:
    """With early stopping, save the drafter of the best evaluation so far beside the
    checkpoint (the drafter written at the end)."""
    if plan.config.patience and state.evals and _best_eval(state) is state.evals[-1]:
        save_drafter(state.drafter, work_dir / "best")


def _stop_early(state: State, plan: Plan) -> bool:
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
    init, config = warm_start(model, config.resolved(model.args.num_hidden_layers))
    check_inputs(model, data, config)
    t_start = time.perf_counter()
    work_dir, out_dir = Path(work_dir), Path(out_dir)
    vocab = None if init is None else init.draft_vocab_ids
    plan = make_plan(model, data, config, eos_token_ids, vocab)
    state = start_run(model, plan, work_dir / "checkpoint", resume, init)
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


def _fit_log(plan: Plan, state: State, out_dir: Path, this_run: float) -> dict:
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
            "path": Path(out_dir).name,  # the name only: the log is shipped
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
