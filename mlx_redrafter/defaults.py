"""One home for the defaults: where models and drafters live, the shipped drafter, the beam
shape, and the store of what `mlx-redrafter tune` measured (the tuned beam shape and the
verify-cost curve, per device and model). The CLI, `ChatSession` and `stream_generate` all
ask here.

Home (`home_dir()`): `$MLX_REDRAFTER_HOME` when set; else the repository's `weights/` when
running from a source checkout; else `$XDG_DATA_HOME/mlx-redrafter` (default
`~/.local/share/mlx-redrafter`). The default model is built under `<home>/models/`, and a
drafter directory named like the shipped one under `<home>/` overrides the shipped one.
"""

from __future__ import annotations

import json
import operator
import os
from pathlib import Path

from .env import device_name, fast_path

# (beam width, beam length incl. the root token): the best measured on a 2-core x86 CPU with
# the shipped drafter; `mlx-redrafter tune` stores a better one per device and model.
DEFAULT_BEAM = (1, 3)
# New tokens per answer when none is given: `generate`, `chat`, `serve`, `stream_generate`
# and `ChatSession` all use this one value.
DEFAULT_MAX_TOKENS = 512

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_DRAFTER_NAME = "smollm2-135m-instruct-drafter"


def _source_checkout() -> bool:
    """Whether this package runs from a clone of the repository (editable or in place)."""
    return (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "weights").is_dir()


def home_dir() -> Path:
    """Where the default model is built and user drafters are looked up (see the module doc)."""
    explicit = os.environ.get("MLX_REDRAFTER_HOME")
    if explicit:
        return Path(explicit).expanduser()
    if _source_checkout():
        return REPO_ROOT / "weights"
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share") / "mlx-redrafter"


def default_model_dir() -> Path:
    """Where the default model's MLX directory lives (built by `mlx-redrafter setup`):
    `$MLX_REDRAFTER_DEFAULT_MODEL` if set, else `<home>/models/SmolLM2-135M-Instruct`."""
    explicit = os.environ.get("MLX_REDRAFTER_DEFAULT_MODEL")
    if explicit:
        return Path(explicit).expanduser()
    return home_dir() / "models" / DEFAULT_MODEL_NAME


def shipped_drafter_dir() -> Path:
    """The drafter shipped for the default model: `weights/` in a checkout, the package's
    `weights/` (package data) in an installed wheel."""
    installed = PACKAGE_DIR / "weights" / DEFAULT_DRAFTER_NAME
    if installed.is_dir():
        return installed
    return REPO_ROOT / "weights" / DEFAULT_DRAFTER_NAME


def default_drafter_dir() -> Path:
    """The default model's drafter: `<home>/<name>` if that directory exists, else the shipped
    one (the path may not exist when neither does)."""
    own = home_dir() / DEFAULT_DRAFTER_NAME
    return own if own.is_dir() else shipped_drafter_dir()


def _positive_int(value, low: int):
    try:
        number = operator.index(value)  # int, numpy integers; not floats or strings
    except TypeError:
        return None
    return None if isinstance(value, bool) or number < low else number


def check_beam(beam_width, beam_length) -> tuple[int, int]:
    """(W, L) if W >= 1 and L >= 2 (L counts the root token), else a ValueError naming it."""
    width, length = _positive_int(beam_width, 1), _positive_int(beam_length, 2)
    if width is None:
        raise ValueError(f"beam width (-W) must be an integer >= 1, got {beam_width!r}")
    if length is None:
        raise ValueError(
            f"beam length (-L, counting the root token) must be an integer >= 2, "
            f"got {beam_length!r}"
        )
    return width, length


def resolve_beam(model_path, beam_width: int | None, beam_length: int | None) -> tuple[int, int]:
    """The beam shape to use: each given value as is (validated), the others from the shape
    `mlx-redrafter tune` stored for this device and model, else from DEFAULT_BEAM."""
    if beam_width is None or beam_length is None:
        try:
            stored = tuned_beam(model_path) if model_path is not None else None
            stored = check_beam(*stored) if stored else None
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            stored = None  # an unreadable or foreign tuned.json is no reason to fail
        width, length = stored or DEFAULT_BEAM
        beam_width = width if beam_width is None else beam_width
        beam_length = length if beam_length is None else beam_length
    return check_beam(beam_width, beam_length)


