"""`mlx-redrafter generate`: one prompt, the answer streamed to stdout (or one JSON object)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import mlx.core as mx
import typer

from mlx_redrafter.cli.common import (
    BeamLength,
    BeamWidth,
    Drafter,
    Dtype,
    Loaded,
    Lookup,
    LookupMax,
    Model,
    NoDrafter,
    Seed,
    System,
    Temp,
    TopK,
    TopP,
    check_beam_options,
    check_options,
    fail,
    friendly_errors,
    load_for,
    read_stdin,
    text_option,
    warn_plain_text,
)
from mlx_redrafter.constrain import JsonGrammar
from mlx_redrafter.distributed import is_leader
from mlx_redrafter.env import compute_dtype, device_name, dtype_name
from mlx_redrafter.errors import ConstraintError, read_json_object
from mlx_redrafter.generation import OPTION_DEFAULTS, DecodeStats, stream_generate
from mlx_redrafter.plan import DEFAULT_LOOKUP
from mlx_redrafter.prompts import encode_chat


@friendly_errors
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt text ('-' reads stdin).")],
    model: Model = None,
    drafter: Drafter = None,
    no_drafter: NoDrafter = False,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", "-n", help="Most new tokens.")
    ] = OPTION_DEFAULTS.max_tokens,
    temp: Temp = OPTION_DEFAULTS.temperature,
    top_p: TopP = OPTION_DEFAULTS.top_p,
    top_k: TopK = OPTION_DEFAULTS.top_k,
    seed: Seed = None,
    beam_width: BeamWidth = None,
    beam_length: BeamLength = None,
    lookup: Lookup = DEFAULT_LOOKUP,
    lookup_max: LookupMax = None,
    system: System = None,
    raw: Annotated[bool, typer.Option("--raw", help="Do not apply the chat template.")] = False,
    stop: Annotated[
        list[str] | None, typer.Option("--stop", help="Stop string (repeatable).")
    ] = None,
    dtype: Dtype = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON object at the end.")
    ] = False,
    json_schema: Annotated[
        Path | None,
        typer.Option("--json-schema", help="Answer with JSON valid under this schema file."),
    ] = None,
    json_object: Annotated[
        bool, typer.Option("--json-object", help="Answer with one JSON object.")
    ] = False,
    logprobs: Annotated[
        int | None,
        typer.Option("--logprobs", help="With --json: each token's logprob and the K likeliest."),
    ] = None,
):
    """Generate a response to one prompt."""
    prompt = read_stdin() if prompt == "-" else text_option(prompt, "--prompt")
    system, stop = text_option(system, "--system"), [text_option(s, "--stop") for s in stop or ()]
    if not prompt.strip():
        fail("the prompt is empty")
    check_options(max_tokens=(max_tokens, 1), top_k=(top_k, 0), logprobs=(logprobs, 0))
    check_beam_options(beam_width, beam_length)
    schema = _read_format(json_schema, json_object, logprobs, json_out)
    loaded = load_for(
        model, dtype, drafter, no_drafter, beam_width, beam_length, lookup, lookup_max
    )
    tokenizer = loaded.tokenizer
    if not raw:
        warn_plain_text(
            loaded, "the prompt is sent as plain text" + (", without --system" if system else "")
        )
    constraint = None
    if schema is not None:
        constraint = JsonGrammar.for_model(loaded.base, tokenizer).json_schema(schema)
    ids = tokenizer.encode(prompt) if raw else encode_chat(tokenizer, prompt, system)
    stream = stream_generate(
        loaded.base,
        tokenizer,
        ids,
        loaded.draft,
        max_tokens=max_tokens,
        temperature=temp,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        plan=loaded.plan,
        stop=stop or (),
        profile=json_out,  # the verify forward evaluated on its own: exact time split
        constraint=constraint,
        logprobs=logprobs,
    )
    tokens, text, last, scores = [], [], None, []
    for response in stream:
        tokens.append(response.token)
        text.append(response.text)
        last = response
        if response.logprobs is not None:
            lp = response.logprobs
            scores.append({"token": lp.token, "logprob": lp.logprob, "top": lp.top})
        if not json_out:
            typer.echo(response.text, nl=False)
    if json_out:
        out = {"text": "".join(text), "tokens": tokens, **last.stats.as_dict()}
        if logprobs is not None:
            out["logprobs"] = scores
        typer.echo(json.dumps({**out, **_run_fields(loaded, tokens, last, lookup)}))
    else:
        typer.echo()
        if is_leader():  # under mlx.launch every rank has a stderr
            typer.secho(_stats_line(loaded, last.stats, lookup), dim=True, err=True)


def _read_format(
    json_schema: Path | None, json_object: bool, logprobs: int | None, json_out: bool
) -> dict | None:
    """The JSON schema the answer must follow ({"type": "object"} for --json-object), or
    None; the option combinations checked before anything loads."""
    if logprobs is not None and not json_out:
        raise ConstraintError("--logprobs needs --json (the logprobs are printed in it)")
    if json_schema is not None and json_object:
        raise ConstraintError("--json-schema and --json-object exclude each other")
    if json_object:
        return {"type": "object"}
    if json_schema is None:
        return None
    return read_json_object(json_schema, ConstraintError)


def _run_fields(loaded: Loaded, tokens: list[int], last, lookup: bool) -> dict:
    """What the JSON adds to the run's DecodeStats: the setup and the finish."""
    draft = loaded.draft is not None
    return {
        "num_tokens": len(tokens),
        "finish_reason": last.finish_reason,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
        "device": device_name(),
        "dtype": dtype_name(compute_dtype(loaded.base)),
        "model": str(loaded.model_path),
        "drafter": loaded.drafter_path,
        "beam_width": last.stats.beam_width if draft else None,  # the shape that ran
        "beam_length": last.stats.beam_length if draft else None,
        "lookup": lookup,
    }


def _stats_line(loaded: Loaded, stats: DecodeStats, lookup: bool) -> str:
    """The dimmed line on stderr after the answer."""
    line = (
        f"prompt: {stats.prompt_tokens} tokens, {stats.prefill_tps:.1f} tok/s | "
        f"generation: {stats.num_tokens} tokens, {stats.decode_tps:.1f} tok/s"
    )
    if loaded.draft is not None or lookup:
        sources = ", ".join(f"{k} {v}" for k, v in sorted(stats.accepted_from.items()))
        line += f" | {stats.tokens_per_step:.2f} tokens/step"
        line += (
            f" (W={stats.beam_width}, L={stats.beam_length}"
            if loaded.draft is not None
            else " (lookup"
        )
        line += f"; accepted: {sources})" if sources else ")"
    return line
