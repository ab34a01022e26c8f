"""The recurrent drafter (Apple's checkpoint layout) and its beam search.

A drafter is a one-layer RNN over the base model's token embeddings plus an MLP head that
also sees the base model's last hidden state; `beam_search` turns the last committed token
into W candidate continuations of length L. Parameter names match Apple's PyTorch drafter,
so Apple-recipe `config.json` + `model.safetensors` directories load unchanged.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .env import compute_dtype
from .errors import DrafterError, read_json_object
from .loading import check_weights, read_safetensors

MODEL_TYPE = "recurrent_drafting_drafter"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Advice for the usual mismatches between a checkpoint's weights and its config.json.
WEIGHT_HINTS = {
    "emb_norm.": ' (set "emb_norm": true in config.json)',
    "input_proj.": " (exit_dim in config.json decides whether input_proj exists)",
}


@dataclass
class DrafterArgs:
    vocab_size: int
    hidden_size: int
    exit_dim: int | None = None  # None: 2 * hidden_size (Apple's recipe; no input_proj)
    num_draft_layers: int = 2
    rnn: bool = True
    emb_norm: bool = False
    rms_norm_eps: float = 1e-5
    model_type: str = MODEL_TYPE
    # Ours, absent in Apple checkpoints: the head predicts only these K token ids.
    draft_vocab_ids: list[int] | None = None
    quantization: dict[str, Any] | None = None
    # Ours: base blocks whose (RMS-normalised) outputs the context also reads, fused with the
    # last post-norm state by a learned projection. None: the last state only (Apple's).
    feature_layers: list[int] | None = None
    # Ours (drafter v3), off in Apple's layout: the recurrence also reads the (fused) context
    # (rnn_c), and a sigmoid gate mixes the new state with the old one (rnn_gate_*).
    rnn_context: bool = False
    rnn_gate: bool = False

    def __post_init__(self):
        if self.model_type != MODEL_TYPE:
            raise DrafterError(
                f"model_type is {self.model_type!r}, not {MODEL_TYPE!r} (is this a base model?)"
            )
        if self.exit_dim is None:
            self.exit_dim = 2 * self.hidden_size
        for name in ("vocab_size", "hidden_size", "exit_dim"):
            if int(getattr(self, name)) < 1:
                raise DrafterError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_draft_layers < 0:
            raise DrafterError(f"num_draft_layers must be >= 0, got {self.num_draft_layers}")
        if self.draft_vocab_ids is not None:
            ids = [int(i) for i in np.asarray(self.draft_vocab_ids).reshape(-1)]
            if not ids:
                raise DrafterError("draft_vocab_ids is empty")
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            if bad:
                raise DrafterError(
                    f"draft_vocab_ids has ids outside [0, {self.vocab_size}): {bad[:5]}"
                )
            if len(set(ids)) != len(ids):
                raise DrafterError("draft_vocab_ids has duplicate ids")
            self.draft_vocab_ids = ids
        if (self.rnn_context or self.rnn_gate) and not self.rnn:
            raise DrafterError("rnn_context and rnn_gate need the recurrent cell (rnn: true)")
        if self.feature_layers is not None:
            layers = [int(i) for i in self.feature_layers]
            if not layers or min(layers) < 0 or len(set(layers)) != len(layers):
                raise DrafterError(
                    f"feature_layers must be distinct block indices >= 0, got {layers}"
                )
            self.feature_layers = layers

    @property
    def head_size(self) -> int:
        """Rows of the final head: K with a draft vocabulary, else V."""
        return len(self.draft_vocab_ids) if self.draft_vocab_ids else self.vocab_size

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> DrafterArgs:
        """Build from a config.json dict; unknown keys (transformers' bookkeeping,
        `num_lookback_tokens`, ...) are ignored."""
        names = inspect.signature(cls).parameters
        missing = [n for n in ("vocab_size", "hidden_size") if n not in config]
        if missing:
            raise DrafterError(f"config has no {' or '.join(missing)}")
        return cls(**{k: v for k, v in config.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "exit_dim": self.exit_dim,
            "num_draft_layers": self.num_draft_layers,
            "rnn": self.rnn,
            "emb_norm": self.emb_norm,
            "rms_norm_eps": self.rms_norm_eps,
        }
        if self.quantization:
            out["quantization"] = dict(self.quantization)
        if self.feature_layers is not None:
            out["feature_layers"] = list(self.feature_layers)
        for flag in ("rnn_context", "rnn_gate"):
            if getattr(self, flag):
                out[flag] = True
        if self.draft_vocab_ids is not None:
            out["draft_vocab_ids"] = list(self.draft_vocab_ids)
        return out


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else str(n)


class ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return x + nn.silu(self.linear(x))


class Drafter(nn.Module):
    """ReDrafter's draft model. The base model's embedding is borrowed, never stored."""

    def __init__(self, args: DrafterArgs):
        super().__init__()
        self.args = args
        h, e = args.hidden_size, args.exit_dim
        if args.feature_layers:
            # (1 + F) h -> h: the context the head reads, from the last state and F layers.
            self.fuse = nn.Linear((1 + len(args.feature_layers)) * h, h)
        if e != 2 * h:
            self.input_proj = nn.Linear(2 * h, e)
        # A list, so names are lm_head.{i}.linear.* and lm_head.{N}.weight as in torch's Sequential.
        self.lm_head = [ResBlock(e) for _ in range(args.num_draft_layers)]
        self.lm_head.append(nn.Linear(e, args.head_size, bias=False))
        if args.rnn:
            self.rnn_u = nn.Linear(h, h)  # on the state; carries the bias
            self.rnn_w = nn.Linear(h, h, bias=False)  # on the embedding
        if args.rnn_context:
            self.rnn_c = nn.Linear(h, h, bias=False)  # on the fused context
        if args.rnn_gate:
            self.rnn_gate_u = nn.Linear(h, h)
            self.rnn_gate_w = nn.Linear(h, h, bias=False)
        if args.emb_norm:
            # Only so that checkpoints from Apple's internal trainer load; never applied.
            self.emb_norm = nn.RMSNorm(h, eps=args.rms_norm_eps)
        # Leading underscores keep these out of parameters(): they are not trained or saved
        # as tensors (the ids live in config.json).
        self._draft_vocab = None
        self._head_index = None
        if args.draft_vocab_ids is not None:
            ids = np.asarray(args.draft_vocab_ids, dtype=np.int32)
            inverse = np.full(args.vocab_size, -1, dtype=np.int32)
            inverse[ids] = np.arange(len(ids), dtype=np.int32)
            self._draft_vocab = mx.array(ids)  # (K,)
            self._head_index = mx.array(inverse)  # (V,)
        # A plain attribute (not a module entry): compiled step functions by (width, top_k).
        object.__setattr__(self, "_compiled", {})

    # -- properties ------------------------------------------------------------------------

    @property
    def head_size(self) -> int:
        return self.args.head_size

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """Base blocks whose states the context carries besides the last one (see
        Model.__call__'s `features`); () for a last-layer drafter."""
        return tuple(self.args.feature_layers or ())

    @property
    def context_size(self) -> int:
        """Width of the context vector the drafter reads: (1 + len(feature_layers)) * h."""
        return (1 + len(self.feature_layers)) * self.args.hidden_size

    @property
    def draft_vocab_ids(self) -> mx.array | None:
        """int32 (K,) token ids the head predicts, or None for the full vocabulary."""
        return self._draft_vocab

    @property
    def dtype(self) -> mx.Dtype:
        """The dtype the drafter computes in (its float parameters' dtype)."""
        final = self.lm_head[-1]
        return final["scales"].dtype if "scales" in final else final.weight.dtype

    @property
    def num_parameters(self) -> int:
        """Logical parameter count (quantized weights counted unpacked; scales not counted)."""
        bits = (self.args.quantization or {}).get("bits")
        total = 0
        for name, value in tree_flatten(self.parameters()):
            if value.dtype == mx.uint32 and bits:
                total += value.size * 32 // bits
            elif bits and name.endswith((".scales", ".biases")):
                continue
            else:
                total += value.size
        return total

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for _, v in tree_flatten(self.parameters()))

    def describe(self) -> str:
        a = self.args
        kind = "RNN" if a.rnn else "embedding-sum"
        vocab = f"draft vocab {a.head_size}/{a.vocab_size}" if a.draft_vocab_ids else "full vocab"
        if a.feature_layers:
            vocab += f", features from layers {','.join(map(str, a.feature_layers))} + last"
        q = a.quantization
        dtype = f"{q['bits']}-bit" if q else str(self.dtype).split(".")[-1]
        return (
            f"{kind} drafter: hidden {a.hidden_size}, exit {a.exit_dim}, "
            f"{a.num_draft_layers} ResBlocks, {vocab}, "
            f"{_count(self.num_parameters)} parameters, {dtype}, {self.nbytes / 2**20:.1f} MiB"
        )

    # -- vocabulary ------------------------------------------------------------------------

    def full_vocab_ids(self, head_indices: mx.array) -> mx.array:
        """Map indices into the head's rows to base-vocabulary token ids (int32)."""
        head_indices = head_indices.astype(mx.int32)
        return head_indices if self._draft_vocab is None else self._draft_vocab[head_indices]

    def head_index(self, token_ids: mx.array) -> mx.array:
        """Map base-vocabulary token ids to head rows; -1 for ids outside the draft vocabulary."""
        token_ids = token_ids.astype(mx.int32)
        return token_ids if self._head_index is None else self._head_index[token_ids]

    # -- forward ---------------------------------------------------------------------------

    def initial_state(self, n: int = 1) -> mx.array:
        """s_0 = 0, shape (n, h)."""
        return mx.zeros((n, self.args.hidden_size), dtype=self.dtype)

    def fused(self, context: mx.array) -> mx.array:
        """The context (..., context_size) as the head and the recurrence read it (..., h)."""
        context = context.astype(self.dtype)
        return self.fuse(context) if "fuse" in self else context

    def context_term(self, context: mx.array) -> mx.array | None:
        """What the context adds to every recurrence step (rnn_context drafters; else None),
        computed once per draft and passed to next_state."""
        return self.rnn_c(self.fused(context)) if self.args.rnn_context else None

    def next_state(
        self, state: mx.array, embeddings: mx.array, context_term: mx.array | None = None
    ) -> mx.array:
        """s_t from s_{t-1} and E[x_{t-1}] (both (..., h)); `context_term` is
        context_term(c) for an rnn_context drafter (broadcast to the state)."""
        embeddings = embeddings.astype(state.dtype)
        if not self.args.rnn:
            return state + embeddings
        pre = self.rnn_w(embeddings) + self.rnn_u(state)
        if self.args.rnn_context:
            if context_term is None:
                raise DrafterError("this drafter's recurrence reads the context: pass context_term")
            pre = pre + context_term
        new = nn.silu(pre)
        if not self.args.rnn_gate:
            return new
        gate = mx.sigmoid(self.rnn_gate_w(embeddings) + self.rnn_gate_u(state))
        return state + gate * (new - state)

    def head(self, context: mx.array, state: mx.array) -> mx.array:
        """Logits (..., V or K) from the context c (..., context_size; broadcast to the
        state) and s_t. A multi-layer context is first fused to h."""
        context = mx.broadcast_to(self.fused(context).astype(state.dtype), state.shape)
        z = mx.concatenate([context, state], axis=-1)  # (..., 2h), context first
        if "input_proj" in self:
            z = self.input_proj(z)
        for block in self.lm_head[:-1]:
            z = block(z)
        return self.lm_head[-1](z)


