"""The whole training job, `train_drafter`: load the base, build the data set (data.py), fit
the drafter (loop.py), write the drafter and `training_log.json`. What the job is asked to do
comes as two config objects, DataConfig and FitConfig (config.py)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from ..env import machine
from ..errors import TrainError
from ..loading import load
from .config import DataConfig, FitConfig
from .data import build_dataset, model_fingerprint, stop_ids
from .loop import fit
from .mix import data_mix


def train_drafter(
    model=None,
    prompts_file: str | os.PathLike = "",
    out_dir: str | os.PathLike = "",
    *,
    tokenizer=None,
    data_config: DataConfig = DataConfig(),
    fit_config: FitConfig = FitConfig(),
    work_dir: str | os.PathLike | None = None,
    resume: bool = True,
    progress: bool = True,
    dtype: str | None = None,
    callback: Callable[[int, dict], None] | None = None,
) -> dict:
    """Distil a drafter for `model` from `prompts_file` into `out_dir`; return the log.

    model: a model directory, .gguf or Hugging Face id, None for the default model, or a
    loaded model object (then pass `tokenizer`); `dtype` casts a model loaded here. Writes
    the drafter (config.json + model.safetensors, loadable with `load_drafter`) and
    `training_log.json` to `out_dir`; data shards and checkpoints go to `work_dir` (default:
    `<out_dir>-work` beside it). Interrupted runs (Ctrl-C raises TrainInterrupted) resume from
    there when called again. `data_config` says what data to make (DataConfig), `fit_config`
    how to train (FitConfig); `callback(step, metrics)` runs after every step.
    """
    t0 = time.perf_counter()
    out_dir, work_dir = _output_dirs(out_dir, work_dir)
    model_arg = model
    model, tokenizer, model_name = _base_model(model, tokenizer, dtype)
    t_load = time.perf_counter() - t0
    n_blocks = model.args.num_hidden_layers
    config = fit_config.resolved(n_blocks)
    config.check()
    data_config = data_config.resolved(n_blocks, config)
    missing = [i for i in config.feature_layers if i not in data_config.feature_layers]
    if missing:
        raise TrainError(
            f"the data's feature layers {list(data_config.feature_layers)} lack {missing}"
        )
    by_name = isinstance(model_arg, (str, os.PathLike)) or model_arg is None
    source = (None if model_arg is None else str(model_arg), dtype) if by_name else None

    t1 = time.perf_counter()
    data = build_dataset(
        model,
        tokenizer,
        prompts_file,
        work_dir,
        data_config,
        resume=resume,
        progress=progress,
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
    job = _job_settings(prompts_file, data_config, config, work_dir)
    times = {"load": round(t_load, 2), "data_this_run": round(t_data, 2)}
    log = _job_log(model, model_name, data, result, job, times, t0)
    log["data"]["mix"] = data_mix(prompts_file, data_config.num_prompts, data)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    manifest = data_manifest(data, log["data"]["mix"])
    (out_dir / "data_manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return log


def data_manifest(data, mix: dict) -> dict:
    """What the drafter was trained on, shard by shard, without the data: enough to check a
    work dir's shards against it, and to grow the same data set in later runs."""
    return {
        "made_with": {k: v for k, v in data.fingerprint.items() if k != "base_model"},
        "base_model": data.fingerprint.get("base_model"),
        "response_tokens": data.num_response_tokens,
        "sequences": data.num_sequences,
        "mix": mix,
        "shards": data.shards,
        "grow": "run the same `mlx-redrafter train` command again with a --time-budget: the "
        "shards listed here are kept (same prompt file and settings), the next ones are made, "
        "and the drafter is trained again on all of them",
    }


def _job_settings(prompts_file, d: DataConfig, config: FitConfig, work_dir: Path) -> dict:
    """The job's own settings in the log (fit's come with its result)."""
    settings = {
        "prompts_file": Path(prompts_file).name,  # names only: the log is shipped
        "num_prompts": d.num_prompts,
        "new_tokens": d.new_tokens,
        "target": d.target,
        "gen_batch_size": d.gen_batch_size,
        "top_k": d.top_k,
        "data_feature_layers": list(d.feature_layers),
        "workers": d.workers,
        "save_dtype": config.save_dtype,
        "work_dir": work_dir.name,
    }
    if d.target == "sample":
        settings.update(sample_temp=d.sample_temp, sample_top_p=d.sample_top_p)
    return settings


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
