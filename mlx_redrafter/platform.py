"""What this process runs on: device, default dtype, BLAS, versions."""

from __future__ import annotations

import platform as _platform

from .blas import blas_in_use
from .loading import default_dtype


def device_name() -> str:
    """A human description of the MLX default device, e.g. 'cpu (x86_64, 2 cores)'."""
    import os

    import mlx.core as mx

    dev = mx.default_device()
    if dev.type == mx.gpu:
        try:
            name = mx.device_info().get("device_name", "")
        except Exception:  # older mlx or a backend without device_info
            name = ""
        backend = "metal" if mx.metal.is_available() else "cuda"
        return f"gpu ({backend}{', ' + name if name else ''})"
    return f"cpu ({_platform.machine()}, {os.cpu_count()} cores)"


def platform_info() -> dict:
    import mlx.core as mx

    from .defaults import default_drafter_dir
    from .loading import default_model_dir
    from .tuning import tuned_beam

    try:
        import mlx_lm

        mlx_lm_version = mlx_lm.__version__
    except Exception:
        mlx_lm_version = "not installed"
    model_dir = default_model_dir()
    drafter_dir = default_drafter_dir()
    return {
        "mlx_redrafter": __import__("mlx_redrafter").__version__,
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm_version,
        "python": _platform.python_version(),
        "device": device_name(),
        "default_dtype": default_dtype(),
        "blas": blas_in_use(),
        "default_model": f"{model_dir}"
        + ("" if model_dir.exists() else " (not built: run `mlx-redrafter setup`)"),
        "default_drafter": str(drafter_dir) if drafter_dir and drafter_dir.exists() else "none",
        "tuned_beam": "W={}, L={}".format(*tuned_beam(model_dir))
        if tuned_beam(model_dir)
        else "not tuned",
    }


def matmul_ms(size: int = 1024, repeats: int = 10) -> float:
    """Median time of one float32 (size x size) @ (size x size) matmul in this process, in ms."""
    import time

    import mlx.core as mx

    a = mx.random.normal((size, size))
    b = mx.random.normal((size, size))
    mx.eval(a, b, a @ b)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - t)
    times.sort()
    return 1000 * times[len(times) // 2]


def compare_blas(size: int = 1024, repeats: int = 10) -> list[dict]:
    """Matmul time with each BLAS, each measured in a fresh process (the BLAS is per process)."""
    import json
    import os
    import subprocess
    import sys

    code = (
        "import json, mlx_redrafter.platform as p; "
        f"print(json.dumps({{'blas': p.blas_in_use(), 'ms': p.matmul_ms({size}, {repeats})}}))"
    )
    rows = []
    for choice in ("bundled", ""):
        env = dict(os.environ)
        env.pop("MLX_REDRAFTER_BLAS", None)
        if choice:
            env["MLX_REDRAFTER_BLAS"] = choice
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["label"] = "bundled" if choice else row["blas"].split(" (")[0]
        rows.append({"size": size, **row})
    return rows