def init_drafter(
    base_model,
    seed: int = 0,
    exit_dim: int | None = None,
    num_draft_layers: int = 2,
    rnn: bool = True,
    draft_vocab_ids=None,
    dtype: mx.Dtype | None = None,
    feature_layers=None,
    rnn_context: bool = False,
    rnn_gate: bool = False,
) -> Drafter:
    """A randomly initialised drafter for `base_model`, reproducible from `seed`.

    torch nn.Linear's default init (weights and biases uniform in +-1/sqrt(fan_in)), except
    for the weights that read token embeddings: those are scaled so that their output has
    unit variance. Trained embedding tables are small (RMS ~0.02-0.1) next to a post-norm
    context (~1); without this the state is noise to the head and the drafts barely depend
    on the tokens drafted so far. A multi-layer drafter's fuse starts as [I 0 ... 0]: the
    last state passes through unchanged and the other layers' weights grow from zero.
    """
    args = DrafterArgs(
        vocab_size=base_model.args.vocab_size,
        hidden_size=base_model.args.hidden_size,
        exit_dim=exit_dim,
        num_draft_layers=num_draft_layers,
        rnn=rnn,
        draft_vocab_ids=draft_vocab_ids,
        feature_layers=list(feature_layers) if feature_layers else None,
        rnn_context=rnn_context,
        rnn_gate=rnn_gate,
    )
    if args.feature_layers:
        base_model.check_features(args.feature_layers)
    drafter = Drafter(args)
    h = args.hidden_size
    linears = sorted(
        (
            (name, m)
            for name, m in drafter.named_modules()
            if isinstance(m, nn.Linear) and name != "fuse"  # fuse: set below
        ),
        key=lambda item: item[0],
    )
    keys = mx.random.split(mx.random.key(seed), 2 * len(linears))
    params = {}
    for i, (name, module) in enumerate(linears):
        bound = module.weight.shape[1] ** -0.5
        for j, kind in enumerate(("weight", "bias")):
            if kind in module:
                shape = module[kind].shape
                params[f"{name}.{kind}"] = mx.random.uniform(
                    -bound, bound, shape, key=keys[2 * i + j]
                )
    inv_rms = 1.0 / _embedding_rms(base_model, args.vocab_size)
    if args.rnn:
        # uniform(+-sqrt(3/h)) / rms: rnn_w(E[x]) ~ unit variance.
        params["rnn_w.weight"] = params["rnn_w.weight"] * (3**0.5 * inv_rms)
        if args.rnn_gate:
            params["rnn_gate_w.weight"] = params["rnn_gate_w.weight"] * (3**0.5 * inv_rms)
    else:
        # The state is a sum of raw embeddings; scale the first layer's state columns instead.
        first = "input_proj" if "input_proj" in drafter else "lm_head.0.linear"
        if f"{first}.weight" in params:
            w = params[f"{first}.weight"]
            params[f"{first}.weight"] = mx.concatenate([w[:, :h], w[:, h:] * inv_rms], axis=1)
    if "fuse" in drafter:
        eye = mx.eye(h)
        rest = mx.zeros((h, drafter.context_size - h))
        params["fuse.weight"] = mx.concatenate([eye, rest], axis=1)
        params["fuse.bias"] = mx.zeros((h,))
    drafter.update(tree_unflatten(list(params.items())))
    if dtype is not None:
        drafter.set_dtype(dtype)
    mx.eval(drafter.parameters())
    return drafter


