"""Drafter training by self-distillation.

Two phases, both resumable from a work directory:
  build_dataset: prompts -> sequences (last prompt token + response) with the base model's
      post-norm hidden state before each token, in float16 shards on disk. The response is the
      base model's own greedy output (target "self", batched and left-padded) or the prompt
      file's answer (one teacher-forced pass), whose tokens are the targets (target "dataset")
      or are relabelled with the base model's greedy prediction at each position (target
      "relabel": the exact target for the tokens before it, at prefill speed).
  fit: the drafter trained on them with the base frozen; checkpoints every N steps, and a
      resumed run is bit-identical to an uninterrupted one.
The library never prints; progress goes through tqdm bars that `progress=False` turns off.
"""

from __future__ import annotations

import hashlib
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

from .batch import generate_greedy_batch, teacher_forced_hidden
from .env import machine
from .errors import TrainError, TrainInterrupted
from .prompts import Prompt, encode_chat, encode_plain, eos_ids, main_eos, read_prompts

DATA_SEED = 0  # the prompt selection does not depend on the training seed, so data is reused
MAX_PROMPT_TOKENS = 1024  # longer prompts are skipped (and counted in the log)
TARGETS = ("self", "dataset", "relabel")
DEFAULT_GEN_BATCH = 32
DEFAULT_SHARD_SIZE = 128
DEFAULT_CHECKPOINT_EVERY = 200


def _stop_ids(tokenizer) -> list[int]:
    ids = eos_ids(tokenizer)
    if not ids:
        raise TrainError("the tokenizer has no end-of-sequence token")
    return sorted(ids)


# ---------------------------------------------------------------------------------------------
# The distillation data set, sharded on disk


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


def _same_model(a: dict, b: dict) -> bool:
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
    if any(a.get(k) != b.get(k) for k in keys):
        return False
    x, y = np.array(a["embedding_checksum"]), np.array(b["embedding_checksum"])
    return x.shape == y.shape and bool(np.allclose(x, y, rtol=1e-2, atol=1e-2))


def _describe_model(fp: dict) -> str:
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


def _write_npz(path: Path, **arrays) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _shard_path(data_dir: Path, start: int, end: int) -> Path:
    return data_dir / f"shard-{start:07d}-{end:07d}.npz"


