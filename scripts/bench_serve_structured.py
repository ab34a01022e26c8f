"""Structured output through `serve` on the default model: a speculative server (shipped drafter
+ lookup, as `serve` runs by default) against a plain one (no drafter, no lookup), free and
under a JSON schema, requests interleaved per prompt over HTTP with the openai client.

    python scripts/bench_serve_structured.py [-n 128] [--out serve_structured.json]

Prints a table and writes the per-request records as JSON (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

# isort: off
import mlx_redrafter  # noqa: F401  first: it loads OpenBLAS before mlx (see blas.py)

# isort: on
import openai

from mlx_redrafter.cli.common import load_for
from mlx_redrafter.env import machine
from mlx_redrafter.server import Engine, bind, make_server, url_of

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_structured import EXAMPLES, PROMPTS  # noqa: E402  the same prompts and schemas

METHODS = ["plain", "speculative", "plain+schema", "speculative+schema"]


@contextmanager
def serving(engine: Engine):
    sock = bind("127.0.0.1", 0)
    server = make_server(engine, bound_host="127.0.0.1")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield openai.OpenAI(base_url=f"{url_of(sock)}/v1", api_key="-", max_retries=0,
                            timeout=1800)  # fmt: skip
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def ask(api, prompt: str, schema: dict | None, max_tokens: int) -> dict:
    extra = {}
    if schema is not None:
        extra["response_format"] = {"type": "json_schema",
                                    "json_schema": {"name": "answer", "schema": schema}}  # fmt: skip
    start = time.perf_counter()
    resp = api.chat.completions.create(
        model="m", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, **extra
    )
    wall = time.perf_counter() - start
    info = resp.model_extra["redrafter"]
    text = resp.choices[0].message.content
    record = {
        "text": text,
        "finish_reason": resp.choices[0].finish_reason,
        "completion_tokens": resp.usage.completion_tokens,
        "wall_seconds": wall,
        "client_tps": resp.usage.completion_tokens / wall,
        "decode_tps": info["decode_tokens_per_second"],
        "tokens_per_step": info["tokens_per_step"],
        "accepted_from": info["accepted_from"],
    }
    if schema is not None:
        try:
            json.loads(text)
            record["parses"] = True
        except json.JSONDecodeError:
            record["parses"] = False
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--max-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    loaded = load_for(None)
    common = dict(model_name="m", cache_entries=1)
    # As `serve` runs them: the library's defaults (tuned beam shape, lookup on) or all off.
    spec = Engine(loaded.base, loaded.tokenizer, loaded.draft, **common)
    plain = Engine(loaded.base, loaded.tokenizer, None, decode_options={"lookup": False}, **common)
    schemas = {
        k: json.loads((EXAMPLES / f"{k}.schema.json").read_text()) for k in ("person", "city")
    }
    records = []
    with ExitStack() as stack:
        apis = {"plain": stack.enter_context(serving(plain)),
                "speculative": stack.enter_context(serving(spec))}  # fmt: skip
        for api in apis.values():  # warm-up: the grammar compiler, the first forward
            ask(api, "Hello", schemas["city"], 8)
        for i, (kind, prompt) in enumerate(PROMPTS):
            order = METHODS[i % len(METHODS) :] + METHODS[: i % len(METHODS)]
            runs = {}
            for m in order:
                schema = schemas[kind] if m.endswith("schema") else None
                runs[m] = ask(apis[m.split("+")[0]], prompt, schema, args.max_tokens)
            same = runs["plain+schema"]["text"] == runs["speculative+schema"]["text"]
            for m in METHODS:
                records.append({"prompt": i, "schema": kind, "method": m,
                                "identical_to_plain": same, **runs[m]})  # fmt: skip
            print(f"prompt {i} ({kind}): " + ", ".join(
                f"{m} {runs[m]['decode_tps']:.1f} tok/s" for m in METHODS) + f"; identical {same}",
                flush=True)  # fmt: skip

    print(f"\n{'method':20s} {'decode tok/s':>12s} {'x plain':>8s} {'client tok/s':>13s} "
          f"{'tok/step':>9s} {'parses':>7s}")  # fmt: skip
    base = statistics.mean(r["decode_tps"] for r in records if r["method"] == "plain")
    for m in METHODS:
        rs = [r for r in records if r["method"] == m]
        tps = statistics.mean(r["decode_tps"] for r in rs)
        client_tps = statistics.mean(r["client_tps"] for r in rs)
        tps_step = statistics.mean(r["tokens_per_step"] for r in rs)
        parses = f"{sum(r.get('parses', False) for r in rs)}/{len(rs)}" if "schema" in m else "-"
        print(f"{m:20s} {tps:12.2f} {tps / base:8.2f} {client_tps:13.2f} {tps_step:9.2f} "
              f"{parses:>7s}")  # fmt: skip
    pairs = [(r["method"], r["decode_tps"]) for r in records]
    ratio = statistics.mean(
        b / a for (ma, a), (mb, b) in zip(pairs[2::4], pairs[3::4], strict=True)
    )
    print(f"speculative+schema / plain+schema per prompt (mean): {ratio:.2f}x")
    print("greedy speculative == plain under the schema:",
          sum(r["identical_to_plain"] for r in records if r["method"] == "plain"), "/", len(PROMPTS))  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"machine": machine(), "records": records}, indent=1))


if __name__ == "__main__":
    main()
