"""Making the distillation data's shards: the base model's responses (generated in
continuous batches, or the prompt file's answers run teacher-forced) with its hidden states,
top-k and feature-layer states, written one shard at a time, in this process or in several
worker processes. `data.py` decides which shards to make and reads them back."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from queue import Empty

import numpy as np

from ..accept import SamplingConfig
from ..batch import generate_batch, teacher_forced_hidden
from ..errors import TrainError, TrainInterrupted
from ..loading import load
from ..prompts import (
    Prompt,
    encode_chat,
    encode_messages,
    encode_plain,
    eos_ids,
    has_template,
    main_eos,
    read_prompts,
)
from .config import LABELLED_TARGETS

MAX_PROMPT_TOKENS = 2048  # longer prompts are skipped (and counted in the log)


def stop_ids(tokenizer) -> list[int]:
    """The tokenizer's end-of-sequence ids, sorted; a tokenizer without one is an error."""
    ids = eos_ids(tokenizer)
    if not ids:
        raise TrainError("the tokenizer has no end-of-sequence token")
    return sorted(ids)


def progress_bar(progress: bool, **kwargs):
    """A tqdm bar, or None when `progress` is off (the library never prints)."""
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(dynamic_ncols=True, **kwargs)


def write_npz(path: Path, **arrays) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def shard_path(data_dir: Path, start: int, end: int) -> Path:
    return data_dir / f"shard-{start:07d}-{end:07d}.npz"


# ---------------------------------------------------------------------------------------------
# One process


@dataclass
class Generation:
    """What every shard of one data set is made with."""

    model: object
    tokenizer: object
    prompts: list[Prompt]
    new_tokens: int
    target: str
    stop: list[int]
    batch_size: int
    top_k: int = 0
    feature_layers: tuple[int, ...] = ()
    processes: int = 1  # processes making shards at once (their times overlap)
    sampling: SamplingConfig | None = None  # target "sample": how answers are drawn


def _interrupted(data_dir: Path, work_dir: Path) -> TrainInterrupted:
    return TrainInterrupted(
        f"data generation interrupted; finished shards are kept in {data_dir}, run again to resume",
        work_dir=work_dir,
    )


def make_shards(
    gen: Generation, selection, todo, data_dir: Path, work_dir: Path, progress, budget=None
):
    """Make and write the shards `todo` (selection ranges), none started after `budget`
    seconds; -> the tokens made."""
    bar = progress_bar(
        progress, total=sum(e - s for s, e in todo), desc="generating", unit="prompt"
    )
    t_start, made = time.perf_counter(), [0]

    def finished(num_tokens: int) -> None:
        made[0] += num_tokens
        if bar is not None:
            rate = made[0] / max(time.perf_counter() - t_start, 1e-9)
            bar.set_postfix_str(f"{made[0]} tokens, {rate:.1f} tok/s", refresh=False)
            bar.update(1)

    try:
        for start, end in todo:
            if budget is not None and time.perf_counter() - t_start >= budget:
                break
            shard = _make_shard(gen, selection[start:end], start, finished)
            write_npz(shard_path(data_dir, start, end), **shard)
    except KeyboardInterrupt:
        raise _interrupted(data_dir, work_dir) from None
    finally:
        if bar is not None:
            bar.close()
    return made[0]


