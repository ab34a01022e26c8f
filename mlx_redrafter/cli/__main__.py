"""`python -m mlx_redrafter.cli ...`: the same as the `mlx-redrafter` command."""

from mlx_redrafter.cli import main

main()
