"""Tensor parallelism over `mx.distributed`: the group that `mlx.launch` describes in the
environment, the base model's attention heads and MLP split over its ranks, and the little
the ranks exchange beside the forward pass (a seed, rank 0's requests, a stop flag).

Every rank runs the same program on the same inputs. Only the base model is split: each rank
keeps a contiguous share of the KV heads (with their query heads) and of the MLP's hidden
units, and the two projections where the shares meet (`o_proj`, `down_proj`) sum their
partial products over the group. The sum is the same array on every rank, so the drafter,
the lookup index, the tree and the acceptance, which are replicated, stay identical too.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import signal
import tempfile
import time
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .defaults import load_cost_curve, save_cost_curve, save_tuned_beam, tuned_beam
from .errors import DistributedError

# What each launcher of `mlx.launch` (and mpirun) puts in the environment, per backend.
_BACKEND_ENV = (
    ("jaccl", ("MLX_JACCL_COORDINATOR", "MLX_IBV_DEVICES")),
    ("nccl", ("MLX_WORLD_SIZE",)),
    ("ring", ("MLX_HOSTFILE",)),
    ("mpi", ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")),
)

_state: dict[str, Any] = {"group": None}


def launch_backend(environ: dict[str, str] | None = None) -> str | None:
    """The backend this process was started for ("ring", "jaccl", "nccl", "mpi"), or None
    when no distributed launcher started it."""
    environ = os.environ if environ is None else environ
    for backend, names in _BACKEND_ENV:
        if any(name in environ for name in names):
            return backend
    return None


def init_from_env() -> mx.distributed.Group | None:
    """Join the group `mlx.launch` set up, once per process. None when this process was not
    launched as one of several ranks (then everything runs as usual, on one machine).

    All ranks also seed MLX's random generator with rank 0's seed, so that sampling without
    an explicit seed still draws the same numbers everywhere.
    """
    if _state["group"] is not None:
        return _state["group"]
    backend = launch_backend()
    if backend is None or (backend == "ring" and _single_host_ring()):
        return None
    if not mx.distributed.is_available():
        raise DistributedError("this MLX build has no distributed backend")
    try:
        group = mx.distributed.init(strict=True, backend=backend)
    except RuntimeError as e:
        raise DistributedError(f"could not join the {backend} group: {e}") from None
    if group.size() == 1:
        return None
    _state["group"] = group
    mx.random.seed(broadcast_int(secrets.randbits(31), group))
    return group


def _single_host_ring() -> bool:
    """`mlx.launch -n 1` gives the ring backend an empty hostfile: one process, no group."""
    path = os.environ.get("MLX_HOSTFILE", "")
    if not path:
        return True
    try:
        with open(path) as f:
            return not f.read(64).strip()
    except OSError:
        return False  # let mx.distributed.init say what is wrong with it


def group() -> mx.distributed.Group | None:
    """The group joined by `init_from_env`, or None on a single process."""
    return _state["group"]


def rank() -> int:
    g = _state["group"]
    return 0 if g is None else g.rank()


def world_size() -> int:
    g = _state["group"]
    return 1 if g is None else g.size()


def is_leader() -> bool:
    """True on rank 0 (and on a single process): the one rank that prints, writes and serves."""
    return rank() == 0


def peer_lost(exc: BaseException) -> str | None:
    """A one-line message if `exc` is a backend's report that another rank went away."""
    text = str(exc)
    if isinstance(exc, RuntimeError) and text.startswith(("[ring]", "[jaccl]", "[mpi]", "[nccl]")):
        return (
            f"rank {rank()} of {world_size()}: another rank stopped ({text}); "
            "its own output says why"
        )
    return None


# ---------------------------------------------------------------------------------------------
# Rank 0's values to everyone (a sum in which only rank 0 contributes)


def broadcast_int(value: int, group: mx.distributed.Group) -> int:
    """Rank 0's non-negative int32 `value` on every rank."""
    mine = mx.array([value if group.rank() == 0 else 0], dtype=mx.int32)
    return int(mx.distributed.all_sum(mine, group=group).item())


def broadcast_floats(values: list[float], group: mx.distributed.Group) -> list[float]:
    """Rank 0's float `values` on every rank."""
    mine = mx.array(values if group.rank() == 0 else [0.0] * len(values), dtype=mx.float32)
    return [float(v) for v in mx.distributed.all_sum(mine, group=group).tolist()]


