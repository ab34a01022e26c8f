"""Benchmark harness: ReDrafter against plain decoding (`ar`) and mlx-lm on the same prompts.

One process and one model directory. Every method runs every prompt (first turn, chat
template, greedy) after a warm-up, with the methods interleaved per prompt (in a rotating
order) so that machine noise hits all of them alike, and every method's tokens are timed here
the same way: decode tok/s = (n - 1) / (t_last - t_first), prefill tok/s = prompt tokens /
time to the first token, end-to-end tok/s = n / (t_last - t_start).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..accept import SamplingConfig
from ..env import parse_dtype
from ..errors import BenchError, LoadError
from ..generation import LookupConfig, stream_generate
from ..lookup_memory import LookupMemory
from ..prompts import Prompt, encode_chat, encode_messages, eos_ids
from .compare import default_check
from .methods import Method
from .replay import reference_batch
from .report import BenchResult, strip_tokens, summarize, summarize_groups, sweep_grid

WARMUP_TOKENS = 16


def load_mlx_lm(model_path: str | Path, dtype: str | None = None):
    """(model, tokenizer) of mlx-lm itself for the same model directory, for the `mlx-lm`
    method; cast to `dtype` (float32, float16 or bfloat16) like ours when given."""
    import mlx_lm

    lm_model, lm_tokenizer = mlx_lm.load(str(model_path))
    if dtype:
        lm_model.set_dtype(parse_dtype(dtype, str(model_path), LoadError))
    return lm_model, lm_tokenizer


def _nbytes(module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def _round_figures(method: Method, stats) -> dict:
    """Rounds and accepted drafts of one run; for speculative methods also where accepted
    tokens came from and (with profiling) the time per phase."""
    rounds = list(stats.accepted) if stats is not None and method.speculative else []
    out = {
        "rounds": len(rounds),
        "accepted": rounds,
        "tokens_per_step": (sum(rounds) + len(rounds)) / len(rounds) if rounds else 1.0,
    }
    if method.speculative:
        out["beam_width"] = method.beam_width
        out["beam_length"] = method.beam_length
        out["accepted_from"] = dict(stats.accepted_from) if stats is not None else {}
        out["drafter_rounds"] = stats.drafter_rounds if stats is not None else 0
        out["accept_by_depth"] = stats.accept_by_depth if stats is not None else []
        out["draft_time_s"] = stats.draft_time if stats is not None else 0.0
        out["verify_time_s"] = stats.verify_time if stats is not None else 0.0
        out["accept_time_s"] = stats.accept_time if stats is not None else 0.0
        out["mean_tree_nodes"] = stats.tree_nodes / max(1, len(rounds)) if stats else 0.0
        out["nodes"] = list(stats.nodes) if stats is not None else []
    return out


class Bench:
    """Runs methods on prompts. `mlx_lm_model`/`mlx_lm_tokenizer` are needed for `mlx-lm`,
    `drafter` for `redrafter`."""

    def __init__(
        self,
        model,
        tokenizer,
        drafter=None,
        mlx_lm_model=None,
        mlx_lm_tokenizer=None,
        max_tokens: int = 128,
        profile: bool = False,
        sampling: SamplingConfig | None = None,
        seeds: Sequence[int] = (0,),
    ):
        self.sampling = sampling or SamplingConfig()
        self.seeds = list(seeds) if not self.sampling.greedy else list(seeds)[:1]
        self.seed = self.seeds[0]  # the seed of the run in progress
        self.model = model
        self.tokenizer = tokenizer
        self.drafter = drafter
        self.lm_model = mlx_lm_model
        self.lm_tokenizer = mlx_lm_tokenizer
        self.max_tokens = max_tokens
        self.profile = profile
        # Every method stops at the first token any of the tokenizers calls an end.
        self.eos = eos_ids(tokenizer) | (eos_ids(mlx_lm_tokenizer) if mlx_lm_tokenizer else set())
        self._weights = {"ours": _nbytes(model)}
        if drafter is not None:
            self._weights["drafter"] = _nbytes(drafter)
        if mlx_lm_model is not None:
            self._weights["mlx-lm"] = _nbytes(mlx_lm_model)
        # per +memory method: one client's memory of the run's earlier prompts and answers
        self.memories: dict[str, LookupMemory] = {}

    def check(self, methods: Sequence[Method]) -> None:
        kinds = {m.kind for m in methods}
        if "redrafter" in kinds and self.drafter is None:
            raise BenchError("the redrafter method needs a drafter: pass --drafter")
        if "mlx-lm" in kinds and self.lm_model is None:
            raise BenchError("the mlx-lm method needs mlx-lm's model (mlx_lm.load)")

    def _stream(self, method: Method, ids: list[int], max_tokens: int) -> Iterator[tuple]:
        """(token, stats or None) per generated token."""
        s = self.sampling
        if method.kind == "mlx-lm":
            from mlx_lm.generate import stream_generate as mlx_lm_stream_generate
            from mlx_lm.sample_utils import make_sampler

            mx.random.seed(self.seed)
            sampler = make_sampler(s.temperature, top_p=s.top_p, top_k=s.top_k)
            for r in mlx_lm_stream_generate(
                self.lm_model, self.lm_tokenizer, ids, max_tokens=max_tokens, sampler=sampler
            ):
                yield r.token, None
            return
        drafter = self.drafter if method.kind == "redrafter" else None
        lookup = method.lookup and (LookupConfig.v1() if method.lookup_version == 1 else True)
        memory = self.memories.setdefault(method.name, LookupMemory()) if method.memory else None
        for r in stream_generate(
            self.model,
            self.tokenizer,
            ids,
            drafter,
            max_tokens=max_tokens,
            beam_width=method.beam_width,
            beam_length=method.beam_length,
            lookup=lookup,
            profile=self.profile,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            seed=self.seed,
            draft_method=method.draft,
            lookup_memory=memory,
        ):
            yield r.token, r.stats

    def _weights_of(self, method: Method) -> int:
        if method.kind == "mlx-lm":
            return self._weights["mlx-lm"]
        return self._weights["ours"] + (
            self._weights.get("drafter", 0) if method.kind == "redrafter" else 0
        )

    def _generate(self, method: Method, ids: list[int], max_tokens: int):
        """(tokens, last stats, (t_start, t_first, t_last), bytes allocated at the peak above
        what was allocated before the run)."""
        tokens: list[int] = []
        stats = None
        mx.synchronize()
        active = mx.get_active_memory()
        mx.reset_peak_memory()
        stream = self._stream(method, ids, max_tokens)
        t_start = time.perf_counter()
        t_first = t_last = t_start
        try:
            for token, s in stream:
                t_last = time.perf_counter()
                if not tokens:
                    t_first = t_last
                tokens.append(token)
                stats = s
                if token in self.eos or len(tokens) >= max_tokens:
                    break
        finally:
            stream.close()
        grown = max(0, mx.get_peak_memory() - active)
        return tokens, stats, (t_start, t_first, t_last), grown

    def run_one(self, method: Method, ids: list[int], max_tokens: int | None = None) -> dict:
        """Generate greedily from `ids`; the figures of this run (and its tokens)."""
        max_tokens = max_tokens or self.max_tokens
        tokens, stats, (t_start, t_first, t_last), grown = self._generate(method, ids, max_tokens)
        n = len(tokens)
        ttft = t_first - t_start
        decode_time = t_last - t_first
        out = {
            "prompt_tokens": len(ids),
            "num_tokens": n,
            "finish_reason": "stop" if tokens and tokens[-1] in self.eos else "length",
            "ttft_s": ttft,
            "decode_time_s": decode_time,
            "total_time_s": t_last - t_start,
            "prefill_tps": len(ids) / ttft if ttft > 0 else 0.0,
            "decode_tps": (n - 1) / decode_time if n > 1 and decode_time > 0 else None,
            "e2e_tps": n / (t_last - t_start) if t_last > t_start else 0.0,
            # What running this method alone would need: its weights plus the run's peak
            # above what was allocated before it (both models are loaded in this process).
            "peak_memory_gb": (self._weights_of(method) + grown) / 1e9,
            "tokens": tokens,
        }
        out.update(_round_figures(method, stats))
        return out

    def encode(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        """Chat-template ids per prompt; earlier turns are answered first by the model's own
        greedy plain decoding (all prompts in one batched generation per turn)."""
        history = [[] for _ in prompts]  # messages so far
        depth = max((len(p.before) for p in prompts), default=0)
        for turn in range(depth):
            rows = [i for i, p in enumerate(prompts) if len(p.before) > turn]
            asks = []
            for i in rows:
                history[i].append({"role": "user", "content": prompts[i].before[turn]})
                asks.append(encode_messages(self.tokenizer, history[i]))
            for i, (ref, limit, _) in zip(
                rows,
                reference_batch(self.model, self.tokenizer, asks, self.max_tokens, 0),
                strict=True,
            ):
                answer = [t for t in ref[:limit] if t not in self.eos]
                history[i].append({"role": "assistant", "content": self.tokenizer.decode(answer)})
        return [
            encode_messages(self.tokenizer, messages + [{"role": "user", "content": p.text}])
            if messages
            else encode_chat(self.tokenizer, p.text)
            for p, messages in zip(prompts, history, strict=True)
        ]

    def run(
        self,
        prompts: Sequence[Prompt],
        methods: Sequence[Method],
        warmup: bool = True,
        progress: Callable[[str], None] | None = None,
    ) -> list[dict]:
        """Every method on every prompt; per-prompt records (tokens included)."""
        self.check(methods)
        encoded = self.encode(prompts)
        if warmup:
            for method in methods:
                self.run_one(method, encoded[0], min(WARMUP_TOKENS, self.max_tokens))
            self.memories.clear()  # the memory starts with the first measured prompt
        records = []
        runs = [
            (p, ids, seed) for p, ids in zip(prompts, encoded, strict=True) for seed in self.seeds
        ]
        for i, (prompt, ids, seed) in enumerate(runs):
            # A rotating order: each method runs first, second, ... equally often.
            k = i % len(methods)
            order = list(methods[k:]) + list(methods[:k])
            figures = {}
            self.seed = seed
            for method in order:
                figures[method.name] = self.run_one(method, ids)
                if progress is not None:
                    progress(method.name)
            record = {
                "id": prompt.id,
                "category": prompt.category,
                "source": prompt.source,
                "prompt_tokens": len(ids),
                "methods": {m.name: figures[m.name] for m in methods},
            }
            if not self.sampling.greedy:
                record["seed"] = seed
            records.append(record)
        return records


def benchmark(
    bench: Bench,
    prompts: Sequence[Prompt],
    methods: Sequence[Method],
    header: dict,
    sweep: bool = False,
    progress: Callable[[str], None] | None = None,
    warmup: bool = True,
) -> BenchResult:
    """Run, check outputs, summarize; a result ready for `format_table` and `write_json`."""
    records = bench.run(prompts, methods, warmup=warmup, progress=progress)
    summary = summarize(records, methods)
    result = BenchResult(header, list(methods), strip_tokens(records), summary)
    result.groups = summarize_groups(records, methods)
    result.default_check = default_check(records, methods)
    if sweep:
        result.sweep = sweep_grid(summary, methods)
    return result