def _select_prompts(prompts: list[Prompt], num_prompts: int | None) -> np.ndarray:
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
) -> DistillData:
    """Make (or load) the distillation data in `work_dir/data`, one shard at a time.

    The prompts are a fixed random selection of the file (the first `num_prompts` of one
    seeded permutation, so a larger count extends the same data). Finished shards are kept;
    an interrupted run resumes at the first missing one.
    """
    if target not in TARGETS:
        raise TrainError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    if new_tokens < 2:
        raise TrainError(f"new_tokens must be >= 2, got {new_tokens}")
    if batch_size < 1 or shard_size < 1:
        raise TrainError("batch_size and shard_size must be >= 1")
    prompts_file = Path(prompts_file)
    prompts = read_prompts(prompts_file)
    if num_prompts is not None and num_prompts < 1:
        raise TrainError(f"num_prompts must be >= 1, got {num_prompts}")
    selection = _select_prompts(prompts, num_prompts)
    if target in ("dataset", "relabel"):
        missing = [int(i) for i in selection if prompts[i].answer is None]
        if missing:
            raise TrainError(
                f"target {target!r} needs an answer for every prompt, but {prompts_file} has none "
                f"for record {missing[0]} (Alpaca's 'output'); use target 'self'"
            )

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
    # Shards made with the same settings are reused even with resume=False: they are a cache
    # of a deterministic computation. Data made for something else is an error, unless
    # resume=False says to start over.
    manifest = data_dir / "manifest.json"
    problem = None
    if manifest.exists():
        old = json.loads(manifest.read_text())
        changed = [k for k in fingerprint if k != "base_model" and old.get(k) != fingerprint[k]]
        if not _same_model(old["base_model"], fingerprint["base_model"]):
            problem = (
                f"work dir {work_dir} holds data made for another base model "
                f"({_describe_model(old['base_model'])}; this one is "
                f"{_describe_model(fingerprint['base_model'])})"
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

    stop = _stop_ids(tokenizer)
    n = len(selection)
    ranges = [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]
    todo = [r for r in ranges if not _shard_path(data_dir, *r).exists()]
    bar = _bar(progress, total=sum(e - s for s, e in todo), desc="generating", unit="prompt")
    t_start, made = time.perf_counter(), [0]

    def finished(num_tokens: int) -> None:
        made[0] += num_tokens
        if bar is not None:
            rate = made[0] / max(time.perf_counter() - t_start, 1e-9)
            bar.set_postfix_str(f"{made[0]} tokens, {rate:.1f} tok/s", refresh=False)
            bar.update(1)

    try:
        for start, end in todo:
            shard = _make_shard(
                model,
                tokenizer,
                prompts,
                selection[start:end],
                start,
                new_tokens,
                target,
                stop,
                batch_size,
                finished,
            )
            _write_npz(_shard_path(data_dir, start, end), **shard)
    except KeyboardInterrupt:
        raise TrainInterrupted(
            f"data generation interrupted; finished shards are kept in {data_dir}, run again "
            "to resume",
            work_dir=Path(work_dir),
        ) from None
    finally:
        if bar is not None:
            bar.close()
    data = _load_shards(data_dir, ranges, fingerprint)
    data.stats.update(
        prompts_selected=n,
        generated_this_run_tokens=made[0],
        generated_this_run_seconds=round(time.perf_counter() - t_start, 2) if todo else 0.0,
        generation_batch_size=batch_size,
    )
    return data


def _make_shard(
    model, tokenizer, prompts, chosen, start, new_tokens, target, stop, batch_size, on_finish
) -> dict[str, np.ndarray]:
    """Sequences and hidden states for the prompts `chosen` (file indices), which are the
    selection's entries from `start` on."""
    chosen = [int(i) for i in chosen]
    encoded = [encode_chat(tokenizer, prompts[i].text) for i in chosen]
    keep = [k for k, ids in enumerate(encoded) if 0 < len(ids) <= MAX_PROMPT_TOKENS]
    skipped = len(chosen) - len(keep)
    keep.sort(key=lambda k: len(encoded[k]))  # similar lengths together: less padding
    t0 = time.perf_counter()
    if target == "self":
        out = generate_greedy_batch(
            model, [encoded[k] for k in keep], new_tokens, stop, batch_size, on_finish
        )
    else:
        eos = main_eos(tokenizer)
        out = []
        for b in range(0, len(keep), batch_size):
            batch = keep[b : b + batch_size]
            answers = [
                encode_plain(tokenizer, prompts[chosen[k]].answer)[: new_tokens - 1] + [eos]
                for k in batch
            ]
            forced = teacher_forced_hidden(
                model, [encoded[k] for k in batch], answers, with_labels=target == "relabel"
            )
            if target == "relabel":
                out += [(a, h, y) for a, (h, y) in zip(answers, forced, strict=True)]
            else:
                out += list(zip(answers, forced, strict=True))
            for a in answers:
                on_finish(len(a))
    t_gen = time.perf_counter() - t0
    results = dict(zip(keep, out, strict=True))
    order = sorted(results)  # back to selection order
    seqs = [np.array([encoded[k][-1]] + results[k][0], np.int32) for k in order]
    hidden = [results[k][1] for k in order]
    tok_off = np.cumsum([0] + [len(s) for s in seqs]).astype(np.int64)
    hid = np.concatenate(hidden) if hidden else np.zeros((0, model.args.hidden_size))
    extra = {}
    if target == "relabel":
        labels = [np.array([-1] + list(results[k][2]), np.int32) for k in order]
        extra["labels"] = np.concatenate(labels) if labels else np.zeros((0,), np.int32)
    return {
        **extra,
        "tokens": np.concatenate(seqs) if seqs else np.zeros((0,), np.int32),
        "token_offsets": tok_off,
        "hidden": np.clip(hid, -65000, 65000).astype(np.float16),
        "prompt_index": np.array([start + k for k in order], np.int64),
        "skipped": np.array(skipped),
        "gen_seconds": np.array(t_gen),
    }


def _load_shards(data_dir: Path, ranges, fingerprint) -> DistillData:
    tokens, hiddens, index, labels = [], [], [], []
    skipped, seconds = 0, 0.0
    for start, end in ranges:
        with np.load(_shard_path(data_dir, start, end)) as z:
            flat, off = z["tokens"], z["token_offsets"]
            tokens += [flat[off[i] : off[i + 1]] for i in range(len(off) - 1)]
            if "labels" in z:
                labels += [z["labels"][off[i] : off[i + 1]] for i in range(len(off) - 1)]
            hiddens.append(z["hidden"])
            index.append(z["prompt_index"])
            skipped += int(z["skipped"])
            seconds += float(z["gen_seconds"])
    starts = np.cumsum([0] + [len(t) - 1 for t in tokens]).astype(np.int64)
    hidden = np.concatenate(hiddens) if hiddens else np.zeros((0, 0), np.float16)
    data = DistillData(
        tokens=tokens,
        hidden=hidden,
        hidden_start=starts,
        prompt_index=np.concatenate(index) if index else np.zeros((0,), np.int64),
        fingerprint=fingerprint,
        labels=labels if fingerprint.get("target") == "relabel" else None,
    )
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


def _bar(progress: bool, **kwargs):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(dynamic_ncols=True, **kwargs)


# ---------------------------------------------------------------------------------------------
# Draft vocabulary


def target_counts(data: DistillData, sequences: Sequence[int], vocab_size: int) -> np.ndarray:
    """How often each token is a training target (a response token) in `sequences`."""
    if len(sequences) == 0:
        return np.zeros(vocab_size, np.int64)
    flat = np.concatenate([data.targets(i)[1:] for i in sequences])
    return np.bincount(flat, minlength=vocab_size)[:vocab_size].astype(np.int64)


def draft_vocabulary(
    counts: np.ndarray, size: int, always: Sequence[int] = ()
) -> np.ndarray | None:
    """The `size` most frequent target tokens (ties to the lower id) plus `always` (EOS), as
    sorted int32 ids; None for the full vocabulary (size 0 or >= V)."""
    V = len(counts)
    if size <= 0 or size >= V:
        return None
    always = sorted(set(int(t) for t in always if 0 <= int(t) < V))
    if size < len(always):
        raise TrainError(f"draft vocabulary size {size} cannot hold the {len(always)} EOS ids")
    by_freq = np.lexsort((np.arange(V), -counts))  # most frequent first
    chosen = list(always)
    taken = set(always)
    for t in by_freq:
        if len(chosen) == size:
            break
        if int(t) not in taken:
            chosen.append(int(t))
            taken.add(int(t))
    return np.array(sorted(chosen), np.int32)


def coverage(counts: np.ndarray, ids: np.ndarray | None) -> float:
    """Fraction of target tokens inside the draft vocabulary."""
    total = counts.sum()
    if ids is None or total == 0:
        return 1.0
    return float(counts[ids].sum() / total)


# ---------------------------------------------------------------------------------------------
# Training examples: one per (sequence, position)


@dataclass
class Positions:
    """Training examples: context row t of a sequence and the N+1 tokens after it."""

    rows: np.ndarray  # (P,) int64 rows of DistillData.hidden: H_t
    windows: np.ndarray  # (P, N+1) int32: x_{t+1} .. x_{t+N+1}, -1 past the sequence end
    labels: np.ndarray  # (P, N+1) int32: the same window of DistillData.targets

    def __len__(self) -> int:
        return len(self.rows)


def make_positions(data: DistillData, sequences: Sequence[int], num_predict: int) -> Positions:
    """Every position t with at least one target: head i (1..N) at t reads x_{t+1..t+i} through
    the RNN (x_{t+1} plays g0) and predicts x_{t+i+1} (or its label y_{t+i+1}); H_t already
    fixes x_{t+1}."""
    N = num_predict
    rows, windows, labels = [], [], []

    def window(x: np.ndarray, n: int) -> np.ndarray:
        padded = np.concatenate([x[1:], np.full(N + 1, -1, np.int32)]).astype(np.int32)
        return np.lib.stride_tricks.sliding_window_view(padded, N + 1)[:n]

    for i in sequences:
        x = data.tokens[i]
        n = len(x) - 2  # t = 0 .. T-3 have a target for head 1
        if n <= 0:
            continue
        windows.append(window(x, n))
        if data.labels is not None:
            labels.append(window(data.labels[i], n))
        rows.append(data.hidden_start[i] + np.arange(n, dtype=np.int64))
    if not rows:
        empty = np.zeros((0, N + 1), np.int32)
        return Positions(np.zeros((0,), np.int64), empty, empty)
    windows = np.ascontiguousarray(np.concatenate(windows))
    labels = windows if data.labels is None else np.ascontiguousarray(np.concatenate(labels))
    return Positions(np.concatenate(rows), windows, labels)


def head_targets(windows: np.ndarray, head_index: np.ndarray | None) -> np.ndarray:
    """(P, N+1) windows -> (P, N) head rows to predict: -1 = outside the draft vocabulary (not
    trained, counted as a miss), -2 = past the end of the sequence (not counted)."""
    tokens = windows[:, 1:]
    out = tokens if head_index is None else head_index[np.maximum(tokens, 0)]
    return np.where(tokens < 0, -2, out).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# The training forward


def draft_logits(drafter, hidden: mx.array, embeddings: mx.array) -> mx.array:
    """Teacher-forced drafter logits for all heads at once: (N, B, K).

    hidden (B, h): H_t, the context. embeddings (B, N, h): E[x_{t+1}] .. E[x_{t+N}]. Head i
    runs the RNN over the first i of them from s_0 = 0, exactly as beam search does from
    g0 = x_{t+1}, so logits[i-1] is the drafter's inference-time distribution for x_{t+i+1}.
    """
    B, N, _ = embeddings.shape
    state = drafter.initial_state(B)
    states = []
    for i in range(N):
        state = drafter.next_state(state, embeddings[:, i])
        states.append(state)
    return drafter.head(hidden[None], mx.stack(states))


@mx.custom_function
def _cross_entropy(logits: mx.array, targets: mx.array):
    """-> (cross-entropy (...,), softmax (..., K)). One exp pass serves the loss and, kept as
    the second output, its gradient: on a CPU the exps over (N, B, K) logits cost about as
    much as the head's matmuls, and logsumexp's own gradient would run them again."""
    top = mx.max(logits, axis=-1, keepdims=True)
    e = mx.exp(logits - top)
    total = e.sum(axis=-1, keepdims=True)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return (mx.log(total) + top)[..., 0] - picked, e / total


@_cross_entropy.vjp
def _cross_entropy_vjp(primals, cotangents, outputs):
    logits, targets = primals
    g = cotangents[0][..., None]
    grad = outputs[1] * g  # softmax - onehot, scaled
    idx = targets[..., None]
    grad = mx.put_along_axis(grad, idx, mx.take_along_axis(grad, idx, axis=-1) - g, axis=-1)
    return grad, mx.zeros_like(targets)


def _loss_terms(drafter, hidden, embeddings, targets):
    """targets (N, B) from head_targets (transposed). -> (loss, per-head loss sum, counts
    (4, N): trained targets, correct, chain-correct, existing targets)."""
    logits = draft_logits(drafter, hidden, embeddings).astype(mx.float32)  # (N, B, K)
    trained = targets >= 0
    ce = _cross_entropy(logits, mx.maximum(targets, 0))[0] * trained
    n_trained = trained.sum(axis=1)
    head_loss = ce.sum(axis=1)
    loss = (head_loss / mx.maximum(n_trained, 1)).mean()
    exists = targets > -2
    correct = (mx.argmax(logits, axis=-1) == targets) & trained
    chain = mx.cumprod(correct.astype(mx.int32), axis=0) > 0
    counts = mx.stack(
        [n_trained, correct.sum(axis=1), (chain & exists).sum(axis=1), exists.sum(axis=1)]
    )  # (4, N)
    return loss, head_loss, counts


def _summarise(head_loss: np.ndarray, counts: np.ndarray) -> dict:
    n_trained, correct, chain, exists = counts
    head_acc = correct / np.maximum(exists, 1)
    chain_acc = chain / np.maximum(exists, 1)
    return {
        "loss": float(np.mean(head_loss / np.maximum(n_trained, 1))),
        "head_loss": [round(float(x), 5) for x in head_loss / np.maximum(n_trained, 1)],
        "head_accuracy": [round(float(x), 5) for x in head_acc],
        "chain_accuracy": [round(float(x), 5) for x in chain_acc],
        # Tokens per step of W=1, L=N+1 decoding if acceptance followed the teacher-forced
        # chain accuracy: g0 plus each drafted token whose heads so far were all right.
        "expected_tokens_per_step_w1": round(1.0 + float(np.sum(chain_acc)), 4),
        "targets": int(exists.sum()),
    }


class _Batches:
    """Host-side batch assembly: hidden rows (float16 -> float32), embeddings, targets."""

    def __init__(self, model, data: DistillData, pos: Positions, targets: np.ndarray):
        self.model, self.data, self.pos, self.targets = model, data, pos, targets
        self.num_predict = targets.shape[1]

    def get(self, idx: np.ndarray):
        idx = np.sort(idx)  # contiguous reads; the loss does not depend on the order
        hidden = mx.array(self.data.hidden[self.pos.rows[idx]]).astype(mx.float32)
        inputs = np.maximum(self.pos.windows[idx, : self.num_predict], 0)
        embeddings = self.model.embed(mx.array(inputs)).astype(mx.float32)
        return hidden, embeddings, mx.array(self.targets[idx].T)


def evaluate(
    drafter, model, data: DistillData, pos: Positions, targets: np.ndarray, batch_size: int = 512
) -> dict:
    """Teacher-forced loss and per-head top-1 accuracy over a held-out set."""
    batches = _Batches(model, data, pos, targets)
    N = targets.shape[1]
    head_loss, counts = np.zeros(N), np.zeros((4, N), np.int64)
    for start in range(0, len(pos), batch_size):
        idx = np.arange(start, min(start + batch_size, len(pos)))
        _, hl, c = _loss_terms(drafter, *batches.get(idx))
        mx.eval(hl, c)
        head_loss += np.array(hl, np.float64)
        counts += np.array(c, np.int64)
    return _summarise(head_loss, counts)


def _lr_schedule(peak: float, warmup: int, total: int):
    def schedule(step):
        step = step.astype(mx.float32)
        warm = peak * (step + 1) / warmup
        progress = mx.clip((step - warmup) / max(1, total - warmup), 0.0, 1.0)
        return mx.where(step < warmup, warm, 0.5 * peak * (1 + mx.cos(math.pi * progress)))

    return schedule


def _lr_at(peak: float, warmup: int, total: int, step: int) -> float:
    """The schedule's value at `step`, on the host (for the log)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
    return 0.5 * peak * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _save_checkpoint(ckpt: Path, drafter, optimizer, state: dict, order: np.ndarray | None):
    """drafter weights, optimizer state, data order and counters, replaced atomically."""
    from .drafter import save_drafter

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


def _check_resumable(path: Path, saved: dict, settings: dict) -> None:
    """A checkpoint resumes only the run it was made by: same base, data and settings."""
    if not _same_model(saved["data"]["base_model"], settings["data"]["base_model"]):
        raise TrainError(
            f"the checkpoint in {path} was made for another base model "
            f"({_describe_model(saved['data']['base_model'])}): use another work dir or "
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


def _find_checkpoint(ckpt: Path) -> Path | None:
    for path in (ckpt, ckpt.with_name(ckpt.name + ".old")):
        if (path / "state.json").exists():
            return path
    return None


# ---------------------------------------------------------------------------------------------
# Training


def split_sequences(n: int, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) sequence indices; the split depends only on n and the fraction."""
    if not 0.0 <= eval_fraction < 1.0:
        raise TrainError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    order = np.random.default_rng(DATA_SEED + 1).permutation(n)
    n_eval = int(round(eval_fraction * n))
    if eval_fraction > 0 and n >= 2:
        n_eval = max(1, n_eval)
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def fit(
    model,
    data: DistillData,
    out_dir: str | os.PathLike,
    *,
    work_dir: str | os.PathLike,
    epochs: int = 1,
    learning_rate: float = 1e-3,
    batch_size: int = 256,
    num_predict: int = 5,
    num_layers: int = 2,
    draft_vocab_size: int = 0,
    exit_dim: int | None = None,
    seed: int = 0,
    eval_fraction: float = 0.05,
    eval_every: int | None = None,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    warmup_fraction: float = 0.05,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    eos_token_ids: Sequence[int] = (),
    save_dtype: str | None = None,
    resume: bool = True,
    progress: bool = True,
    max_steps: int | None = None,
    callback: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train a drafter on `data` with the base frozen; write it to `out_dir`; return the log.

    One example is one position t of a sequence (its context H_t and the N+1 tokens after
    it), so a batch is `batch_size` positions drawn from all sequences. The loss is the mean
    over heads of each head's mean cross-entropy over its trained targets. The run
    checkpoints to `work_dir/checkpoint` every `checkpoint_every` steps and on Ctrl-C
    (raising TrainInterrupted); calling again with the same arguments resumes it, with the
    same result as an uninterrupted run. `max_steps` stops (with a checkpoint) after that
    many steps in all; `callback(step, metrics)` runs after every step.
    """
    from .drafter import init_drafter, load_drafter

    for name, value, low in (
        ("epochs", epochs, 1),
        ("batch_size", batch_size, 1),
        ("num_predict", num_predict, 1),
        ("num_layers", num_layers, 0),
        ("draft_vocab_size", draft_vocab_size, 0),
        ("checkpoint_every", checkpoint_every, 1),
    ):
        if value < low:
            raise TrainError(f"{name} must be >= {low}, got {value}")
    if learning_rate <= 0:
        raise TrainError(f"learning_rate must be > 0, got {learning_rate}")
    if save_dtype not in (None, "float32", "float16", "bfloat16"):
        raise TrainError(f"save_dtype must be float32, float16 or bfloat16, got {save_dtype!r}")
    h = model.args.hidden_size
    if data.hidden.shape[1] != h:
        raise TrainError(
            f"the data's hidden states have size {data.hidden.shape[1]} but the base model's "
            f"hidden size is {h}: the data was made for another base model"
        )
    base_fp = model_fingerprint(model)
    if data.fingerprint.get("base_model") and not _same_model(
        data.fingerprint["base_model"], base_fp
    ):
        raise TrainError(
            f"the data was made for another base model ({_describe_model(data.fingerprint['base_model'])})"
        )
    t_start = time.perf_counter()
    work_dir, out_dir = Path(work_dir), Path(out_dir)
    V = model.args.vocab_size

    train_seqs, eval_seqs = split_sequences(data.num_sequences, eval_fraction)
    counts_train = target_counts(data, train_seqs, V)
    counts_eval = target_counts(data, eval_seqs, V)
    vocab = draft_vocabulary(counts_train, draft_vocab_size, eos_token_ids)
    head_index = None
    if vocab is not None:
        head_index = np.full(V, -1, np.int32)
        head_index[vocab] = np.arange(len(vocab), dtype=np.int32)
    train_pos = make_positions(data, train_seqs, num_predict)
    eval_pos = make_positions(data, eval_seqs, num_predict)
    if len(train_pos) == 0:
        raise TrainError("no training examples: the responses are too short (need >= 2 tokens)")
    train_targets = head_targets(train_pos.labels, head_index)
    eval_targets = head_targets(eval_pos.labels, head_index)

    bs = min(batch_size, len(train_pos))
    steps_per_epoch = len(train_pos) // bs
    total = epochs * steps_per_epoch
    warmup = max(1, int(round(warmup_fraction * total)))
    settings = {
        "epochs": epochs,
        "learning_rate": learning_rate,
        "batch_size": bs,
        "num_predict": num_predict,
        "num_layers": num_layers,
        "draft_vocab_size": draft_vocab_size,
        "exit_dim": exit_dim,
        "seed": seed,
        "eval_fraction": eval_fraction,
        "eval_every": eval_every,
        "warmup_steps": warmup,
        "weight_decay": weight_decay,
        "max_grad_norm": max_grad_norm,
        "total_steps": total,
        "train_positions": len(train_pos),
        "data": {k: v for k, v in data.fingerprint.items()},
        "sequences": data.num_sequences,
    }

    drafter = init_drafter(
        model,
        seed=seed,
        exit_dim=exit_dim,
        num_draft_layers=num_layers,
        draft_vocab_ids=None if vocab is None else vocab.tolist(),
    )
    optimizer = optim.AdamW(
        learning_rate=_lr_schedule(learning_rate, warmup, total), weight_decay=weight_decay
    )
    rng = np.random.default_rng(seed)
    step, order, order_epoch = 0, None, -1
    curves: dict[str, list] = {"loss": [], "head_accuracy": [], "learning_rate": []}
    evals: list[dict] = []
    seconds = {"train": 0.0, "eval": 0.0}

    ckpt_dir = work_dir / "checkpoint"
    found = _find_checkpoint(ckpt_dir) if resume else None
    if not resume:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    if found is not None:
        saved = json.loads((found / "state.json").read_text())
        _check_resumable(found, saved["settings"], settings)
        drafter = load_drafter(found / "drafter", base=model)
        optimizer.state = tree_unflatten(
            list(mx.load(str(found / "optimizer.safetensors")).items())
        )
        step = saved["step"]
        rng.bit_generator.state = saved["rng"]
        order_epoch = saved["order_epoch"]
        if (found / "order.npy").exists():
            order = np.load(found / "order.npy")
        curves, evals, seconds = saved["curves"], saved["evals"], saved["seconds"]

    def state_dict():
        return {
            "version": 1,
            "settings": settings,
            "step": step,
            "rng": rng.bit_generator.state,
            "order_epoch": order_epoch,
            "curves": curves,
            "evals": evals,
            "seconds": seconds,
        }

    def run_eval():
        if len(eval_pos) == 0:
            return
        t0 = time.perf_counter()
        result = evaluate(drafter, model, data, eval_pos, eval_targets, batch_size=max(bs, 256))
        seconds["eval"] += time.perf_counter() - t0
        evals.append({"step": step, "epoch": step / steps_per_epoch, **result})

    def eval_due(s: int) -> bool:
        return s == total or s % steps_per_epoch == 0 or bool(eval_every and s % eval_every == 0)

    loss_and_grad = nn.value_and_grad(drafter, _loss_terms)

    def train_step(hidden, embeddings, targets):
        (loss, head_loss, counts), grads = loss_and_grad(drafter, hidden, embeddings, targets)
        if max_grad_norm:
            grads, _ = optim.clip_grad_norm(grads, max_grad_norm)
        optimizer.update(drafter, grads)
        return loss, head_loss, counts

    compiled_state = [drafter.state, optimizer.state]
    train_step = mx.compile(train_step, inputs=compiled_state, outputs=compiled_state)
    batches = _Batches(model, data, train_pos, train_targets)
    last = total if max_steps is None else min(total, max_steps)

    bar = _bar(progress, total=total, initial=step, desc="training", unit="step")
    in_step, snapshot = False, None
    try:
        if step > 0 and eval_due(step) and not (evals and evals[-1]["step"] == step):
            run_eval()  # interrupted during this step's evaluation
        while step < last:
            epoch, k = divmod(step, steps_per_epoch)
            if order_epoch != epoch:
                order, order_epoch = rng.permutation(len(train_pos)), epoch
            idx = order[k * bs : (k + 1) * bs]
            t0 = time.perf_counter()
            snapshot = (drafter.parameters(), tree_map(lambda x: x, optimizer.state))
            in_step = True
            loss, head_loss, counts = train_step(*batches.get(idx))
            mx.eval(loss, head_loss, counts, drafter.parameters(), optimizer.state)
            metrics = _summarise(np.array(head_loss, np.float64), np.array(counts, np.int64))
            curves["loss"].append(float(loss.item()))
            curves["head_accuracy"].append(metrics["head_accuracy"])
            curves["learning_rate"].append(_lr_at(learning_rate, warmup, total, step))
            step += 1
            in_step = False
            seconds["train"] += time.perf_counter() - t0
            if eval_due(step):
                run_eval()
            if bar is not None:
                bar.update(1)
                acc = "/".join(f"{a:.2f}" for a in metrics["head_accuracy"])
                post = f"loss {np.mean(curves['loss'][-20:]):.3f} acc {acc}"
                if evals:
                    post += f" | eval {evals[-1]['expected_tokens_per_step_w1']:.2f} tok/step"
                bar.set_postfix_str(post, refresh=False)
            if callback is not None:
                callback(step, {"loss": curves["loss"][-1], **metrics})
            if step % checkpoint_every == 0 or step == last:
                _save_checkpoint(ckpt_dir, drafter, optimizer, state_dict(), order)
    except KeyboardInterrupt:
        if in_step:  # the step did not finish: keep the state from before it
            drafter.update(snapshot[0])
            optimizer.state = snapshot[1]
        _save_checkpoint(ckpt_dir, drafter, optimizer, state_dict(), order)
        raise TrainInterrupted(
            f"training interrupted at step {step}/{total}; checkpoint saved in {ckpt_dir}: "
            "run the same command again to resume",
            step=step,
            work_dir=work_dir,
        ) from None
    finally:
        if bar is not None:
            bar.close()

    from .drafter import save_drafter

    final_eval = evals[-1] if evals else None
    if save_dtype is not None and save_dtype != "float32":
        drafter.set_dtype(getattr(mx, save_dtype))
    save_drafter(drafter, out_dir)
    return {
        "finished": step == total,
        "steps": step,
        "settings": settings,
        "draft_vocab": {
            "size": 0 if vocab is None else len(vocab),
            "coverage_train": round(coverage(counts_train, vocab), 5),
            "coverage_eval": round(coverage(counts_eval, vocab), 5),
        },
        "data": {
            "train_sequences": len(train_seqs),
            "eval_sequences": len(eval_seqs),
            "train_positions": len(train_pos),
            "eval_positions": len(eval_pos),
            "train_tokens_seen": step * bs,
        },
        "drafter": {
            "path": str(out_dir),
            "description": drafter.describe(),
            "parameters": drafter.num_parameters,
            "bytes": drafter.nbytes,
            "dtype": save_dtype or "float32",
        },
        "curves": curves,
        "evals": evals,
        "final_eval": final_eval,
        "seconds": {
            "train": round(seconds["train"], 2),
            "eval": round(seconds["eval"], 2),
            "this_run": round(time.perf_counter() - t_start, 2),
        },
        "steps_per_s": round(step / seconds["train"], 4) if seconds["train"] else None,
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
) -> dict:
    """Distil a drafter for `model` from `prompts_file` into `out_dir`; return the log.

    model: a model directory, .gguf or Hugging Face id, None for the default model, or a
    loaded model object (then pass `tokenizer`). Writes the drafter (config.json +
    model.safetensors, loadable with `load_drafter`) and `training_log.json` to `out_dir`;
    data shards and checkpoints go to `work_dir` (default: `<out_dir>-work` beside it).
    Interrupted runs (Ctrl-C raises TrainInterrupted) resume from there when called again.
    """
    t0 = time.perf_counter()
    if not str(out_dir):
        raise TrainError("no output directory given")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainError(f"output {out_dir} exists and is not a directory")
    work_dir = Path(work_dir) if work_dir is not None else out_dir.with_name(out_dir.name + "-work")
    if isinstance(model, (str, os.PathLike)) or model is None:
        from .loading import load

        model_name = "default" if model is None else str(model)
        model, loaded_tokenizer = load(model, dtype=dtype)
        tokenizer = tokenizer or loaded_tokenizer
    else:
        model_name = "<in-memory model>"
        if tokenizer is None:
            raise TrainError("pass the tokenizer along with a loaded model")
    model.freeze()
    t_load = time.perf_counter() - t0

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
    )
    t_data = time.perf_counter() - t1
    result = fit(
        model,
        data,
        out_dir,
        work_dir=work_dir,
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
        eos_token_ids=_stop_ids(tokenizer),
        save_dtype=save_dtype,
        resume=resume,
        progress=progress,
        max_steps=max_steps,
        callback=callback,
    )
    log = {
        "base_model": {
            "name": model_name,
            **model_fingerprint(model),
            "dtype": str(model.model.norm.weight.dtype).split(".")[-1],
        },
        "settings": {
            "prompts_file": str(Path(prompts_file).resolve()),
            "num_prompts": num_prompts,
            "new_tokens": new_tokens,
            "target": target,
            "gen_batch_size": gen_batch_size,
            "save_dtype": save_dtype,
            "work_dir": str(work_dir.resolve()),
            **{k: v for k, v in result.pop("settings").items() if k != "data"},
        },
        "data": {**data.stats, **result.pop("data")},
        **result,
    }
    log["seconds"].update(
        load=round(t_load, 2),
        data_this_run=round(t_data, 2),
        generation_total=data.stats["generation_seconds"],
        total_this_run=round(time.perf_counter() - t0, 2),
    )
    log["machine"] = machine()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    return log
