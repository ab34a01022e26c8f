"""`mlx-redrafter convert drafter|model`: PyTorch and GGUF checkpoints -> MLX directories."""

from __future__ import annotations

from typing import Annotated

import typer

from mlx_redrafter.cli.common import fail, friendly_errors
from mlx_redrafter.convert import convert_drafter, convert_model
from mlx_redrafter.export import FORMATS, export_drafter

app = typer.Typer(
    no_args_is_help=True,
    help="Convert PyTorch and GGUF checkpoints into MLX directories.",
)

QBits = Annotated[int, typer.Option("--q-bits", help="Bits per weight (4 or 8).")]
QGroupSize = Annotated[int, typer.Option("--q-group-size", help="32, 64 or 128.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output.")]


@app.command("drafter")
@friendly_errors
def convert_drafter_command(
    src: Annotated[
        str,
        typer.Argument(
            help="Drafter directory: config.json + model.safetensors | pytorch_model.bin | "
            "model.pt (with --to apple: one of ours)."
        ),
    ],
    output: Annotated[str, typer.Option("--output", "-o", help="Output drafter directory.")],
    dtype: Annotated[
        str | None, typer.Option(help="float32, float16 or bfloat16 (default: the checkpoint's).")
    ] = None,
    quantize: Annotated[
        bool, typer.Option("--quantize", "-q", help="Quantize the Linear layers.")
    ] = False,
    q_bits: QBits = 4,
    q_group_size: QGroupSize = 64,
    base: Annotated[
        str | None,
        typer.Option(
            "--base", "-m", help="Check it fits this base model (directory, HF id or GGUF)."
        ),
    ] = None,
    overwrite: Overwrite = False,
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help="mlx: a PyTorch drafter into ours; apple: ours into Apple's PyTorch layout, "
            "the one TensorRT-LLM's ReDrafter converter reads.",
        ),
    ] = "mlx",
    fmt: Annotated[
        str, typer.Option("--format", help=f"With --to apple: {' or '.join(FORMATS)}.")
    ] = "safetensors",
):
    """A PyTorch ReDrafter drafter (Apple's recipe or TensorRT-LLM names) -> MLX drafter dir;
    with --to apple, the other way."""
    if to == "apple":
        if quantize or base:
            fail("--quantize and --base apply to --to mlx only")
        out = export_drafter(src, output, dtype=dtype, fmt=fmt, overwrite=overwrite)
        typer.echo(f"drafter written to {out} (Apple's layout, for TensorRT-LLM)")
        return
    if to != "mlx":
        fail(f"--to takes mlx or apple, got {to!r}")
    out = convert_drafter(
        src,
        output,
        dtype=dtype,
        quantize=quantize,
        q_bits=q_bits,
        q_group_size=q_group_size,
        base=base,
        overwrite=overwrite,
    )
    typer.echo(f"drafter written to {out}")


@app.command("model")
@friendly_errors
def convert_model_command(
    src: Annotated[
        str,
        typer.Argument(
            help="HF checkpoint directory (.bin or .safetensors), a .gguf file or an HF id."
        ),
    ],
    output: Annotated[str, typer.Option("--output", "-o", help="Output model directory.")],
    dtype: Annotated[
        str | None,
        typer.Option(
            help="float32, float16 or bfloat16 (default: the checkpoint's; float32 for GGUF)."
        ),
    ] = None,
    quantize: Annotated[
        bool, typer.Option("--quantize", "-q", help="Quantize (mlx-lm format).")
    ] = False,
    q_bits: QBits = 4,
    q_group_size: QGroupSize = 64,
    overwrite: Overwrite = False,
):
    """A Hugging Face PyTorch/safetensors checkpoint or a GGUF -> MLX model directory."""
    out = convert_model(
        src,
        output,
        dtype=dtype,
        quantize=quantize,
        q_bits=q_bits,
        q_group_size=q_group_size,
        overwrite=overwrite,
    )
    typer.echo(f"model written to {out}")
