"""`mlx-redrafter serve`: a local OpenAI- and Anthropic-compatible server on one model (and
drafter), locked to its clients (docs/serving.md)."""

from __future__ import annotations

import ipaddress
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from mlx_redrafter import distributed
from mlx_redrafter.cli.common import (
    BeamLength,
    BeamWidth,
    Drafter,
    Dtype,
    Loaded,
    Model,
    NoDrafter,
    fail,
    friendly_errors,
    load_for,
)
from mlx_redrafter.env import device_name
from mlx_redrafter.generation import OPTION_DEFAULTS, SamplingConfig
from mlx_redrafter.lookup_memory import DEFAULT_MAX_CLIENTS, DEFAULT_MEMORY_TOKENS, LookupMemory
from mlx_redrafter.plan import DecodePlan


@friendly_errors
def serve(
    model: Model = None,
    drafter: Drafter = None,
    no_drafter: NoDrafter = False,
    host: Annotated[
        str,
        typer.Option("--host", help="Address to listen on (0.0.0.0 exposes it to the network)."),
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, help="0 picks a free port.")
    ] = 8080,
    beam_width: BeamWidth = None,
    beam_length: BeamLength = None,
    lookup: Annotated[
        bool | None,
        typer.Option(
            "--lookup/--no-lookup", help="Context lookup candidates (default: the library's)."
        ),
    ] = None,
    lookup_max: Annotated[
        int | None, typer.Option("--lookup-max", help="Longest continuation lookup copies.")
    ] = None,
    lookup_cache: Annotated[
        bool,
        typer.Option(
            "--lookup-cache/--no-lookup-cache",
            help="Lookup also copies from each client's earlier requests: one bounded memory "
            f"per API key ({DEFAULT_MEMORY_TOKENS:,} tokens, {DEFAULT_MAX_CLIENTS} clients).",
        ),
    ] = True,
    temp: Annotated[
        float, typer.Option("--temp", help="Temperature when a request gives none.")
    ] = OPTION_DEFAULTS.temperature,
    top_p: Annotated[
        float, typer.Option("--top-p", help="top_p when a request gives none.")
    ] = OPTION_DEFAULTS.top_p,
    top_k: Annotated[
        int, typer.Option("--top-k", help="top_k when a request gives none (0 = off).")
    ] = OPTION_DEFAULTS.top_k,
    max_tokens: Annotated[
        int,
        typer.Option("--max-tokens", "-n", help="Answer length when a chat request gives none."),
    ] = OPTION_DEFAULTS.max_tokens,
    max_queue: Annotated[
        int, typer.Option("--max-queue", help="Requests that may wait (then 503).")
    ] = 64,
    prompt_cache: Annotated[
        int, typer.Option("--prompt-cache", help="KV caches of recent prompts.")
    ] = 4,
    prompt_cache_gb: Annotated[
        float, typer.Option("--prompt-cache-gb", help="Most memory the kept caches may hold.")
    ] = 2.0,
    dtype: Dtype = None,
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            "--api-key",
            envvar="MLX_REDRAFTER_API_KEY",
            help="Require this key (Authorization: Bearer KEY or x-api-key) on every route but "
            "/health; repeat for several clients (each gets its own prompt caches). "
            "Env: MLX_REDRAFTER_API_KEY (several separated by spaces).",
        ),
    ] = None,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            help="A Host name to answer besides localhost and IP addresses (DNS rebinding "
            "guard); '*' answers any. Repeatable.",
        ),
    ] = None,
    allowed_origins: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-origins",
            help="Web origins (https://app.example) whose pages may call the server, besides "
            "localhost ones; '*' allows any. Repeatable or comma-separated.",
        ),
    ] = None,
    max_body_mb: Annotated[
        float, typer.Option("--max-body-mb", min=0.001, help="Largest request body (413 above).")
    ] = 4.0,
    request_timeout: Annotated[
        float,
        typer.Option(
            "--request-timeout", min=1, help="Seconds a request may take, queue included."
        ),
    ] = 600.0,
    header_timeout: Annotated[
        float,
        typer.Option(
            "--header-timeout", min=0.1, help="Seconds a connection has to send a request."
        ),
    ] = 10.0,
):
    """A local OpenAI- and Anthropic-compatible server (/v1/chat/completions, /v1/completions,
    /v1/messages, /v1/models), for this machine's apps and agents only."""
    # The web stack (starlette, uvicorn) loads only for this command.
    from mlx_redrafter.server import DoorSettings, Engine, Limits, bind, url_of
    from mlx_redrafter.server import serve as run_server

    SamplingConfig(temp, top_p, top_k).validate()
    keys = tuple(k for key in api_key or () for k in key.split() if k)
    origins = tuple(
        o.strip() for item in allowed_origins or () for o in item.split(",") if o.strip()
    )
    door = DoorSettings(
        api_keys=keys,
        allowed_hosts=tuple(allowed_host or ()),
        allowed_origins=origins,
        max_body_bytes=int(max_body_mb * (1 << 20)),
        header_timeout=header_timeout,
    )
    limits = Limits(request_timeout=request_timeout)
    group = distributed.group()  # under mlx.launch: rank 0 serves, the others follow it
    # Fail before the model loads if the port is taken.
    sock = bind(host, port) if distributed.is_leader() else None
    # The decoding options go to the engine as given: it resolves its plan from them.
    loaded = load_for(model, dtype, drafter, no_drafter, lookup=lookup, lookup_max=lookup_max)
    options = {
        "beam_width": beam_width,
        "beam_length": beam_length,
        "lookup": lookup,
        "lookup_max": lookup_max,
        # Lookup also copies from each client's earlier requests (one corpus per API key).
        "lookup_memory": LookupMemory() if lookup_cache and loaded.lookup is not None else None,
    }
    engine = Engine(
        loaded.base,
        loaded.tokenizer,
        loaded.draft,
        model_name=loaded.model_path.name,
        aliases=tuple(a for a in (model, str(loaded.model_path)) if a),
        drafter_name=Path(loaded.drafter_path).name if loaded.drafter_path else None,
        decode_options=options,
        defaults={"max_tokens": max_tokens, "temperature": temp, "top_p": top_p, "top_k": top_k},
        max_queue=max_queue,
        cache_entries=prompt_cache,
        cache_bytes=int(prompt_cache_gb * (1 << 30)),
    )
    if group is not None and not distributed.is_leader():
        distributed.follow(engine, group)
        return
    if group is not None:
        distributed.lead(engine, group)
    _log_requests()
    how = _decoding_summary(loaded, engine.plan)
    url = url_of(sock)

    locked = f"{len(keys)} API key{'s' * (len(keys) != 1)}" if keys else "no API key"
    ranks = f" · split over {distributed.world_size()} ranks" if group is not None else ""

    def ready() -> None:
        typer.echo(
            f"mlx-redrafter serve: {url}/v1 · model {loaded.model_path.name} · {how} · "
            f"{device_name()}{ranks} · {locked} · Ctrl-C stops"
        )
        if not keys and not _is_loopback(host):
            typer.echo(
                f"warning: listening on {host} without --api-key: anyone who can reach this "
                "address can use the model",
                err=True,
            )

    try:
        stopped_by = run_server(engine, sock, door, limits, on_ready=ready)
    finally:
        if group is not None and getattr(engine, "lost", None) is None:
            distributed.release(group)
    if getattr(engine, "lost", None):
        fail(engine.lost)
    if stopped_by == signal.SIGINT:
        raise typer.Exit(130)  # as Ctrl-C ends any command; SIGTERM is a clean stop (0)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _log_requests() -> None:
    """The server's log (one line per request) on stderr, with the time."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    server_log = logging.getLogger("mlx_redrafter.server")
    server_log.addHandler(handler)
    server_log.setLevel(logging.INFO)
    server_log.propagate = False


def _decoding_summary(loaded: Loaded, plan: DecodePlan) -> str:
    """'ReDrafter W=1 L=3 (drafter) + lookup (up to 8 tokens)': the engine's decode plan."""
    parts = []
    if loaded.draft is not None:
        w, length = plan.beam
        shape = f"W={w} L={length}"
        if plan.sampled_beam is not None and plan.sampled_beam != plan.beam:
            shape += " (sampled: W={} L={})".format(*plan.sampled_beam)
        parts.append(f"ReDrafter {shape} ({Path(loaded.drafter_path).name})")
    if plan.lookup is not None:
        parts.append(f"lookup (up to {plan.lookup.max_tokens} tokens)")
    return " + ".join(parts) or "plain decoding"
