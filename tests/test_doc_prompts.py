"""The packaged document-carrying prompt set: its shape, as SOURCE.md describes it."""

import mlx_redrafter  # noqa: F401  (first: loads the BLAS before mlx.core)

# isort: split
import collections
import json
from pathlib import Path

import numpy as np

from mlx_redrafter.prompts import load_prompts

FOLDER = Path(mlx_redrafter.__file__).parent / "data" / "doc_prompts"
COUNTS = {"code": 12, "translate": 10, "summarize": 12, "extract": 12, "rewrite": 12, "qa": 12}
ALPACA_RECORDS = 52002
DRAFTER_TRAINING_PROMPTS = 3840


def test_prompt_file_matches_its_description():
    rows = [json.loads(line) for line in (FOLDER / "prompts.jsonl").read_text().splitlines()]
    assert collections.Counter(r["category"] for r in rows) == COUNTS
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert set(r) == {"id", "category", "prompt", "source"} and r["source"] == "alpaca"
        instruction, document = r["prompt"].split("\n\n", 1)
        assert instruction.strip() == instruction and document.strip() == document
    # None of them is a prompt the shipped drafter was trained on.
    trained = np.random.default_rng(0).permutation(ALPACA_RECORDS)[:DRAFTER_TRAINING_PROMPTS]
    indices = {int(r["id"].removeprefix("alpaca-")) for r in rows}
    assert indices.isdisjoint(trained.tolist())
    assert (FOLDER / "SOURCE.md").is_file() and (FOLDER / "DATA_LICENSE").is_file()


def test_bench_reads_it():
    prompts = load_prompts(str(FOLDER / "prompts.jsonl"))
    assert len(prompts) == sum(COUNTS.values())
    assert prompts[0].id.startswith("alpaca-") and prompts[0].category == "code"
