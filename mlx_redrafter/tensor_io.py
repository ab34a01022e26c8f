"""Reading checkpoint tensors for the converters: safetensors files, PyTorch pickles (`.bin`,
`.pt`; torch is imported only here, and only when such a file is read) and a Hugging Face
repository's PyTorch weights."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import mlx.core as mx

from .errors import ConvertError


def _import_torch(path: Path):
    try:
        import torch
    except ImportError:
        raise ConvertError(
            f"{path}: reading PyTorch checkpoints needs PyTorch "
            "(pip install 'mlx-redrafter[torch]')"
        ) from None
    return torch


def _torch_to_mx(tensor) -> mx.array:
    import torch

    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        # numpy has no bfloat16; the round trip through float32 is exact.
        return mx.array(tensor.float().numpy()).astype(mx.bfloat16)
    return mx.array(tensor.numpy())


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, Any]:
    import torch

    def is_state_dict(d):
        return isinstance(d, dict) and d and all(isinstance(v, torch.Tensor) for v in d.values())

    if is_state_dict(obj):
        return obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "module"):
            if is_state_dict(obj.get(key)):
                return obj[key]
    raise ConvertError(
        f"{path}: not a state dict (expected a dict of tensors, or one under "
        "'state_dict' or 'model')"
    )


def _load_torch(path: Path) -> dict[str, mx.array]:
    torch = _import_torch(path)
    import pickle

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        what = f" (it pickles {found.group(1)})" if found else ""
        raise ConvertError(
            f"{path}: holds Python objects besides tensors{what}, which safe loading "
            "(torch.load weights_only=True) refuses; re-save it with "
            "torch.save(model.state_dict(), path)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ConvertError(
            f"{path}: cannot read the PyTorch checkpoint (truncated or corrupt?): {first_line(exc)}"
        ) from None
    weights = {}
    for name, tensor in _unwrap_state_dict(obj, path).items():
        try:
            weights[name] = _torch_to_mx(tensor)
        except (TypeError, ValueError, RuntimeError):
            raise ConvertError(
                f"{path}: tensor {name} has unsupported dtype {tensor.dtype}"
            ) from None
    return weights


def first_line(exc: BaseException) -> str:
    """The first line of an error's message, without mlx's "[function]" prefix."""
    # mlx prefixes its messages with the function name: "[load_safetensors] ...".
    text = re.sub(r"^\[\w+\]\s*", "", str(exc).strip())
    return text.splitlines()[0] if text else type(exc).__name__


def read_tensors(path: str | Path) -> dict[str, mx.array]:
    """All tensors of one checkpoint file (.safetensors, or a torch .bin/.pt/.pth pickle)."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            return mx.load(str(path))
        except (RuntimeError, ValueError, OSError) as exc:
            raise ConvertError(
                f"{path}: cannot read the safetensors file (truncated or corrupt?): "
                f"{first_line(exc)}"
            ) from None
    if path.suffix in (".bin", ".pt", ".pth"):
        return _load_torch(path)
    raise ConvertError(f"{path}: unknown weight format (expected .safetensors, .bin or .pt)")


def fetch_torch_weights(repo_id: str) -> Path:
    """A Hugging Face repository's PyTorch weight files, through the hub's cache."""
    from huggingface_hub import constants, snapshot_download

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    offline = bool(constants.HF_HUB_OFFLINE) or env in ("1", "on", "yes", "true")
    try:
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["pytorch_model*.bin", "pytorch_model.bin.index.json"],
                local_files_only=offline,
            )
        )
    except Exception as exc:  # huggingface_hub raises many types, all meaning "not fetched"
        raise ConvertError(
            f"{repo_id}: cannot fetch its PyTorch weights from Hugging Face: {first_line(exc)}"
        ) from None