def _make_shard(
    gen: Generation, chosen, start: int, on_finish: Callable[[int], None]
) -> dict[str, np.ndarray]:
    """Sequences and hidden states for the prompts `chosen` (file indices), which are the
    selection's entries from `start` on."""
    chosen = [int(i) for i in chosen]
    encoded = [_encode(gen.tokenizer, gen.prompts[i]) for i in chosen]
    keep = [k for k, ids in enumerate(encoded) if 0 < len(ids) <= MAX_PROMPT_TOKENS]
    skipped = len(chosen) - len(keep)
    keep.sort(key=lambda k: len(encoded[k]))  # similar lengths together: less padding
    t0 = time.perf_counter()
    out = _responses(gen, chosen, encoded, keep, on_finish, seed=start)
    t_gen = time.perf_counter() - t0
    results = dict(zip(keep, out, strict=True))
    order = sorted(results)  # back to selection order
    seqs = [np.array([encoded[k][-1]] + results[k][0], np.int32) for k in order]
    h = gen.model.args.hidden_size
    width = h * (1 + len(gen.feature_layers))
    hid = _stack([results[k][1] for k in order], (0, width), np.float32)
    extra = {}
    if gen.target in LABELLED_TARGETS:
        labels = [np.array([-1] + list(_labels(results[k])), np.int32) for k in order]
        extra["labels"] = _stack(labels, (0,), np.int32)
    if gen.top_k:
        extra["top_ids"] = _stack([results[k][3] for k in order], (0, gen.top_k), np.int32)
        lp = _stack([results[k][4] for k in order], (0, gen.top_k), np.float32)
        extra["top_logprobs"] = np.maximum(lp, -60000).astype(np.float16)
    if gen.feature_layers:
        extra["features"] = _to_float16(hid[:, h:])
    tok_off = np.cumsum([0] + [len(s) for s in seqs]).astype(np.int64)
    return {
        **extra,
        "tokens": _stack(seqs, (0,), np.int32),
        "token_offsets": tok_off,
        "hidden": _to_float16(hid[:, :h]),
        "prompt_index": np.array([start + k for k in order], np.int64),
        "skipped": np.array(skipped),
        "gen_seconds": np.array(t_gen),
        "gen_processes": np.array(gen.processes),
    }


def _responses(gen: Generation, chosen, encoded, keep, on_finish, seed=0) -> list[tuple]:
    """(response, hidden, labels or None, [top ids, top log-probs]) for the prompts `keep`,
    in its order: generated (target "self"; "sample" draws them, from `seed`, with the greedy
    choices as labels), the file's answers (dataset, relabel), or, for "auto", the file's
    answer relabelled where there is one and generated where not."""
    if gen.target in ("dataset", "relabel"):
        return _forced_responses(gen, chosen, encoded, keep, on_finish)
    answered = (
        []
        if gen.target in ("self", "sample")
        else [k for k in keep if gen.prompts[chosen[k]].answer is not None]
    )
    free = [k for k in keep if k not in set(answered)]
    out = generate_batch(
        gen.model,
        [encoded[k] for k in free],
        gen.new_tokens,
        gen.stop,
        gen.batch_size,
        on_finish,
        gen.feature_layers,
        gen.top_k,
        gen.sampling,
        seed,
    )
    if gen.sampling is None:
        out = [(r[0], r[1], None, *r[2:]) for r in out]
    results = dict(zip(free, out, strict=True))
    if answered:
        forced = _forced_responses(gen, chosen, encoded, answered, on_finish)
        results.update(zip(answered, forced, strict=True))
    return [results[k] for k in keep]


def _labels(result: tuple) -> list[int]:
    """A response's greedy labels: its relabelled ones, or its own tokens if generated."""
    return list(result[0]) if result[2] is None else list(result[2])


def _encode(tokenizer, prompt: Prompt) -> list[int]:
    """A prompt's ids in the chat template, after the file's earlier messages if any."""
    if prompt.history and has_template(tokenizer):
        return encode_messages(tokenizer, prompt.messages())
    return encode_chat(tokenizer, prompt.text)