# ---------------------------------------------------------------------------------------------
# What `mlx-redrafter tune` stored, per device and model (a JSON file in the config directory)


def config_path() -> Path:
    base = os.environ.get("MLX_REDRAFTER_CONFIG_DIR") or os.path.join(
        os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "mlx-redrafter"
    )
    return Path(base) / "tuned.json"


def _key(model_path) -> str:
    return f"{device_name()}|{Path(model_path).resolve()}"


SAMPLED = "sampled_"  # key prefix of the shape `tune --temp` stored for sampled decoding


def tuned_beam(model_path, sampled: bool = False) -> tuple[int, int] | None:
    """The shape `tune` stored for this device and model (with `sampled`, the one a sampled
    sweep stored), or None."""
    entry = _entry(model_path)
    prefix = SAMPLED if sampled else ""
    width, length = f"{prefix}beam_width", f"{prefix}beam_length"
    if not entry or width not in entry or length not in entry:
        return None  # nothing stored, or only a verify-cost curve
    return int(entry[width]), int(entry[length])


def save_tuned_beam(
    model_path,
    beam_width: int,
    beam_length: int,
    extra: dict | None = None,
    sampled: bool = False,
):
    """Store a tuned shape with its figures (`extra`). A greedy sweep's shape replaces the
    entry but keeps a sampled sweep's shape; a sampled one is stored beside the rest."""
    if sampled:
        fields = {f"{SAMPLED}beam_width": beam_width, f"{SAMPLED}beam_length": beam_length}
        return _store(model_path, {**fields, "sampled": extra or {}}, merge=True)
    old = _entry(model_path) or {}
    kept = {k: v for k, v in old.items() if k.startswith(SAMPLED) or k == "sampled"}
    return _store(
        model_path, {"beam_width": beam_width, "beam_length": beam_length, **(extra or {}), **kept}
    )


def save_cost_curve(model_path, curve: list[dict]):
    """Store a `verify_cost_curve` result (its t(n)/t(1) ratios) for this device and model,
    keeping the entry's other fields (the tuned beam)."""
    ratios = [round(float(c["ratio"]), 4) for c in sorted(curve, key=lambda c: c["n"])]
    if [c["n"] for c in sorted(curve, key=lambda c: c["n"])] != list(range(1, len(ratios) + 1)):
        raise ValueError("a verify-cost curve must cover n = 1, 2, ... without gaps")
    return _store(model_path, {"verify_cost": ratios, "fast_path": fast_path()}, merge=True)


def load_cost_curve(model_path) -> list[float] | None:
    """t(n)/t(1) for n = 1..N as `tune` measured it for this device and model, or None.

    A curve measured with the other setting of MLX_REDRAFTER_FAST (fused, compiled path on or
    off) is not this run's cost, and gives None too.
    """
    entry = _entry(model_path)
    curve = entry.get("verify_cost") if entry else None
    if not curve or entry.get("fast_path", False) != fast_path():
        return None
    try:
        ratios = [float(r) for r in curve]
    except (TypeError, ValueError):
        return None
    return ratios if all(r > 0 for r in ratios) else None


def _entry(model_path) -> dict | None:
    path = config_path()
    if model_path is None or not path.exists():
        return None
    try:
        entry = json.loads(path.read_text()).get(_key(model_path))
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) else None


def _store(model_path, fields: dict, merge: bool = False):
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except ValueError:
            data = {}
    key = _key(model_path)
    data[key] = {**(data.get(key, {}) if merge else {}), **fields}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
    return path


def summary() -> dict:
    """Where the default model and drafter are, and the tuned beam: for `mlx-redrafter info`."""
    model_dir, drafter_dir = default_model_dir(), default_drafter_dir()
    tuned, sampled = tuned_beam(model_dir), tuned_beam(model_dir, sampled=True)
    return {
        "default_model": f"{model_dir}"
        + ("" if model_dir.exists() else " (not built: run `mlx-redrafter setup`)"),
        "default_drafter": str(drafter_dir) if drafter_dir.exists() else "none",
        "tuned_beam": "W={}, L={}".format(*tuned) if tuned else "not tuned",
        "tuned_sampled_beam": "W={}, L={}".format(*sampled) if sampled else "not tuned",
    }
