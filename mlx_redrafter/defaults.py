"""One home for the defaults: where models and drafters live, the shipped drafter, the beam
shape and the compute dtype. The CLI, `ChatSession` and `stream_generate` all ask here.

Home (`home_dir()`): `$MLX_REDRAFTER_HOME` when set; else the repository's `weights/` when
running from a source checkout; else `$XDG_DATA_HOME/mlx-redrafter` (default
`~/.local/share/mlx-redrafter`). The default model is built under `<home>/models/`, and a
drafter directory named like the shipped one under `<home>/` overrides the shipped one.
"""

from __future__ import annotations

import operator
import os
from pathlib import Path

# (beam width, beam length incl. the root token): the best measured on a 2-core x86 CPU with
# the shipped drafter; `mlx-redrafter tune` stores a better one per device and model.
DEFAULT_BEAM = (1, 3)

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
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
        from .tuning import tuned_beam

        try:
            stored = tuned_beam(model_path) if model_path is not None else None
            stored = check_beam(*stored) if stored else None
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            stored = None  # an unreadable or foreign tuned.json is no reason to fail
        width, length = stored or DEFAULT_BEAM
        beam_width = width if beam_width is None else beam_width
        beam_length = length if beam_length is None else beam_length
    return check_beam(beam_width, beam_length)


def default_dtype() -> str:
    """float16 on Metal (fast there); float32 elsewhere (float16 is slow on x86 CPUs)."""
    import mlx.core as mx

    return "float16" if mx.metal.is_available() else "float32"


def compute_dtype(model):
    """The dtype a model computes in: that of its final norm's weight (the embedding may be
    quantized), or None when it cannot be told."""
    norm = getattr(getattr(model, "model", None), "norm", None)
    weight = getattr(norm, "weight", None)
    return getattr(weight, "dtype", None)
