"""Entry file for `python cli.py ...` from a source checkout; the app lives in mlx_redrafter.cli."""

from mlx_redrafter.cli import main

if __name__ == "__main__":
    main()
