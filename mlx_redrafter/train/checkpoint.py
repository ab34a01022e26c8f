"""A training run's changing state (drafter, optimizer, data order, curves: `State`) and its
checkpoints: saved atomically, found again after a crash mid-save, and resumed only by the
run that made them (`start_run`)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..drafter import Drafter, init_drafter, load_drafter, save_drafter
from ..errors import RedrafterError, TrainError
from .data import describe_model, same_model
from .plan import Plan, lr_schedule

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
# The run's state: what changes step by step, and what a checkpoint holds


@dataclass
class State:
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


def warm_start(model, config):
    """(the drafter `config.init_from` names, loaded in float32 for `model`, and the config
    with that drafter's architecture), or (None, config) without one."""
    if not config.init_from:
        return None, config
    path = Path(config.init_from)
    try:
        drafter = load_drafter(path, base=model, dtype=mx.float32)
    except RedrafterError as e:
        raise TrainError(f"--init-from: {e}") from None
    if drafter.args.quantization:
        raise TrainError(f"--init-from: {path} is quantized; start from a float drafter")
    a = drafter.args
    config = replace(
        config,
        exit_dim=a.exit_dim,
        num_layers=a.num_draft_layers,
        feature_layers=tuple(a.feature_layers or ()),
        rnn_context=a.rnn_context,
        rnn_gate=a.rnn_gate,
    )
    return drafter, config


def start_run(
    model, plan: Plan, ckpt_dir: Path, resume: bool, init: Drafter | None = None
) -> State:
    """A fresh drafter (or the warm start `init`) and optimizer, or the checkpoint's when
    resuming."""
    c = plan.config
    drafter = init
    if drafter is None:
        drafter = init_drafter(
            model,
            seed=c.seed,
            exit_dim=c.exit_dim,
            num_draft_layers=c.num_layers,
            draft_vocab_ids=None if plan.vocab is None else plan.vocab.tolist(),
            feature_layers=c.feature_layers,
            rnn_context=c.rnn_context,
            rnn_gate=c.rnn_gate,
        )
    optimizer = optim.AdamW(
        learning_rate=lr_schedule(c.learning_rate, plan.warmup, plan.total),
        weight_decay=c.weight_decay,
    )
    state = State(drafter, optimizer, np.random.default_rng(c.seed))
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
