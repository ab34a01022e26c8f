"""Our drafters -> Apple's PyTorch checkpoint layout, the one TensorRT-LLM's ReDrafter
converter (`examples/redrafter/convert_checkpoint.py`) reads.

That layout is `config.json` (hidden_size, exit_dim, num_draft_layers, rnn; vocab_size as
Apple's config has it) and `model.safetensors` (or `model.pt`) with
`input_proj.{weight,bias}` (only when exit_dim != 2 * hidden_size), `lm_head.{i}.linear.*`,
`lm_head.{N}.weight` (the full vocabulary), `rnn_u.{weight,bias}`, `rnn_w.weight`. Its input
is [context; state] of width 2 * hidden_size, read from the base model's last layer only.

A draft vocabulary (our head over K frequent tokens) has no place there, so it is written as
a full-vocabulary head that gives every other token a logit of -1e4: the exit dimension
grows by a block of 8 whose first entry is a constant 1 (set by input_proj's bias, carried
unchanged through the ResBlocks, whose rows and columns for it are zero), and the head's
column for it is 0 on the draft tokens and -1e4 elsewhere. The beams stay the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .convert import staging_dir
from .drafter import MODEL_TYPE, Drafter, load_drafter
from .env import dtype_name, parse_dtype
from .errors import ConvertError

FORMATS = ("safetensors", "pt")
OUTSIDE_VOCAB_LOGIT = -1e4  # far below any trained logit; exp() of it is 0 in float16 too
_PAD = 8  # the exit dimension grows by whole blocks of this (tensor-parallel splits stay even)


def apple_tensor_names(num_draft_layers: int, input_proj: bool, rnn: bool) -> list[str]:
    """The tensor names of a drafter in Apple's layout, as TensorRT-LLM's converter lists them."""
    names = ["input_proj.weight", "input_proj.bias"] if input_proj else []
    for i in range(num_draft_layers):
        names += [f"lm_head.{i}.linear.weight", f"lm_head.{i}.linear.bias"]
    names.append(f"lm_head.{num_draft_layers}.weight")
    if rnn:
        names += ["rnn_u.weight", "rnn_u.bias", "rnn_w.weight"]
    return names


def check_exportable(drafter: Drafter, where: str) -> None:
    """Raise ConvertError (one line) for a drafter that Apple's layout cannot express."""
    args = drafter.args
    if args.feature_layers:
        raise ConvertError(
            f"{where}: this drafter reads base layers {args.feature_layers} besides the last "
            f"one; TensorRT-LLM's ReDrafter takes only the last layer's state (input width "
            f"2 x hidden_size), so it cannot run it (train one without --feature-layers)"
        )
    if args.emb_norm:
        raise ConvertError(f"{where}: TensorRT-LLM's ReDrafter has no embedding norm (emb_norm)")
    if args.rnn_context or args.rnn_gate:
        raise ConvertError(
            f"{where}: this drafter's recurrence reads the context or is gated (rnn_context, "
            "rnn_gate); TensorRT-LLM's ReDrafter has the plain cell only"
        )


def _dense(layer: nn.Module) -> tuple[mx.array, mx.array | None]:
    """(weight, bias) of a Linear, dequantized if it is a QuantizedLinear."""
    if isinstance(layer, nn.QuantizedLinear):
        weight = mx.dequantize(
            layer.weight,
            layer.scales,
            layer.get("biases"),
            group_size=layer.group_size,
            bits=layer.bits,
            mode=layer.mode,
        )
    else:
        weight = layer.weight
    return weight, layer.get("bias")


