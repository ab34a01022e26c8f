"""The distillation data set: what the drafter learns from, sharded on disk.

Prompts -> sequences (last prompt token + response) with the base model's post-norm hidden
state before each token, in float16 shards under `work_dir/data`. The response is the base
model's own greedy output (target "self", batched and left-padded) or the prompt file's answer
(one teacher-forced pass), whose tokens are the targets (target "dataset") or are relabelled
with the base model's greedy prediction at each position (target "relabel": the exact target
for the tokens before it, at prefill speed).

A manifest (base model fingerprint, prompt file digest, settings) says what the shards were
made for; finished shards are kept, so an interrupted run resumes at the first missing one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from ..accept import SamplingConfig
from ..errors import TrainError
from ..fingerprint import describe_model, model_fingerprint, same_model
from ..prompts import Prompt, read_prompts
from .config import DEFAULT_GEN_BATCH, DEFAULT_SHARD_SIZE, LABELLED_TARGETS, TARGETS, DataConfig
from .shards import (
    MAX_PROMPT_TOKENS,
    Generation,
    WorkerJob,
    make_shards,
    make_shards_in_workers,
    progress_bar,
    shard_path,
    stop_ids,
)

__all__ = [  # the package's names for what moved to config.py, shards.py and fingerprint.py
    "DEFAULT_GEN_BATCH",
    "DEFAULT_SHARD_SIZE",
    "MAX_PROMPT_TOKENS",
    "TARGETS",
    "describe_model",
    "model_fingerprint",
    "same_model",
    "progress_bar",
    "stop_ids",
]
DATA_SEED = 0  # the prompt selection does not depend on the training seed, so data is reused


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# The data set in memory


@dataclass
class DistillData:
    """Sequences x_0..x_{T-1} (x_0 = last prompt token, then the response) with the base's
    hidden state H_t before each of x_1..x_{T-1}, i.e. at t = 0..T-2. `labels`, if set, holds
    per sequence y_1..y_{T-1} (y_0 = -1): the base's greedy choice after x_0..x_{j-1}, the
    targets in place of the tokens themselves (which are then only the drafter's inputs)."""

    tokens: list[np.ndarray]  # per sequence (T,) int32
    hidden: np.ndarray  # (sum(T - 1), h) float16, sequences concatenated
    hidden_start: np.ndarray  # (n + 1,) int64 row offsets into hidden
    prompt_index: np.ndarray  # (n,) index into the prompt selection
    fingerprint: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    labels: list[np.ndarray] | None = None  # per sequence (T,) int32, or None: the tokens
    shards: list[dict] = field(default_factory=list)  # what each shard on disk holds
    # The base's top-k at each hidden row (the distribution over the token after it): ids
    # (rows, k) int32 and log-probabilities (rows, k) float16; None when not stored.
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None
    # Feature layers' states at each hidden row, (rows, len(feature_layers) * h) float16.
    features: np.ndarray | None = None
    feature_layers: tuple[int, ...] = ()

    def targets(self, i: int) -> np.ndarray:
        return self.tokens[i] if self.labels is None else self.labels[i]

    @property
    def num_sequences(self) -> int:
        return len(self.tokens)

    @property
    def num_response_tokens(self) -> int:
        return int(sum(len(t) - 1 for t in self.tokens))

    def sequence_hidden(self, i: int) -> np.ndarray:
        return self.hidden[self.hidden_start[i] : self.hidden_start[i + 1]]

    @property
    def top_k(self) -> int:
        return 0 if self.top_ids is None else int(self.top_ids.shape[1])

    def context(self, rows: np.ndarray, layers: Sequence[int] = ()) -> np.ndarray:
        """The drafter's input at hidden `rows`: the post-norm state, then the states of
        `layers` (a subset of the stored feature layers, in that order), float16."""
        if not layers:
            return self.hidden[rows]
        missing = [i for i in layers if i not in self.feature_layers]
        if missing:
            raise TrainError(
                f"the data holds feature layers {list(self.feature_layers)}, not {missing}: "
                "make the data with those --feature-layers"
            )
        h = self.hidden.shape[1]
        cols = [self.hidden[rows]]
        for i in layers:
            k = self.feature_layers.index(i)
            cols.append(self.features[rows, k * h : (k + 1) * h])
        return np.concatenate(cols, axis=1)


# ---------------------------------------------------------------------------------------------
# Building the data set, one shard at a time


def select_prompts(prompts: list[Prompt], num_prompts: int | None) -> np.ndarray:
    """File indices of the prompts used: the first `num_prompts` of one seeded permutation, so
    a larger count extends the same data."""
    order = np.random.default_rng(DATA_SEED).permutation(len(prompts))
    return order if not num_prompts else order[:num_prompts]


def build_dataset(
    model,
    tokenizer,
    prompts_file: str | os.PathLike,
    work_dir: str | os.PathLike,
    config: DataConfig | None = None,
    *,
    resume: bool = True,
    progress: bool = True,
    model_source: tuple[str | None, str | None] | None = None,
    **settings,
) -> DistillData:
    """Make (or load) the distillation data in `work_dir/data`, one shard at a time.

    `config` says what data (see DataConfig; None: the defaults, with all prompts, no top-k
    and no feature layers); `settings` are DataConfig fields that override it.
    The prompts are a fixed random selection of the file (the first `num_prompts` of one
    seeded permutation, so a larger count extends the same data). Finished shards are kept;
    an interrupted run resumes at the first missing one. `top_k` > 0 stores the base's k most
    likely tokens and their log-probabilities at every position (for distillation losses);
    `feature_layers` stores those blocks' states beside the last hidden state (for
    multi-layer drafters). `time_budget` (seconds) stops starting new shards once spent: the
    data is then the shards finished so far, and a later run goes on from there.

    `workers` > 1 makes shards in that many processes at once, each with its own copy of the
    base loaded from `model_source` = (model name or path, dtype): batched decoding keeps
    about one core busy on a CPU, so two workers on two cores make data about twice as fast.
    Each shard is made alone either way: the same tokens, and states equal up to float
    rounding (a worker runs one BLAS thread).
    """
    c = _data_config(config, settings, model)
    if c.workers > 1 and model_source is None:
        raise TrainError("data workers load the base model themselves: give it by name or path")
    prompts_file = Path(prompts_file)
    prompts, selection = _choose_prompts(prompts_file, c.num_prompts, c.target)
    data_dir = Path(work_dir) / "data"
    fingerprint = _fingerprint(model, prompts_file, c)
    _open_data_dir(data_dir, fingerprint, work_dir, resume)

    n = len(selection)
    ranges = [(s, min(s + c.shard_size, n)) for s in range(0, n, c.shard_size)]
    todo = [r for r in ranges if not shard_path(data_dir, *r).exists()]
    t_start = time.perf_counter()
    gen_args = (c.new_tokens, c.target)
    sampling = SamplingConfig(c.sample_temp, c.sample_top_p) if c.target == "sample" else None
    if c.workers > 1 and len(todo) > 1:
        job = WorkerJob(
            model_source,
            prompts_file,
            *gen_args,
            c.gen_batch_size,
            c.top_k,
            c.feature_layers,
            min(c.workers, len(todo)),
            sampling,
        )
        made = make_shards_in_workers(
            job, selection, todo, data_dir, Path(work_dir), progress, c.time_budget
        )
    else:
        stop = stop_ids(tokenizer)
        gen = Generation(
            model, tokenizer, prompts, *gen_args, stop, c.gen_batch_size, c.top_k, c.feature_layers
        )
        gen.sampling = sampling
        made = make_shards(gen, selection, todo, data_dir, Path(work_dir), progress, c.time_budget)
    done = [r for r in ranges if shard_path(data_dir, *r).exists()]
    data = _load_shards(data_dir, done, fingerprint)
    data.stats.update(
        prompts_selected=n,
        generated_this_run_tokens=made,
        generated_this_run_seconds=round(time.perf_counter() - t_start, 2) if todo else 0.0,
        generation_batch_size=c.gen_batch_size,
        shards_missing=len(ranges) - len(done),
    )
    return data


def _data_config(config: DataConfig | None, settings: dict, model) -> DataConfig:
    """`config` with `settings` over it, concrete (no "auto", no None top-k) and checked."""
    known = {f.name for f in fields(DataConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"build_dataset() got unexpected settings {unknown}")
    if config is None:
        config = DataConfig(num_prompts=None)
    c = replace(config, **settings).resolved(model.args.num_hidden_layers)
    if c.target not in TARGETS:
        raise TrainError(f"target must be one of {', '.join(TARGETS)}, got {c.target!r}")
    if c.new_tokens < 2:
        raise TrainError(f"new_tokens must be >= 2, got {c.new_tokens}")
    if c.gen_batch_size < 1 or c.shard_size < 1:
        raise TrainError("batch_size and shard_size must be >= 1")
    if c.top_k < 0 or c.top_k > model.args.vocab_size:
        raise TrainError(f"top_k must be in 0..{model.args.vocab_size}, got {c.top_k}")
    try:
        model.check_features(c.feature_layers)
    except ValueError as e:
        raise TrainError(str(e)) from None
    if c.time_budget is not None and c.time_budget <= 0:
        raise TrainError(f"time_budget must be > 0 seconds, got {c.time_budget}")
    if c.workers < 1:
        raise TrainError(f"workers must be >= 1, got {c.workers}")
    if c.target == "sample" and not (c.sample_temp > 0 and 0 < c.sample_top_p <= 1):
        raise TrainError(
            f"sampled answers need a temperature > 0 and top-p in (0, 1], got "
            f"{c.sample_temp} and {c.sample_top_p}"
        )
    return c


def _fingerprint(model, prompts_file: Path, c: DataConfig) -> dict:
    """What the shards are made for: the data directory's manifest."""
    fingerprint = {
        "base_model": model_fingerprint(model),
        "prompts_file": prompts_file.name,
        "prompts_digest": _file_digest(prompts_file),
        "new_tokens": c.new_tokens,
        "target": c.target,
        "data_seed": DATA_SEED,
        "max_prompt_tokens": MAX_PROMPT_TOKENS,
    }
    # Only when used, so that data made before these existed is still recognised.
    if c.top_k:
        fingerprint["top_k"] = c.top_k
    if c.feature_layers:
        fingerprint["feature_layers"] = list(c.feature_layers)
    if c.target == "sample":
        fingerprint["sample_temp"] = c.sample_temp
        fingerprint["sample_top_p"] = c.sample_top_p
    return fingerprint


def _choose_prompts(
    prompts_file: Path, num_prompts: int | None, target: str
) -> tuple[list[Prompt], np.ndarray]:
    """The file's prompts and the selection's file indices; the targets that learn the file's
    answers need one for every prompt chosen."""
    prompts = read_prompts(prompts_file)
    if num_prompts is not None and num_prompts < 1:
        raise TrainError(f"num_prompts must be >= 1, got {num_prompts}")
    selection = select_prompts(prompts, num_prompts)
    if target in ("dataset", "relabel"):
        missing = [int(i) for i in selection if prompts[i].answer is None]
        if missing:
            raise TrainError(
                f"target {target!r} needs an answer for every prompt, but {prompts_file} has none "
                f"for record {missing[0]} (Alpaca's 'output'); use target 'self'"
            )
    return prompts, selection


def _open_data_dir(data_dir: Path, fingerprint: dict, work_dir, resume: bool) -> None:
    """Check the manifest in `data_dir` against `fingerprint`, or write it there."""
    # Shards made with the same settings are reused even with resume=False: they are a cache
    # of a deterministic computation. Data made for something else is an error, unless
    # resume=False says to start over.
    manifest = data_dir / "manifest.json"
    problem = None
    if manifest.exists():
        old = json.loads(manifest.read_text())
        changed = [k for k in fingerprint if k != "base_model" and old.get(k) != fingerprint[k]]
        if not same_model(old["base_model"], fingerprint["base_model"]):
            problem = (
                f"work dir {work_dir} holds data made for another base model "
                f"({describe_model(old['base_model'])}; this one is "
                f"{describe_model(fingerprint['base_model'])})"
            )
        elif changed:
            diffs = ", ".join(f"{k}: {old.get(k)!r} -> {fingerprint[k]!r}" for k in changed)
            problem = f"work dir {work_dir} holds data made with other settings ({diffs})"
    elif data_dir.exists():
        problem = f"work dir {work_dir} has data without a manifest"
    if problem and resume:
        raise TrainError(f"{problem}: use another work dir, or --no-resume to start over")
    if problem:
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    if not manifest.exists():
        manifest.write_text(json.dumps(fingerprint, indent=1))


# ---------------------------------------------------------------------------------------------
# Shards on disk


def _load_shards(data_dir: Path, ranges, fingerprint) -> DistillData:
    tokens, hiddens, index, labels = [], [], [], []
    extra = {"top_ids": [], "top_logprobs": [], "features": []}
    skipped, seconds, shards = 0, 0.0, []
    for start, end in ranges:
        with np.load(shard_path(data_dir, start, end)) as z:
            flat, off = z["tokens"], z["token_offsets"]
            shards.append(
                {
                    "file": shard_path(data_dir, start, end).name,
                    "prompts": [start, end],
                    "sequences": len(off) - 1,
                    "response_tokens": int(len(flat) - (len(off) - 1)),
                    "seconds": round(float(z["gen_seconds"]), 2),
                }
            )
            tokens += [flat[off[i] : off[i + 1]] for i in range(len(off) - 1)]
            if "labels" in z:
                labels += [z["labels"][off[i] : off[i + 1]] for i in range(len(off) - 1)]
            for name in extra:
                if name in z:
                    extra[name].append(z[name])
            hiddens.append(z["hidden"])
            index.append(z["prompt_index"])
            skipped += int(z["skipped"])
            # Wall-clock share: shards made by N processes at once overlap N-fold.
            seconds += float(z["gen_seconds"]) / int(
                z["gen_processes"] if "gen_processes" in z else 1
            )
    starts = np.cumsum([0] + [len(t) - 1 for t in tokens]).astype(np.int64)
    hidden = np.concatenate(hiddens) if hiddens else np.zeros((0, 0), np.float16)
    data = DistillData(
        tokens=tokens,
        hidden=hidden,
        hidden_start=starts,
        prompt_index=np.concatenate(index) if index else np.zeros((0,), np.int64),
        fingerprint=fingerprint,
        labels=labels if fingerprint.get("target") in LABELLED_TARGETS else None,
        feature_layers=tuple(fingerprint.get("feature_layers", ())),
    )
    if fingerprint.get("top_k") and hiddens:
        data.top_ids = np.concatenate(extra["top_ids"])
        data.top_logprobs = np.concatenate(extra["top_logprobs"])
    if data.feature_layers and hiddens:
        data.features = np.concatenate(extra["features"])
    data.stats = {
        "sequences": data.num_sequences,
        "response_tokens": data.num_response_tokens,
        "skipped_prompts": skipped,
        "generation_seconds": round(seconds, 2),
        "generation_tokens_per_s": round(data.num_response_tokens / seconds, 2)
        if seconds
        else None,
    }
    data.shards = shards
    return data
