"""The edit and agent prompt sources shipped with the package: their shape, as their SOURCE.md
files describe it."""

import mlx_redrafter  # noqa: F401  (first: loads the BLAS before mlx.core)

# isort: split
import collections
import json
from pathlib import Path

from mlx_redrafter.prompts import AGENT, EDIT, SOURCES, load_prompts

DATA = Path(mlx_redrafter.__file__).parent / "data"


def test_edit_prompts():
    rows = [
        json.loads(x)
        for x in (DATA / "edit_prompts" / "prompts.jsonl").read_text().split("\n")
        if x
    ]
    assert collections.Counter(r["category"] for r in rows) == {
        "hints": 4, "docstring": 4, "rename": 4, "guard": 4
    }  # fmt: skip
    assert len({r["id"] for r in rows}) == 16
    for r in rows:
        instruction, code = r["prompt"].split("\n\n", 1)
        assert instruction.startswith("Rewrite this function: ")
        assert instruction.endswith("Reply with the complete function in a code block.")
        assert code.startswith("```python\ndef ") and code.endswith("```")
        assert r["origin"].startswith("CPython 3.11 Lib/")
    prompts = load_prompts(EDIT)
    assert len(prompts) == 16 and all(p.source == EDIT and not p.before for p in prompts)
    assert (DATA / "edit_prompts" / "SOURCE.md").is_file()
    assert "PYTHON SOFTWARE FOUNDATION LICENSE" in (DATA / "edit_prompts" / "LICENSE").read_text()


def test_agent_prompts():
    prompts = load_prompts(AGENT)
    assert collections.Counter(p.category for p in prompts) == {
        "read-code": 4, "listing": 4, "tool-json": 4
    }  # fmt: skip
    for p in prompts:
        assert p.source == AGENT and p.before  # earlier turns, answered by the model first
        assert p.text.startswith(("$ ", "Tool result"))  # a tool's output fed back
    assert len(load_prompts(AGENT, per_category=1)) == 3
    assert "PYTHON SOFTWARE FOUNDATION LICENSE" in (DATA / "agent_prompts" / "LICENSE").read_text()
    assert EDIT in SOURCES and AGENT in SOURCES