def _f32(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def apple_weights(drafter: Drafter) -> tuple[dict[str, mx.array], dict]:
    """(tensors, config) of `drafter` in Apple's layout, float32 (see the module docstring
    for how a draft vocabulary becomes a full-vocabulary head)."""
    args = drafter.args
    h, e, n = args.hidden_size, args.exit_dim, args.num_draft_layers
    out: dict[str, np.ndarray] = {}
    layers = {f"lm_head.{i}.linear": drafter.lm_head[i].linear for i in range(n)}
    if drafter.draft_vocab_ids is None:
        exit_dim = e
        if "input_proj" in drafter:
            layers = {"input_proj": drafter.input_proj, **layers}
        for name, layer in layers.items():
            weight, bias = _dense(layer)
            out[f"{name}.weight"], out[f"{name}.bias"] = _f32(weight), _f32(bias)
        out[f"lm_head.{n}.weight"] = _f32(_dense(drafter.lm_head[n])[0])
    else:
        exit_dim = (e // _PAD + 1) * _PAD  # e, then a constant 1, then zeros
        if "input_proj" in drafter:
            weight, bias = (_f32(a) for a in _dense(drafter.input_proj))
        else:  # [context; state] passes through as it is
            weight, bias = np.eye(2 * h, dtype=np.float32), np.zeros(2 * h, np.float32)
        out["input_proj.weight"] = np.zeros((exit_dim, 2 * h), np.float32)
        out["input_proj.weight"][:e] = weight
        out["input_proj.bias"] = np.zeros(exit_dim, np.float32)
        out["input_proj.bias"][:e] = bias
        out["input_proj.bias"][e] = 1.0
        for name, layer in layers.items():  # zero rows and columns: the constant stays 1
            weight, bias = (_f32(a) for a in _dense(layer))
            out[f"{name}.weight"] = np.zeros((exit_dim, exit_dim), np.float32)
            out[f"{name}.weight"][:e, :e] = weight
            out[f"{name}.bias"] = np.zeros(exit_dim, np.float32)
            out[f"{name}.bias"][:e] = bias
        head = np.zeros((args.vocab_size, exit_dim), np.float32)
        head[:, e] = OUTSIDE_VOCAB_LOGIT
        rows = np.array(drafter.draft_vocab_ids)
        head[rows, e] = 0.0
        head[rows, :e] = _f32(_dense(drafter.lm_head[n])[0])
        out[f"lm_head.{n}.weight"] = head
    if args.rnn:
        out["rnn_u.weight"], out["rnn_u.bias"] = (_f32(a) for a in _dense(drafter.rnn_u))
        out["rnn_w.weight"] = _f32(_dense(drafter.rnn_w)[0])
    config = {
        "model_type": MODEL_TYPE,
        "vocab_size": args.vocab_size,
        "hidden_size": h,
        "exit_dim": exit_dim,
        "num_draft_layers": n,
        "rnn": args.rnn,
        "emb_norm": False,
        "rms_norm_eps": args.rms_norm_eps,
    }
    return {k: mx.array(v) for k, v in out.items()}, config


def _save_torch(tensors: dict[str, mx.array], path: Path) -> None:
    try:
        import torch
    except ImportError:
        raise ConvertError(
            "writing model.pt needs PyTorch (pip install 'mlx-redrafter[torch]'); "
            "--format safetensors needs nothing more"
        ) from None
    torch_dtype = getattr(torch, dtype_name(next(iter(tensors.values())).dtype))
    state = {k: torch.from_numpy(_f32(v)).to(torch_dtype) for k, v in tensors.items()}
    torch.save(state, path)


def export_drafter(
    src: str | Path,
    dst: str | Path,
    dtype: str | None = None,
    fmt: str = "safetensors",
    overwrite: bool = False,
) -> Path:
    """Write the drafter directory `src` (ours) to `dst` in Apple's layout.

    dtype: float32 (default, as Apple's trainer saves) | float16 | bfloat16. fmt:
    "safetensors" (model.safetensors, what Apple's trainer writes and TensorRT-LLM reads
    first) or "pt" (model.pt, a torch state dict, which TensorRT-LLM also reads; needs torch).
    Quantized drafters are written dequantized. Raises ConvertError for a drafter the layout
    cannot express (several base layers, an embedding norm).
    """
    if fmt not in FORMATS:
        raise ConvertError(f"unknown format {fmt!r} (choose {' or '.join(FORMATS)})")
    target = parse_dtype(dtype, "--dtype", ConvertError) if dtype else mx.float32
    src = Path(src).expanduser()
    try:
        drafter = load_drafter(src, dtype=mx.float32)
    except (OSError, ValueError) as e:
        raise ConvertError(f"{src}: {str(e).splitlines()[0] if str(e) else e}") from None
    check_exportable(drafter, str(src))
    tensors, config = apple_weights(drafter)
    tensors = {k: v.astype(target) for k, v in tensors.items()}
    mx.eval(tensors)
    config["torch_dtype"] = dtype_name(target)
    with staging_dir(dst, overwrite, src) as out:
        if fmt == "pt":
            _save_torch(tensors, out / "model.pt")
        else:
            mx.save_safetensors(str(out / "model.safetensors"), tensors, metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(dst)
