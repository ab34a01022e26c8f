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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty

import mlx.core as mx
import numpy as np

from ..batch import generate_greedy_batch, teacher_forced_hidden
from ..errors import TrainError, TrainInterrupted
from ..loading import load
from ..prompts import Prompt, encode_chat, encode_plain, eos_ids, main_eos, read_prompts

DATA_SEED = 0  # the prompt selection does not depend on the training seed, so data is reused
MAX_PROMPT_TOKENS = 1024  # longer prompts are skipped (and counted in the log)
TARGETS = ("self", "dataset", "relabel")
DEFAULT_GEN_BATCH = 32
DEFAULT_SHARD_SIZE = 128


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


# ---------------------------------------------------------------------------------------------
# Which base model the data (and a drafter) belongs to


def model_fingerprint(model) -> dict:
    """What identifies a base model for the data and the drafter: shape plus an embedding sample."""
    args = model.args
    n = min(256, args.vocab_size)
    sample = np.array(model.embed(mx.arange(n)).astype(mx.float32), dtype=np.float64)
    sums = sample.reshape(8, -1).sum(axis=1) if n % 8 == 0 else sample.sum(axis=1)[:8]
    return {
        "model_type": args.model_type,
        "hidden_size": args.hidden_size,
        "num_hidden_layers": args.num_hidden_layers,
        "vocab_size": args.vocab_size,
        "embedding_checksum": [round(float(x), 4) for x in sums],
    }


def same_model(a: dict, b: dict) -> bool:
    """Whether two fingerprints are of the same base model (the checksums up to rounding)."""
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
    if any(a.get(k) != b.get(k) for k in keys):
        return False
    x, y = np.array(a["embedding_checksum"]), np.array(b["embedding_checksum"])
    return x.shape == y.shape and bool(np.allclose(x, y, rtol=1e-2, atol=1e-2))


def describe_model(fp: dict) -> str:
    return (
        f"{fp['model_type']}, hidden {fp['hidden_size']}, {fp['num_hidden_layers']} layers, "
        f"vocab {fp['vocab_size']}"
    )


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
    *,
    num_prompts: int | None = None,
    new_tokens: int = 128,
    target: str = "self",
    batch_size: int = DEFAULT_GEN_BATCH,
    shard_size: int = DEFAULT_SHARD_SIZE,
    resume: bool = True,
    progress: bool = True,
    top_k: int = 0,
    feature_layers: Sequence[int] = (),
    time_budget: float | None = None,
    workers: int = 1,
    model_source: tuple[str | None, str | None] | None = None,
) -> DistillData:
    """Make (or load) the distillation data in `work_dir/data`, one shard at a time.

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
    if target not in TARGETS:
        raise TrainError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    if new_tokens < 2:
        raise TrainError(f"new_tokens must be >= 2, got {new_tokens}")
    if batch_size < 1 or shard_size < 1:
        raise TrainError("batch_size and shard_size must be >= 1")
    if top_k < 0 or top_k > model.args.vocab_size:
        raise TrainError(f"top_k must be in 0..{model.args.vocab_size}, got {top_k}")
    feature_layers = tuple(int(i) for i in feature_layers)
    try:
        model.check_features(feature_layers)
    except ValueError as e:
        raise TrainError(str(e)) from None
    if time_budget is not None and time_budget <= 0:
        raise TrainError(f"time_budget must be > 0 seconds, got {time_budget}")
    if workers < 1:
        raise TrainError(f"workers must be >= 1, got {workers}")
    if workers > 1 and model_source is None:
        raise TrainError("data workers load the base model themselves: give it by name or path")
    prompts_file = Path(prompts_file)
    prompts, selection = _choose_prompts(prompts_file, num_prompts, target)

    data_dir = Path(work_dir) / "data"
    fingerprint = {
        "base_model": model_fingerprint(model),
        "prompts_file": prompts_file.name,
        "prompts_digest": _file_digest(prompts_file),
        "new_tokens": new_tokens,
        "target": target,
        "data_seed": DATA_SEED,
        "max_prompt_tokens": MAX_PROMPT_TOKENS,
    }
    # Only when used, so that data made before these existed is still recognised.
    if top_k:
        fingerprint["top_k"] = top_k
    if feature_layers:
        fingerprint["feature_layers"] = list(feature_layers)
    _open_data_dir(data_dir, fingerprint, work_dir, resume)

    gen = _Generation(
        model,
        tokenizer,
        prompts,
        new_tokens,
        target,
        stop_ids(tokenizer),
        batch_size,
        top_k,
        feature_layers,
    )
    n = len(selection)
    ranges = [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]
    todo = [r for r in ranges if not _shard_path(data_dir, *r).exists()]
    t_start = time.perf_counter()
    if workers > 1 and len(todo) > 1:
        job = _WorkerJob(
            model_source,
            prompts_file,
            new_tokens,
            target,
            batch_size,
            top_k,
            feature_layers,
            min(workers, len(todo)),
        )
        made = _make_shards_in_workers(
            job, selection, todo, data_dir, Path(work_dir), progress, time_budget
        )
    else:
        made = _make_shards(gen, selection, todo, data_dir, Path(work_dir), progress, time_budget)
    done = [r for r in ranges if _shard_path(data_dir, *r).exists()]
    data = _load_shards(data_dir, done, fingerprint)
    data.stats.update(
        prompts_selected=n,
        generated_this_run_tokens=made,
        generated_this_run_seconds=round(time.perf_counter() - t_start, 2) if todo else 0.0,
        generation_batch_size=batch_size,
        shards_missing=len(ranges) - len(done),
    )
    return data


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


@dataclass
class _Generation:
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


def _interrupted(data_dir: Path, work_dir: Path) -> TrainInterrupted:
    return TrainInterrupted(
        f"data generation interrupted; finished shards are kept in {data_dir}, run again to resume",
        work_dir=work_dir,
    )


def _make_shards(
    gen: _Generation, selection, todo, data_dir: Path, work_dir: Path, progress, budget=None
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
            _write_npz(_shard_path(data_dir, start, end), **shard)
    except KeyboardInterrupt:
        raise _interrupted(data_dir, work_dir) from None
    finally:
        if bar is not None:
            bar.close()
    return made[0]


def _make_shard(
    gen: _Generation, chosen, start: int, on_finish: Callable[[int], None]
) -> dict[str, np.ndarray]:
    """Sequences and hidden states for the prompts `chosen` (file indices), which are the
    selection's entries from `start` on."""
    chosen = [int(i) for i in chosen]
    encoded = [encode_chat(gen.tokenizer, gen.prompts[i].text) for i in chosen]
    keep = [k for k, ids in enumerate(encoded) if 0 < len(ids) <= MAX_PROMPT_TOKENS]
    skipped = len(chosen) - len(keep)
    keep.sort(key=lambda k: len(encoded[k]))  # similar lengths together: less padding
    t0 = time.perf_counter()
    if gen.target == "self":
        out = generate_greedy_batch(
            gen.model,
            [encoded[k] for k in keep],
            gen.new_tokens,
            gen.stop,
            gen.batch_size,
            on_finish,
            gen.feature_layers,
            gen.top_k,
        )
        out = [(r[0], r[1], None, *r[2:]) for r in out]  # no labels
    else:
        out = _forced_responses(gen, chosen, encoded, keep, on_finish)
    t_gen = time.perf_counter() - t0
    results = dict(zip(keep, out, strict=True))
    order = sorted(results)  # back to selection order
    seqs = [np.array([encoded[k][-1]] + results[k][0], np.int32) for k in order]
    h = gen.model.args.hidden_size
    width = h * (1 + len(gen.feature_layers))
    hid = _stack([results[k][1] for k in order], (0, width), np.float32)
    extra = {}
    if gen.target == "relabel":
        labels = [np.array([-1] + list(results[k][2]), np.int32) for k in order]
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