def shared_timings(group: mx.distributed.Group):
    """For a sizing policy split over ranks: rank 0's round timings on every rank. The policy
    learns the drafter's cost from wall-clock times, which differ between ranks; with their
    own times the ranks would size different trees, and the all_sums of one forward would
    then add up parts of different trees."""

    def share(draft_time: float, verify_time: float) -> tuple[float, float]:
        draft_time, verify_time = broadcast_floats([draft_time, verify_time], group)
        return draft_time, verify_time

    return share


def broadcast_json(obj: Any, group: mx.distributed.Group) -> Any:
    """Rank 0's JSON-serialisable `obj` on every rank (the others pass anything, e.g. None)."""
    data = json.dumps(obj).encode() if group.rank() == 0 else b""
    n = broadcast_int(len(data), group)
    if group.rank() == 0:
        mine = np.frombuffer(data, dtype=np.uint8).astype(np.int32)
    else:
        mine = np.zeros(n, dtype=np.int32)
    got = mx.distributed.all_sum(mx.array(mine), group=group)
    return json.loads(np.array(got).astype(np.uint8).tobytes().decode())


def share_tuned(model_path, group: mx.distributed.Group) -> None:
    """Make every rank use rank 0's tuned beam shape and verify-cost curve for `model_path`.

    Each machine keeps its own store of what `tune` measured (per device and model path), and
    a rank that sized its trees differently would stop running the same forward passes as
    the others. The other ranks get a private store that holds rank 0's values.
    """
    if group.rank() == 0:
        beam, curve = tuned_beam(model_path), load_cost_curve(model_path)
        sampled = tuned_beam(model_path, sampled=True)
        broadcast_json({"beam": beam, "sampled": sampled, "curve": curve}, group)
        return
    shared = broadcast_json(None, group)
    store = tempfile.mkdtemp(prefix="mlx-redrafter-rank-")
    atexit.register(shutil.rmtree, store, True)
    os.environ["MLX_REDRAFTER_CONFIG_DIR"] = store
    if shared["beam"]:
        save_tuned_beam(model_path, *shared["beam"])
    if shared["sampled"]:
        save_tuned_beam(model_path, *shared["sampled"], sampled=True)
    if shared["curve"]:
        save_cost_curve(
            model_path, [{"n": i + 1, "ratio": r} for i, r in enumerate(shared["curve"])]
        )


class SharedFlag:
    """A flag that rank 0 owns (any object with `is_set()`, e.g. a threading.Event) and every
    rank reads: each `is_set()` call is one exchange, so all ranks must call it equally often
    (they do when they run the same loop over the same tokens)."""

    def __init__(self, group: mx.distributed.Group, local=None):
        self.group = group
        self.local = local

    def is_set(self) -> bool:
        mine = 1 if self.group.rank() == 0 and self.local is not None and self.local.is_set() else 0
        return broadcast_int(mine, self.group) == 1

    def set(self) -> None:
        if self.local is not None:
            self.local.set()


# ---------------------------------------------------------------------------------------------
# Tensor parallelism


class AllSumLinear(nn.Module):
    """A linear layer split along its input: each rank multiplies its share of the input
    columns, the partial products are summed over the group, and the bias is added once."""

    def __init__(self, part: nn.Module, bias: mx.array | None, group: mx.distributed.Group):
        super().__init__()
        self.part = part
        if bias is not None:
            self.bias = bias
        self.group = group

    def __call__(self, x: mx.array) -> mx.array:
        y = mx.distributed.all_sum(self.part(x), group=self.group)
        return y + self.bias if "bias" in self else y


def share(total: int, parts: int, index: int, unit: int = 1) -> tuple[int, int]:
    """[start, stop) of part `index` when `total` items, in whole blocks of `unit`, are split
    into `parts` contiguous shares as evenly as the blocks allow (the first get one more)."""
    blocks = total // unit
    base, extra = divmod(blocks, parts)
    start = index * base + min(index, extra)
    stop = start + base + (1 if index < extra else 0)
    return start * unit, stop * unit