def _embedding_rms(base_model, vocab_size: int, rows: int = 4096) -> float:
    """RMS of the base model's embedding over up to `rows` evenly spaced token ids."""
    ids = np.linspace(0, vocab_size - 1, num=min(rows, vocab_size)).astype(np.int32)
    e = base_model.embed(mx.array(ids)).astype(mx.float32)
    rms = mx.sqrt(mx.mean(e * e)).item()
    return rms if rms > 0 else 1.0


def quantize_drafter(drafter: Drafter, group_size: int = 64, bits: int = 4) -> Drafter:
    """Quantize (in place) every Linear whose input size is a multiple of group_size, and
    record it in the config so that save/load round-trips."""
    nn.quantize(
        drafter,
        group_size=group_size,
        bits=bits,
        class_predicate=lambda _, m: (
            isinstance(m, nn.Linear) and m.weight.shape[1] % group_size == 0
        ),
    )
    drafter.args.quantization = {"group_size": group_size, "bits": bits}
    drafter._compiled.clear()
    return drafter


def _config_json(args: DrafterArgs) -> str:
    config = args.to_dict()
    ids = config.pop("draft_vocab_ids", None)
    text = json.dumps(config, indent=2)
    if ids is not None:
        # One line for the (possibly 32K-long) id list keeps the file readable.
        text = text[:-2] + f',\n  "draft_vocab_ids": {json.dumps(ids)}\n}}'
    return text + "\n"


