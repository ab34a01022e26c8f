"""Structured output on the default model: plain against speculative decoding, free and under
a JSON schema, interleaved per prompt; and what the grammar's masks cost per token and node.

    python scripts/bench_structured.py [-n 128] [--out structured.json]

Prints a table and writes the per-run records as JSON (BENCHMARKS.md section 11).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

# isort: off
import mlx_redrafter  # noqa: F401  first: it loads OpenBLAS before mlx (see blas.py)
import mlx.core as mx

# isort: on
from mlx_redrafter.cli.common import load_for
from mlx_redrafter.constrain import JsonGrammar
from mlx_redrafter.env import machine
from mlx_redrafter.generation import stream_generate
from mlx_redrafter.prompts import encode_chat
from mlx_redrafter.tree import pack_sequences

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
PROMPTS = [
    ("person", "Describe Ada Lovelace as JSON: name, born, nationality, known_for, alive."),
    ("city", "Describe Paris as JSON: city, country, population, landmarks, climate."),
    ("person", "Give me Albert Einstein as a JSON record."),
    ("city", "Tokyo as a JSON object, please: its country, population and landmarks."),
    ("person", "Write a JSON profile of Marie Curie."),
    ("city", "Answer in JSON: what do you know about Rome?"),
]
METHODS = [
    "plain",
    "speculative",
    "plain+schema",
    "speculative+schema",
    "speculative+schema-no-forced",  # without the grammar's forced continuations as candidates
]


def run_one(loaded, grammar, ids, schema, method: str, max_tokens: int) -> dict:
    constraint = grammar.json_schema(schema) if "schema" in method else None
    if method.endswith("no-forced"):
        constraint.propose_forced = False
    drafter = loaded.draft if method.startswith("speculative") else None
    responses = list(
        stream_generate(loaded.base, loaded.tokenizer, ids, drafter, max_tokens=max_tokens,
                        lookup=method.startswith("speculative"), constraint=constraint,
                        beam_width=loaded.beam_width, beam_length=loaded.beam_length)
    )  # fmt: skip
    stats = responses[-1].stats
    text = "".join(r.text for r in responses)
    record = {
        "method": method,
        "tokens": [r.token for r in responses],
        "text": text,
        "finish_reason": responses[-1].finish_reason,
        "decode_tps": stats.decode_tps,
        "tokens_per_step": stats.tokens_per_step,
        "mean_tree_nodes": stats.tree_nodes / max(1, len(stats.accepted)),
        "accepted_from": dict(stats.accepted_from),
    }
    if constraint is not None:
        record["masks"] = constraint.masks
        record["mask_seconds"] = constraint.mask_time
        try:
            json.loads(text)
            record["parses"] = True
        except json.JSONDecodeError:
            record["parses"] = False
    return record


def isolated_mask_cost(grammar, schema, tokens: list[int]) -> dict:
    """Replay an output through a fresh constraint: the host time of one mask per token, and
    of the per-node masks of a 16-node tree of the next tokens (no forward running beside)."""
    c = grammar.json_schema(schema)
    per_token = []
    for t in tokens[:-1]:
        start = time.perf_counter()
        c.bitmask()
        per_token.append(time.perf_counter() - start)
        c.advance([t])
    c.reset()
    c.advance(tokens[:1])
    seqs = [tuple(tokens[:9])] + [tuple(tokens[: k + 1]) for k in range(1, 8)]
    tree = pack_sequences([s for s in seqs if c.allowed(s[1:]) == len(s) - 1])
    start = time.perf_counter()
    for _ in range(20):
        c.tree_bitmasks(tree)
    per_node = (time.perf_counter() - start) / 20 / tree.num_nodes
    logits = mx.random.normal((tree.num_nodes, grammar.vocab_size))
    mx.eval(logits)
    start = time.perf_counter()
    for _ in range(20):
        mx.eval(c.mask_tree(tree, logits))
    apply_total = (time.perf_counter() - start) / 20
    return {
        "mask_us_per_token_median": 1e6 * statistics.median(per_token),
        "mask_us_per_token_mean": 1e6 * statistics.mean(per_token),
        "mask_us_per_node_in_tree": 1e6 * per_node,
        "tree_nodes": tree.num_nodes,
        "mask_tree_and_apply_ms": 1e3 * apply_total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--max-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    loaded = load_for(None)
    grammar = JsonGrammar.for_model(loaded.base, loaded.tokenizer)
    schemas = {
        k: json.loads((EXAMPLES / f"{k}.schema.json").read_text()) for k in ("person", "city")
    }
    warm = encode_chat(loaded.tokenizer, "Hello")
    run_one(loaded, grammar, warm, schemas["city"], "speculative+schema", 16)

    records = []
    for i, (kind, prompt) in enumerate(PROMPTS):
        ids = encode_chat(loaded.tokenizer, prompt)
        order = METHODS[i % len(METHODS) :] + METHODS[: i % len(METHODS)]  # who goes first
        runs = {m: run_one(loaded, grammar, ids, schemas[kind], m, args.max_tokens) for m in order}
        same = (
            runs["plain+schema"]["tokens"]
            == runs["speculative+schema"]["tokens"]
            == runs["speculative+schema-no-forced"]["tokens"]
        )
        cost = isolated_mask_cost(grammar, schemas[kind], runs["plain+schema"]["tokens"])
        for m in METHODS:
            records.append({"prompt": i, "schema": kind, "identical_to_plain": same, **runs[m]})
        records[-1]["isolated"] = cost
        print(f"prompt {i} ({kind}): " + ", ".join(
            f"{m} {runs[m]['decode_tps']:.1f} tok/s" for m in METHODS) + f"; identical {same}")  # fmt: skip

    print(f"\n{'method':20s} {'tok/s':>7s} {'x plain':>8s} {'tok/step':>9s} {'masks/tok':>10s} "
          f"{'mask ms/tok':>12s} {'parses':>7s}")  # fmt: skip
    base = statistics.mean(r["decode_tps"] for r in records if r["method"] == "plain")
    for m in METHODS:
        rs = [r for r in records if r["method"] == m]
        tps = statistics.mean(r["decode_tps"] for r in rs)
        toks = sum(len(r["tokens"]) for r in rs)
        masks = sum(r.get("masks", 0) for r in rs) / toks
        mask_ms = 1e3 * sum(r.get("mask_seconds", 0.0) for r in rs) / toks
        parses = f"{sum(r.get('parses', False) for r in rs)}/{len(rs)}" if "schema" in m else "-"
        print(f"{m:20s} {tps:7.2f} {tps / base:8.2f} {statistics.mean(r['tokens_per_step'] for r in rs):9.2f} "
              f"{masks:10.2f} {mask_ms:12.3f} {parses:>7s}")  # fmt: skip
    iso = [r["isolated"] for r in records if "isolated" in r]
    print("\nisolated mask cost (no forward beside): "
          f"{statistics.mean(c['mask_us_per_token_median'] for c in iso):.1f} us/token median, "
          f"{statistics.mean(c['mask_us_per_token_mean'] for c in iso):.1f} us/token mean, "
          f"{statistics.mean(c['mask_us_per_node_in_tree'] for c in iso):.1f} us/node in a tree "
          f"(walk + mask), mask_tree + apply on the logits "
          f"{statistics.mean(c['mask_tree_and_apply_ms'] for c in iso):.2f} ms per tree of "
          f"{statistics.mean(c['tree_nodes'] for c in iso):.1f} nodes")  # fmt: skip
    print("greedy speculative == plain under the schema:",
          sum(r["identical_to_plain"] for r in records if r["method"] == "plain") , "/", len(PROMPTS))  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"machine": machine(), "records": records}, indent=1))


if __name__ == "__main__":
    main()
