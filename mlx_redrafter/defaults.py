"""Shipped defaults: the drafter trained for the default model, and the default beam shape."""

from __future__ import annotations

from pathlib import Path

# (beam width, beam length incl. the root token); `mlx-redrafter tune` finds a better one.
DEFAULT_BEAM = (1, 3)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DRAFTER_NAME = "smollm2-135m-instruct-drafter"


def default_drafter_dir() -> Path:
    """The drafter shipped in weights/ for the default model (may not exist)."""
    return REPO_ROOT / "weights" / DEFAULT_DRAFTER_NAME
