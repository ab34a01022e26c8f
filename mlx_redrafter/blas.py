"""Linux: put a real BLAS under MLX's CPU backend before `mlx` is imported.

MLX's Linux CPU wheel links a reference (netlib-style) BLAS; an fp32 1024x1024 matmul takes
~400-900 ms with it and ~12-16 ms with OpenBLAS. Loading OpenBLAS with RTLD_GLOBAL before
`mlx.core` is imported makes the dynamic linker resolve MLX's BLAS symbols to it.

Opt out with MLX_REDRAFTER_BLAS=bundled; point at a library with MLX_REDRAFTER_BLAS=/path.so.
This module must not import mlx.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import warnings

ENV_VAR = "MLX_REDRAFTER_BLAS"

# Candidate libraries, most preferred first (Debian/Ubuntu multiarch paths, then generic).
_CANDIDATES = [
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
]

_state: dict[str, str | None] = {"blas": None, "path": None}


def _arch() -> str:
    return os.uname().machine if hasattr(os, "uname") else ""


def _find_openblas() -> str | None:
    arch = _arch()
    for pattern in _CANDIDATES:
        path = pattern.format(arch=arch)
        if os.path.exists(path):
            return path
    # A pip-installed scipy-openblas wheel also works.
    for site in sys.path:
        hits = glob.glob(os.path.join(site, "scipy_openblas*", "lib", "libscipy_openblas*.so"))
        if hits:
            return hits[0]
    return None


def ensure_blas() -> str:
    """Load a real BLAS if MLX will run on the Linux CPU backend. Returns a description.

    Idempotent. Must run before the first `import mlx.core` to have any effect.
    """
    if _state["blas"] is not None:
        return _state["blas"]
    if not sys.platform.startswith("linux"):
        _state["blas"] = "Accelerate" if sys.platform == "darwin" else "bundled"
        return _state["blas"]

    choice = os.environ.get(ENV_VAR, "").strip()
    if choice.lower() in ("bundled", "0", "off", "none", "reference"):
        _state["blas"] = "bundled reference BLAS (MLX_REDRAFTER_BLAS=bundled)"
        return _state["blas"]

    if "mlx.core" in sys.modules:
        # Too late to interpose; say what we are running on as best we can.
        _state["blas"] = "unknown (mlx was imported before mlx_redrafter)"
        return _state["blas"]

    path = choice if choice else _find_openblas()
    if path is None:
        _state["blas"] = "bundled reference BLAS"
        warnings.warn(
            "mlx-redrafter: no OpenBLAS found; MLX's CPU matmuls will be ~30x slower. "
            "Install it with `apt-get install libopenblas0-pthread` (Debian/Ubuntu) or "
            f"set {ENV_VAR}=/path/to/libopenblas.so.",
            RuntimeWarning,
            stacklevel=2,
        )
        return _state["blas"]
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        _state["blas"] = "bundled reference BLAS"
        warnings.warn(
            f"mlx-redrafter: could not load BLAS library {path}: {exc}",
            RuntimeWarning,
            stacklevel=2,
        )
        return _state["blas"]
    _state["blas"] = f"OpenBLAS ({path})"
    _state["path"] = path
    return _state["blas"]


def blas_in_use() -> str:
    """The BLAS that MLX's CPU backend uses in this process."""
    return _state["blas"] or ensure_blas()