def _stack(parts: list[np.ndarray], empty_shape: tuple, dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(empty_shape, dtype)


def _to_float16(x: np.ndarray) -> np.ndarray:
    return np.clip(x, -65000, 65000).astype(np.float16)


def _forced_responses(gen: Generation, chosen, encoded, keep, on_finish) -> list[tuple]:
    """The file's answers (cut to new_tokens, ending in EOS) run teacher-forced, in `keep`'s
    order: (answer, hidden, greedy labels or None, top ids, top log-probs) per prompt (the
    last two only with top_k)."""
    eos = main_eos(gen.tokenizer)
    out = []
    for b in range(0, len(keep), gen.batch_size):
        batch = keep[b : b + gen.batch_size]
        answers = [
            encode_plain(gen.tokenizer, gen.prompts[chosen[k]].answer)[: gen.new_tokens - 1] + [eos]
            for k in batch
        ]
        relabel = gen.target != "dataset"
        forced = teacher_forced_hidden(
            gen.model,
            [encoded[k] for k in batch],
            answers,
            with_labels=relabel,
            features=gen.feature_layers,
            top_k=gen.top_k,
        )
        for a, f in zip(answers, forced, strict=True):
            f = f if isinstance(f, tuple) else (f,)
            out.append((a, f[0], f[1] if relabel else None, *f[1 + relabel :]))
        for a in answers:
            on_finish(len(a))
    return out


# ---------------------------------------------------------------------------------------------
# Several worker processes


@dataclass(frozen=True)
class WorkerJob:
    """What a worker process needs to make shards on its own (picklable)."""

    model_source: tuple[str | None, str | None]
    prompts_file: Path
    new_tokens: int
    target: str
    batch_size: int
    top_k: int
    feature_layers: tuple[int, ...]
    processes: int
    sampling: SamplingConfig | None = None


def _worker(job: WorkerJob, selection, ranges, data_dir: Path, deadline, queue) -> None:
    """A worker process: load the base, make `ranges`' shards (none started after the
    wall-clock `deadline`), report each finished response's length on `queue`."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops workers on Ctrl-C
    try:
        model, tokenizer = load(job.model_source[0], dtype=job.model_source[1])
        prompts = read_prompts(job.prompts_file)
        gen = Generation(
            model,
            tokenizer,
            prompts,
            job.new_tokens,
            job.target,
            stop_ids(tokenizer),
            job.batch_size,
            job.top_k,
            job.feature_layers,
            job.processes,
            job.sampling,
        )
        for start, end in ranges:
            if deadline is not None and time.time() >= deadline:
                break
            shard = _make_shard(gen, selection[start:end], start, lambda n: queue.put(n))
            write_npz(shard_path(data_dir, start, end), **shard)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        queue.put(f"{type(e).__name__}: {e}")
    finally:
        queue.put(None)


def make_shards_in_workers(
    job: WorkerJob, selection, todo, data_dir, work_dir, progress, budget
) -> int:
    """_make_shards over `job.processes` processes (shard i to worker i mod processes)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    deadline = None if budget is None else time.time() + budget
    bar = progress_bar(
        progress, total=sum(e - s for s, e in todo), desc="generating", unit="prompt"
    )
    saved = os.environ.get("OPENBLAS_NUM_THREADS")
    os.environ["OPENBLAS_NUM_THREADS"] = "1"  # one core each; spawned children copy it now
    procs = []
    try:
        for w in range(job.processes):
            p = ctx.Process(
                target=_worker,
                args=(job, selection, todo[w :: job.processes], data_dir, deadline, queue),
                daemon=True,
            )
            p.start()
            procs.append(p)
    finally:
        if saved is None:
            del os.environ["OPENBLAS_NUM_THREADS"]
        else:
            os.environ["OPENBLAS_NUM_THREADS"] = saved
    t_start, made, running, error = time.perf_counter(), 0, len(procs), None
    try:
        while running:
            try:
                msg = queue.get(timeout=1.0)
            except Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and not error:  # died before it could report (e.g. at start-up)
                    error = f"worker exited with code {dead[0].exitcode}"
                if all(p.exitcode is not None for p in procs) and queue.empty():
                    break
                continue
            if msg is None:
                running -= 1
            elif isinstance(msg, str):
                error = error or msg
            else:
                made += msg
                if bar is not None:
                    rate = made / max(time.perf_counter() - t_start, 1e-9)
                    bar.set_postfix_str(f"{made} tokens, {rate:.1f} tok/s", refresh=False)
                    bar.update(1)
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join()
        raise _interrupted(data_dir, work_dir) from None
    finally:
        if bar is not None:
            bar.close()
    if error:
        raise TrainError(f"a data worker failed: {error}")
    return made
