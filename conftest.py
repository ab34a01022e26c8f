# Import the package before any test imports mlx, so its BLAS loader runs first (Linux CPU).
import mlx_redrafter  # noqa: F401
