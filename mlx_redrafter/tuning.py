"""Per-device, per-model tuned beam shapes, stored in the user's config directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .defaults import DEFAULT_BEAM

__all__ = ["DEFAULT_BEAM", "config_path", "tuned_beam", "save_tuned_beam"]


def config_path() -> Path:
    base = os.environ.get("MLX_REDRAFTER_CONFIG_DIR") or os.path.join(
        os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "mlx-redrafter"
    )
    return Path(base) / "tuned.json"


def _key(model_path) -> str:
    from .platform import device_name

    return f"{device_name()}|{Path(model_path).resolve()}"


def tuned_beam(model_path) -> tuple[int, int] | None:
    path = config_path()
    if model_path is None or not path.exists():
        return None
    try:
        entry = json.loads(path.read_text()).get(_key(model_path))
    except (OSError, ValueError):
        return None
    if not entry:
        return None
    return int(entry["beam_width"]), int(entry["beam_length"])


def save_tuned_beam(model_path, beam_width: int, beam_length: int, extra: dict | None = None):
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except ValueError:
            data = {}
    data[_key(model_path)] = {"beam_width": beam_width, "beam_length": beam_length, **(extra or {})}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
    return path