def save_drafter(drafter: Drafter, path: str | os.PathLike) -> Path:
    """Write `config.json` + `model.safetensors` to `path`. The files are written to a
    temporary sibling directory first, so a crash never leaves a half-written drafter."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DrafterError(f"cannot save the drafter to {path}: it exists and is not a directory")
    weights = dict(tree_flatten(drafter.parameters()))
    if any(k.endswith(".scales") for k in weights) and not drafter.args.quantization:
        raise DrafterError(
            "the drafter has quantized layers but no quantization in its config; "
            "quantize it with quantize_drafter()"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        mx.save_safetensors(str(tmp / WEIGHTS_FILE), weights, metadata={"format": "mlx"})
        (tmp / CONFIG_FILE).write_text(_config_json(drafter.args))
        if path.exists():
            # Keep anything else in the directory; replace our two files, config last.
            os.replace(tmp / WEIGHTS_FILE, path / WEIGHTS_FILE)
            os.replace(tmp / CONFIG_FILE, path / CONFIG_FILE)
            tmp.rmdir()
        else:
            os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_drafter(path: str | os.PathLike, base=None, dtype: mx.Dtype | None = None) -> Drafter:
    """Load a drafter directory (config.json + model.safetensors; Apple's layout or ours).

    With `base`, check that the drafter was made for it (hidden size, vocabulary). The float
    parameters are cast to `dtype` if given, else to the base model's compute dtype (a
    bfloat16 checkpoint runs in float32 beside a float32 base); quantized weights stay as
    they are.
    """
    path = Path(path)
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "no such directory"
        raise DrafterError(f"drafter {path}: {what}")
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (config_path, weights_path):
        if not f.is_file():
            raise DrafterError(f"drafter {path} has no {f.name}")
    config = read_json_object(config_path, DrafterError)
    try:
        args = DrafterArgs.from_dict(config)
    except (DrafterError, TypeError, ValueError, KeyError) as e:
        raise DrafterError(f"{config_path}: {e}") from None

    if base is not None:
        b = base.args
        if args.hidden_size != b.hidden_size:
            raise DrafterError(
                f"drafter {path} has hidden_size {args.hidden_size} "
                f"but the base model has {b.hidden_size}"
            )
        if args.vocab_size != b.vocab_size:
            raise DrafterError(
                f"drafter {path} has vocab_size {args.vocab_size} "
                f"but the base model has {b.vocab_size}"
            )
        if args.feature_layers and max(args.feature_layers) >= b.num_hidden_layers:
            raise DrafterError(
                f"drafter {path} reads feature layers {args.feature_layers} "
                f"but the base model has {b.num_hidden_layers} layers"
            )

    weights = read_safetensors(weights_path, DrafterError)
    drafter = Drafter(args)
    if args.quantization:
        q = args.quantization
        nn.quantize(
            drafter,
            group_size=q["group_size"],
            bits=q["bits"],
            mode=q.get("mode", "affine"),
            class_predicate=lambda p, m: isinstance(m, nn.Linear) and f"{p}.scales" in weights,
        )

    check_weights(drafter, weights, weights_path, DrafterError, WEIGHT_HINTS)

    drafter.load_weights(list(weights.items()))
    if dtype is None and base is not None:
        dtype = compute_dtype(base)
    if dtype is not None and dtype != drafter.dtype:
        drafter.set_dtype(dtype)
    mx.eval(drafter.parameters())
    return drafter
