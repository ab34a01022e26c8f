"""PyTorch, safetensors and GGUF checkpoints -> MLX directories, for drafters and base models.

Both converters read the source, check it against the architecture it claims, and write the
result into a temporary sibling of DST that is renamed at the end: a failed conversion leaves
nothing behind.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
from tqdm import tqdm

from .drafter import Drafter, DrafterArgs, quantize_drafter, save_drafter
from .env import DTYPES, parse_dtype
from .errors import ConvertError, DrafterError, read_json_object
from .gguf import convert_gguf
from .loading import check_weights, load_config, resolve_model_path
from .model import SUPPORTED_MODEL_TYPES, Model, ModelArgs, UnsupportedModelError
from .tensor_io import fetch_torch_weights, read_tensors

Q_BITS = (2, 3, 4, 5, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)

DRAFTER_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)
# Prefixes that wrappers (DDP, TensorRT-LLM's ReDrafter model) put before the drafter's names.
_WRAPPER_PREFIXES = ("module.", "drafter.")


def _cast(weights: dict[str, mx.array], dtype: mx.Dtype | None) -> dict[str, mx.array]:
    if dtype is None:
        return weights
    return {
        k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()
    }


def _dtype(name: str | None) -> mx.Dtype | None:
    return None if name is None else parse_dtype(name, "dtype", ConvertError)


def _check_quantization(bits: int, group_size: int) -> None:
    if bits not in Q_BITS:
        raise ConvertError(f"q_bits must be one of {Q_BITS}, got {bits}")
    if group_size not in Q_GROUP_SIZES:
        raise ConvertError(f"q_group_size must be one of {Q_GROUP_SIZES}, got {group_size}")


def _names(keys: Iterable[str], limit: int = 4) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


# ---------------------------------------------------------------------------------------------
# Output directory: staged next to DST, renamed at the end


@contextlib.contextmanager
def staging_dir(dst: str | Path, overwrite: bool = False, src: str | Path | None = None):
    """Yield an empty temporary sibling of `dst`; on success it becomes `dst`, else it is removed."""
    dst = Path(dst).expanduser()
    if src is not None and Path(src).expanduser().resolve() == dst.resolve():
        raise ConvertError(f"{dst}: the output directory must differ from the source")
    if dst.exists():
        if not dst.is_dir():
            raise ConvertError(f"{dst}: exists and is not a directory")
        if any(dst.iterdir()) and not overwrite:
            raise ConvertError(
                f"{dst}: exists and is not empty (--overwrite / overwrite=True replaces it)"
            )
    dst.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = dst.parent / f".{dst.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = dst.parent / f".{dst.name}.old-{tag}"
    with _signals_deferred():  # Ctrl-C or SIGTERM between the renames would lose both
        if dst.exists():
            dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT and SIGTERM until the block ends (they are then delivered as usual)."""
    import signal

    held = {signal.SIGINT, signal.SIGTERM}
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    except (AttributeError, OSError, ValueError):  # no POSIX signal masks here
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _progress(items, progress: bool, **kwargs):
    # disable=None: tqdm draws only when stderr is a terminal.
    return tqdm(items, disable=None if progress else True, leave=False, **kwargs)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """mlx-lm's helpers print to stdout; the library never does."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


# ---------------------------------------------------------------------------------------------
# Base models


def _weight_files(src: Path) -> list[Path]:
    """The checkpoint files of a Hugging Face directory, safetensors before PyTorch pickles."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = src / index_name
        if index_path.exists():
            weight_map = read_json_object(index_path, ConvertError).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConvertError(f"{index_path}: has no weight_map")
            files = [src / name for name in sorted(set(weight_map.values()))]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise ConvertError(f"{index_path}: names missing shard files: {_names(absent)}")
            return files
    # Named patterns only: a trainer's directory also holds training_args.bin, adapters, ...
    for pattern in ("model.safetensors", "model-*.safetensors", "model*.safetensors"):
        files = sorted(src.glob(pattern))
        if files:
            return files
    for pattern in ("pytorch_model.bin", "pytorch_model-*.bin"):
        files = sorted(src.glob(pattern))
        if files:
            return files
    found = sorted(p.name for p in src.iterdir() if p.is_file())
    raise ConvertError(
        f"{src}: no weights found (expected model*.safetensors or pytorch_model*.bin; "
        f"found: {_names(found) or 'nothing'})"
    )