def _new_like(linear: nn.Module) -> nn.Module:
    kind = type(linear)
    new = kind.__new__(kind)
    nn.Module.__init__(new)
    if isinstance(linear, nn.QuantizedLinear):
        new.group_size, new.bits, new.mode = linear.group_size, linear.bits, linear.mode
        new.biases = None
    return new


def take_rows(linear: nn.Module, ranges: list[tuple[int, int]]) -> nn.Module:
    """A layer of the same kind computing only the output features in `ranges` (rows of the
    weight; the packed rows of a quantized weight are independent, so this stays exact)."""
    new = _new_like(linear)
    for name in ("weight", "scales", "biases", "bias"):
        if name in linear and linear[name] is not None:
            new[name] = mx.concatenate([linear[name][a:b] for a, b in ranges], axis=0)
    if isinstance(new, nn.QuantizedLinear):
        new.freeze()
    return new


def take_columns(linear: nn.Module, start: int, stop: int, group) -> AllSumLinear:
    """The share [start, stop) of `linear`'s input features, its outputs summed over `group`."""
    part = _new_like(linear)
    if isinstance(linear, nn.QuantizedLinear):
        pack = 32 // linear.bits if 32 % linear.bits == 0 else None
        if start % linear.group_size or stop % linear.group_size or pack is None:
            raise DistributedError(
                f"cannot split {linear.bits}-bit weights (groups of {linear.group_size}) "
                f"at input column {start}..{stop}"
            )
        part.weight = linear.weight[:, start // pack : stop // pack]
        part.scales = linear.scales[:, start // linear.group_size : stop // linear.group_size]
        if linear.get("biases") is not None:
            part.biases = linear.biases[:, start // linear.group_size : stop // linear.group_size]
        part.freeze()
    elif isinstance(linear, nn.Linear):
        part.weight = linear.weight[:, start:stop]
    else:
        raise DistributedError(f"cannot split a {type(linear).__name__} layer over ranks")
    return AllSumLinear(part, linear.get("bias"), group)


def check_shardable(args, n: int) -> None:
    """Raise DistributedError unless a model with these `ModelArgs` splits over `n` ranks."""
    if args.num_key_value_heads < n:
        raise DistributedError(
            f"the model has {args.num_key_value_heads} KV heads: it cannot be split over {n} "
            f"ranks (at most {args.num_key_value_heads})"
        )
    q = args.quantization or {}
    unit = q.get("group_size", 64) if q else 1
    if args.intermediate_size // unit < n:
        raise DistributedError(
            f"the MLP ({args.intermediate_size} units) is too small for {n} ranks"
        )


def shard_attention(attn: nn.Module, group) -> None:
    """Keep this rank's share of the KV heads and the query heads that read them."""
    n, r, D = group.size(), group.rank(), attn.head_dim
    H, H_kv = attn.n_heads, attn.n_kv_heads
    rep = H // H_kv
    k0, k1 = share(H_kv, n, r)
    q_rows = (k0 * rep * D, k1 * rep * D)
    kv_rows = (k0 * D, k1 * D)
    if "qkv_proj" in attn:  # fused rows: q (H * D), k (H_kv * D), v (H_kv * D)
        k_at, v_at = H * D, (H + H_kv) * D
        ranges = [q_rows, tuple(k_at + i for i in kv_rows), tuple(v_at + i for i in kv_rows)]
        attn.qkv_proj = take_rows(attn.qkv_proj, ranges)
    else:
        attn.q_proj = take_rows(attn.q_proj, [q_rows])
        attn.k_proj = take_rows(attn.k_proj, [kv_rows])
        attn.v_proj = take_rows(attn.v_proj, [kv_rows])
    attn.o_proj = take_columns(attn.o_proj, *q_rows, group)
    attn.n_heads, attn.n_kv_heads = (k1 - k0) * rep, k1 - k0


def shard_mlp(mlp: nn.Module, hidden: int, group) -> None:
    """Keep this rank's share of the MLP's hidden units."""
    down = mlp.down_proj
    unit = down.group_size if isinstance(down, nn.QuantizedLinear) else 1
    a, b = share(hidden, group.size(), group.rank(), unit)
    if "gate_up_proj" in mlp:  # fused rows: gate (hidden), up (hidden)
        mlp.gate_up_proj = take_rows(mlp.gate_up_proj, [(a, b), (hidden + a, hidden + b)])
    else:
        mlp.gate_proj = take_rows(mlp.gate_proj, [(a, b)])
        mlp.up_proj = take_rows(mlp.up_proj, [(a, b)])
    mlp.down_proj = take_columns(down, a, b, group)


def shard_model(model, group: mx.distributed.Group | None):
    """Split `model`'s blocks over `group` in place (tensor parallelism) and return it. The
    embedding, final norm and output head stay whole on every rank. None or a group of one
    leaves the model as it is. Works before or after `Model.optimize` (fused projections)."""
    if group is None or group.size() == 1:
        return model
    check_shardable(model.args, group.size())
    for layer in model.layers:
        shard_attention(layer.self_attn, group)
        shard_mlp(layer.mlp, model.args.intermediate_size, group)
        layer._compiled_mlp = None  # traced with the whole weights
    model.shards = (group.rank(), group.size())
    model.shard_group = group  # the sizing policy shares rank 0's timings over it
    return model


# ---------------------------------------------------------------------------------------------
# A request server over the ranks: rank 0 serves, the others run the same jobs in step


class RelayedJob:
    """Rank 0's job as the other ranks run it: the same tokens and options, its cancel flag
    read from rank 0, and nowhere to send events."""

    def __init__(self, request: dict, group: mx.distributed.Group):
        self.kind = request["kind"]
        self.ids = request["ids"]
        self.options = request["options"]
        self.owner = request.get("owner", "")  # whose prompt caches: the same entry as rank 0's
        self.cancelled = SharedFlag(group)
        self.created = time.perf_counter()
        self.deadline = float("inf")  # rank 0 keeps the time; its cancel flag is shared
        self.abort = None
        self.constraint = None  # refused while split (`lead` sets engine.no_constraints)
        self.top_logprobs = request.get("top_logprobs")

    def post(self, event: tuple) -> None:
        pass

    def cancel(self) -> None:
        pass


def lead(engine, group: mx.distributed.Group) -> None:
    """On rank 0: before each job, send it to the other ranks; after it, how many prompt
    caches rank 0 kept (a share of the KV heads is a share of the bytes, which may differ
    between ranks when the heads do not split evenly, so the count is rank 0's).

    `engine` runs one job at a time through `engine._run(job)` (job: kind, ids, options,
    cancelled, created, post, cancel) and keeps its prompt caches in `engine.caches.entries`.
    """
    run = engine._run
    # The other ranks could not follow a grammar (its state lives in rank 0's request):
    # JSON formats get a 400 with this reason; free text is served.
    engine.no_constraints = "not served while the model is split over ranks"

    def run_everywhere(job) -> None:
        try:
            request = {
                "kind": job.kind,
                "ids": list(job.ids),
                "options": job.options,
                "owner": getattr(job, "owner", ""),
                "top_logprobs": getattr(job, "top_logprobs", None),
            }
            broadcast_json(request, group)
            job.cancelled = SharedFlag(group, job.cancelled)
            try:
                run(job)
            finally:
                broadcast_int(len(engine.caches.entries), group)
        except RuntimeError as e:
            message = peer_lost(e)
            if message is None:
                raise
            # Nothing can be answered any more: stop serving (as Ctrl-C does) and say why.
            engine.lost = message
            os.kill(os.getpid(), signal.SIGINT)
            raise DistributedError(message) from None

    engine._run = run_everywhere


def follow(engine, group: mx.distributed.Group) -> None:
    """On the other ranks: run rank 0's jobs until rank 0 sends None (`release`)."""
    # The engine is never started here (no worker, no queue): the jobs run on this thread.
    # It must not count as closing, or its `_run` would cancel each job at its first token
    # while rank 0 goes on (a hang at the next all_sum).
    engine._closing = False
    while True:
        request = broadcast_json(None, group)
        if request is None:
            return
        try:
            engine._run(RelayedJob(request, group))
        except Exception as e:
            if peer_lost(e) is not None:
                raise
            # Rank 0 met the same error in the same place, and answered the request with it.
        kept = broadcast_int(0, group)
        entries = engine.caches.entries
        del entries[: max(0, len(entries) - kept)]


def release(group: mx.distributed.Group) -> None:
    """On rank 0, once it serves no more: let the other ranks' `follow` return."""
    broadcast_json(None, group)
