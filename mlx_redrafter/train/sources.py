"""The openly licensed text the drafter-training mix is made of (mix.py), read from this
install: the Python standard library's source (parsed with `ast`, never imported), the
reference topic pages in `pydoc_data`, and Stanford Alpaca when a file is given; and which
items are held out of training (`held_out`) for the evaluation set and the bench prompts."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sysconfig
from pathlib import Path

from ..errors import TrainError
from ..prompts import DOC_PROMPTS_FILE

SOURCES = {
    "stdlib": "Python standard library source (docstrings and functions), PSF-2.0",
    "pydoc": "Python language reference topics shipped in pydoc_data, PSF-2.0",
    "math": "templated arithmetic word problems (mlx-redrafter), the project's license",
    "alpaca": "Stanford Alpaca (tatsu-lab/stanford_alpaca), CC BY-NC 4.0, research use only",
}
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "ensurepip"}
MAX_CODE_CHARS = 2500


# Modules whose functions the shipped `edit` and `agent` bench prompts are made of.
BENCH_MODULES = {
    "textwrap",
    "shlex",
    "fnmatch",
    "string",
    "html",
    "difflib",
    "statistics",
    "colorsys",
}


def key_hash(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def held_out(key: str) -> bool:
    """Items kept out of training: one in ten library items (the evaluation set draws from
    these), and everything the shipped bench prompts were made of."""
    source, _, name = key.partition(":")
    if source in ("stdlib", "pydoc") and key_hash(key) % 10 == 0:
        return True
    return source == "stdlib" and name.split(".")[0] in BENCH_MODULES


# ---------------------------------------------------------------------------------------------
# Reading the sources


def stdlib_items(root: str | os.PathLike | None = None) -> tuple[list[dict], list[dict]]:
    """(documents, functions) of the standard library's .py files, parsed, never imported.
    A document: {key, title, text} (module and function docstrings of 300+ characters); a
    function: {key, name, signature, summary, code} (documented top-level functions and
    methods of 4-60 lines)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    docs, funcs = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS & set(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        _module_items(module, source, tree, docs, funcs)
    return docs, funcs


def _module_items(module: str, source: str, tree, docs: list, funcs: list) -> None:
    doc = ast.get_docstring(tree)
    if doc and len(doc) >= 300:
        docs.append({"key": f"stdlib:{module}", "title": f"the {module} module", "text": doc})
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        fdoc = ast.get_docstring(node)
        if not fdoc or node.name.startswith("_"):
            continue
        key = f"stdlib:{module}.{node.name}:{node.lineno}"
        if len(fdoc) >= 300:
            docs.append({"key": key, "title": f"{module}.{node.name}", "text": fdoc})
        lines = node.end_lineno - node.lineno + 1
        code = ast.get_source_segment(source, node)
        if code and 4 <= lines <= 60 and len(code) <= MAX_CODE_CHARS:
            args = ast.unparse(node.args)
            funcs.append(
                {
                    "key": key,
                    "name": node.name,
                    "signature": f"{node.name}({args})",
                    "summary": fdoc.strip().split("\n\n")[0].replace("\n", " "),
                    "code": _dedent(code),
                }
            )


def _dedent(code: str) -> str:
    lines = code.split("\n")
    if len(lines) < 2:
        return code
    indents = [len(ln) - len(ln.lstrip()) for ln in lines[1:] if ln.strip()]
    cut = max(0, min(indents, default=4) - 4)
    return "\n".join([lines[0]] + [ln[cut:] for ln in lines[1:]])


def pydoc_items() -> list[dict]:
    """The reference topic pages: {key, title, text}."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions split the docs out
        return []
    out = []
    for name, text in sorted(topics.items()):
        title = text.strip().split("\n")[0].strip() or name
        out.append({"key": f"pydoc:{name}", "title": title, "text": text.strip()})
    return out


def alpaca_items(path: str | os.PathLike) -> list[dict]:
    """Alpaca's records as {key, instruction, input, output}."""
    path = Path(path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TrainError(f"cannot read Alpaca file {path}: {exc}") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise TrainError(f"{path} is not Alpaca's JSON (a list of objects)")
    out = []
    for i, r in enumerate(records):
        if isinstance(r.get("instruction"), str) and isinstance(r.get("output"), str):
            out.append(
                {
                    "key": f"alpaca:{i}",
                    "instruction": r["instruction"].strip(),
                    "input": str(r.get("input") or "").strip(),
                    "output": r["output"].strip(),
                }
            )
    return out


def bench_alpaca_keys() -> set[str]:
    """The Alpaca records of the shipped doc-prompts bench set (ids `alpaca-<index>`)."""
    keys = set()
    for line in DOC_PROMPTS_FILE.read_text(encoding="utf-8").splitlines():
        if line.strip():
            keys.add("alpaca:" + json.loads(line)["id"].removeprefix("alpaca-"))
    return keys