def _stack(parts: list[np.ndarray], empty_shape: tuple, dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(empty_shape, dtype)


def _to_float16(x: np.ndarray) -> np.ndarray:
    return np.clip(x, -65000, 65000).astype(np.float16)


def _forced_responses(gen: _Generation, chosen, encoded, keep, on_finish) -> list[tuple]:
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
        relabel = gen.target == "relabel"
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
class _WorkerJob:
    """What a worker process needs to make shards on its own (picklable)."""

    model_source: tuple[str | None, str | None]
    prompts_file: Path
    new_tokens: int
    target: str
    batch_size: int
    top_k: int
    feature_layers: tuple[int, ...]
    processes: int


def _worker(job: _WorkerJob, selection, ranges, data_dir: Path, deadline, queue) -> None:
    """A worker process: load the base, make `ranges`' shards (none started after the
    wall-clock `deadline`), report each finished response's length on `queue`."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops workers on Ctrl-C
    try:
        model, tokenizer = load(job.model_source[0], dtype=job.model_source[1])
        prompts = read_prompts(job.prompts_file)
        gen = _Generation(
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
        )
        for start, end in ranges:
            if deadline is not None and time.time() >= deadline:
                break
            shard = _make_shard(gen, selection[start:end], start, lambda n: queue.put(n))
            _write_npz(_shard_path(data_dir, start, end), **shard)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        queue.put(f"{type(e).__name__}: {e}")
    finally:
        queue.put(None)


def _make_shards_in_workers(
    job: _WorkerJob, selection, todo, data_dir, work_dir, progress, budget
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


# ---------------------------------------------------------------------------------------------
# Shards on disk


def _write_npz(path: Path, **arrays) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _shard_path(data_dir: Path, start: int, end: int) -> Path:
    return data_dir / f"shard-{start:07d}-{end:07d}.npz"


def _load_shards(data_dir: Path, ranges, fingerprint) -> DistillData:
    tokens, hiddens, index, labels = [], [], [], []
    extra = {"top_ids": [], "top_logprobs": [], "features": []}
    skipped, seconds = 0, 0.0
    for start, end in ranges:
        with np.load(_shard_path(data_dir, start, end)) as z:
            flat, off = z["tokens"], z["token_offsets"]
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
        labels=labels if fingerprint.get("target") == "relabel" else None,
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
    return data