def _resolve_model_source(src: str | Path) -> Path:
    """A local path as it is; a Hugging Face id through the hub's cache (offline-capable)."""
    path = Path(src).expanduser()
    if path.exists():
        return path
    snapshot = Path(resolve_model_path(str(src)))
    if not any(snapshot.glob("*.safetensors")):
        # The loader fetches safetensors only; repositories like vicuna-7b-v1.3 ship .bin.
        snapshot = fetch_torch_weights(str(src))
    return snapshot


def _config_dtype(config: dict[str, Any]) -> mx.Dtype | None:
    name = config.get("torch_dtype") or config.get("dtype")
    return DTYPES.get(name) if isinstance(name, str) else None


def _model_args(config: dict[str, Any], config_path: Path) -> ModelArgs:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConvertError(
            f"{config_path}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if "quantization" in config or "quantization_config" in config:
        raise ConvertError(
            f"{config_path}: the checkpoint is already quantized; convert from the "
            "unquantized checkpoint (or load an MLX directory as it is)"
        )
    try:
        return ModelArgs.from_dict(config)
    except UnsupportedModelError as exc:
        raise ConvertError(f"{config_path}: {exc}") from None
    except TypeError as exc:
        raise ConvertError(f"{config_path}: incomplete model config: {exc}") from None


def _quantize_model(
    model: Model, config: dict[str, Any], bits: int, group_size: int
) -> dict[str, Any]:
    from mlx_lm.utils import quantize_model

    with _quiet():
        _, config = quantize_model(model, config, group_size, bits)
    return config


def _save_model_dir(out: Path, model: Model, config: dict[str, Any]) -> None:
    from mlx_lm.utils import save_config, save_model

    save_model(out, model, donate_model=True)
    save_config(config, out / "config.json")


def _copy_tokenizer(src: Path, out: Path) -> None:
    if not any((src / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise ConvertError(
            f"{src}: no tokenizer (tokenizer.json or tokenizer.model); put the model's "
            "tokenizer files beside its weights"
        )
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)


def _convert_hf_dir(
    src: Path,
    out: Path,
    dtype: mx.Dtype | None,
    quantize: bool,
    q_bits: int,
    q_group_size: int,
    progress: bool,
) -> None:
    config_path = src / "config.json"
    if not config_path.is_file():
        found = sorted(p.name for p in src.iterdir())
        raise ConvertError(
            f"{src}: not a Hugging Face checkpoint directory (no config.json; found: "
            f"{_names(found) or 'nothing'})"
        )
    config = read_json_object(config_path, ConvertError)
    args = _model_args(config, config_path)
    files = _weight_files(src)
    _copy_tokenizer(src, out)
    dtype = dtype or _config_dtype(config)

    weights: dict[str, mx.array] = {}
    origin: dict[str, Path] = {}
    for path in _progress(files, progress, desc="reading weights", unit="file"):
        part = _cast(read_tensors(path), dtype)
        for key in part:
            if key in origin:
                raise ConvertError(f"{path}: tensor {key} also appears in {origin[key].name}")
            origin[key] = path
        mx.eval(list(part.values()))
        weights.update(part)

    model = Model(args)
    weights = model.sanitize(weights)
    check_weights(model, weights, src, ConvertError, origin=origin)
    model.load_weights(list(weights.items()))
    del weights
    if dtype is not None:
        name = next(k for k, v in DTYPES.items() if v == dtype)
        config["torch_dtype" if "torch_dtype" in config else "dtype"] = name
    if quantize:
        config = _quantize_model(model, config, q_bits, q_group_size)
    _save_model_dir(out, model, config)


def _convert_gguf(
    src: Path,
    out: Path,
    dtype: str | None,
    quantize: bool,
    q_bits: int,
    q_group_size: int,
) -> None:
    # convert_gguf stages and renames its own output; give it a fresh path inside ours.
    inner = convert_gguf(src, out / "gguf", dtype or "float32")
    for path in inner.iterdir():
        path.rename(out / path.name)
    inner.rmdir()
    if quantize:
        config = read_json_object(out / "config.json", ConvertError)
        model = Model(ModelArgs.from_dict(config))
        weights = {}
        for path in sorted(out.glob("model*.safetensors")):
            part = mx.load(str(path))
            mx.eval(list(part.values()))  # read now: the file is replaced below
            weights.update(part)
            path.unlink()
        (out / "model.safetensors.index.json").unlink(missing_ok=True)
        model.load_weights(list(model.sanitize(weights).items()))
        config = _quantize_model(model, config, q_bits, q_group_size)
        _save_model_dir(out, model, config)


def convert_model(
    src: str | Path,
    dst: str | Path,
    dtype: str | None = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert a base model into an MLX directory that mlx-redrafter and mlx-lm both load.

    src: a Hugging Face checkpoint directory (`model*.safetensors` or `pytorch_model*.bin`,
    with or without an index), a `.gguf` file, or a Hugging Face id (resolved through the
    local cache). dtype: float32 | float16 | bfloat16, default the checkpoint's. quantize:
    affine `q_bits`-bit weights in groups of `q_group_size`, recorded in config.json the way
    mlx-lm writes it. Returns the output directory.
    """
    target = _dtype(dtype)
    if quantize:
        _check_quantization(q_bits, q_group_size)
    src_path = _resolve_model_source(src)
    with staging_dir(dst, overwrite, src_path) as out:
        if src_path.is_dir():
            _convert_hf_dir(src_path, out, target, quantize, q_bits, q_group_size, progress)
        elif src_path.suffix.lower() == ".gguf":
            _convert_gguf(src_path, out, dtype, quantize, q_bits, q_group_size)
        else:
            raise ConvertError(
                f"{src_path}: unknown model format (expected a Hugging Face checkpoint "
                "directory, a .gguf file or a Hugging Face id)"
            )
    return Path(dst)


# ---------------------------------------------------------------------------------------------
# Drafters

# Names other trainers give Apple's modules (TensorRT-LLM's converter accepts all of them).
_DRAFTER_RENAMES = (
    (re.compile(r"input_projs\.(weight|bias)"), r"input_proj.\1"),
    (re.compile(r"lm_heads\.(\d+)\.(.+)"), r"lm_head.\1.\2"),
    # The head saved as element 0 of an outer nn.Sequential: 0.{i}.linear.*, 0.{N}.weight.
    (re.compile(r"0\.(\d+)\.(linear\.weight|linear\.bias|weight)"), r"lm_head.\1.\2"),
)


def drafter_key(name: str) -> str:
    """Apple's name for a drafter tensor saved under a wrapper prefix or a trainer's variant."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    for pattern, replacement in _DRAFTER_RENAMES:
        if pattern.fullmatch(name):
            return pattern.sub(replacement, name)
    return name


def normalize_drafter_keys(weights: dict[str, mx.array], source: Path) -> dict[str, mx.array]:
    """Rename every tensor to Apple's layout; two tensors landing on one name is an error."""
    out: dict[str, mx.array] = {}
    seen: dict[str, str] = {}
    for name, value in weights.items():
        key = drafter_key(name)
        if key in seen:
            raise ConvertError(f"{source}: both {seen[key]} and {name} map to {key}")
        seen[key] = name
        out[key] = value
    return out


def _drafter_weights_file(src: Path) -> Path:
    for name in DRAFTER_WEIGHT_FILES:
        if (src / name).is_file():
            return src / name
    found = sorted(p.name for p in src.iterdir()) if src.is_dir() else []
    raise ConvertError(
        f"{src}: no drafter weights (expected one of {', '.join(DRAFTER_WEIGHT_FILES)}; "
        f"found: {_names(found) or 'nothing'})"
    )


def _infer_drafter_config(config: dict[str, Any], weights: dict[str, mx.array]) -> dict[str, Any]:
    """Fill what a trainer's config.json left out from the tensors (never override it)."""
    config = dict(config)
    config.setdefault("model_type", "recurrent_drafting_drafter")
    if "num_draft_layers" not in config:
        blocks = {
            int(m.group(1)) for k in weights if (m := re.match(r"lm_head\.(\d+)\.linear\.", k))
        }
        config["num_draft_layers"] = len(blocks)
    n = config["num_draft_layers"]
    final = weights.get(f"lm_head.{n}.weight") if isinstance(n, int) else None
    if "rnn" not in config:
        config["rnn"] = "rnn_w.weight" in weights
    if "hidden_size" not in config and "rnn_u.weight" in weights:
        config["hidden_size"] = weights["rnn_u.weight"].shape[0]
    if final is not None and final.ndim == 2:
        config.setdefault("exit_dim", final.shape[1])
        if not config.get("draft_vocab_ids"):
            config.setdefault("vocab_size", final.shape[0])
    if "emb_norm.weight" in weights:
        config.setdefault("emb_norm", True)
    return config


def _read_base_args(base) -> tuple[dict[str, Any], str]:
    """(config, description) of the base model a drafter is meant for."""
    if hasattr(base, "args"):
        args = base.args
        return {"hidden_size": args.hidden_size, "vocab_size": args.vocab_size}, "the base model"
    path = resolve_model_path(base)
    config = load_config(path)
    return config, f"base model {path / 'config.json'}"


def check_drafter_base(args, base, drafter_source: Path | str) -> None:
    """Raise ConvertError unless the drafter fits the base model (hidden size, vocabulary,
    and the width its first layer reads: 2 * hidden_size, into input_proj or the ResBlocks)."""
    config, where = _read_base_args(base)
    hidden, vocab = config.get("hidden_size"), config.get("vocab_size")
    if args.hidden_size != hidden:
        first = "input_proj" if args.exit_dim != 2 * args.hidden_size else "lm_head.0"
        raise ConvertError(
            f"{drafter_source}: drafter hidden_size {args.hidden_size} ([context; state] = "
            f"{2 * args.hidden_size} features into {first}) does not match {where} "
            f"hidden_size {hidden}"
        )
    if args.vocab_size != vocab:
        raise ConvertError(
            f"{drafter_source}: drafter vocab_size {args.vocab_size} does not match "
            f"{where} vocab_size {vocab}"
        )


def convert_drafter(
    src: str | Path,
    dst: str | Path,
    dtype: str | None = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    base=None,
    overwrite: bool = False,
) -> Path:
    """Convert a PyTorch ReDrafter drafter into the directory `load_drafter` reads.

    src: a directory with config.json and one of model.safetensors, pytorch_model.bin or
    model.pt, with Apple's tensor names or a TensorRT-LLM-era variant (input_projs.*,
    lm_heads.{i}.*, 0.{i}.*; a leading module./drafter. is dropped). dtype: float32 | float16
    | bfloat16, default the checkpoint's. quantize: `q_bits`-bit weights in groups of
    `q_group_size` for every Linear whose input width allows it. base: a model (path, HF id
    or loaded model) whose hidden size and vocabulary the drafter must match.
    """
    src = Path(src).expanduser()
    target = _dtype(dtype)
    if quantize:
        _check_quantization(q_bits, q_group_size)
    if not src.is_dir():
        raise ConvertError(f"{src}: not a drafter directory (config.json + model weights)")
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ConvertError(f"{src}: no config.json")
    weights_path = _drafter_weights_file(src)
    config = read_json_object(config_path, ConvertError)

    with staging_dir(dst, overwrite, src) as out:
        weights = normalize_drafter_keys(read_tensors(weights_path), weights_path)
        try:
            args = DrafterArgs.from_dict(_infer_drafter_config(config, weights))
        except (DrafterError, TypeError) as exc:
            raise ConvertError(f"{config_path}: {exc}") from None
        if base is not None:
            check_drafter_base(args, base, src)
        h, e = args.hidden_size, args.exit_dim
        has_proj = any(k.startswith("input_proj.") for k in weights)
        if has_proj and e == 2 * h:
            raise ConvertError(
                f"{weights_path}: has input_proj, but {config_path.name} gives exit_dim {e} "
                f"= 2*hidden_size; Apple's drafter has input_proj only when they differ"
            )
        if not has_proj and e != 2 * h:
            raise ConvertError(
                f"{weights_path}: no input_proj, which exit_dim {e} != 2*hidden_size "
                f"{2 * h} ({config_path.name}) requires"
            )
        drafter = Drafter(args)
        check_weights(drafter, weights, weights_path, ConvertError)
        drafter.load_weights(list(weights.items()))
        if target is not None:
            drafter.set_dtype(target)
        if quantize:
            quantize_drafter(drafter, group_size=q_group_size, bits=q_bits)
        mx.eval(drafter.parameters())
        save_drafter(drafter, out)
    return Path(dst)
