"""The prompt mix for drafter training: prompts of many kinds, built from openly licensed text
that every Python install carries, plus Stanford Alpaca when it is given.

Sources (read by sources.py; their licenses are in `SOURCES` and docs/training.md):
  stdlib   the Python standard library's source: module and function docstrings (documents to
           summarise, extract from, answer questions about, translate), functions (code to
           write, edit, explain). PSF-2.0.
  pydoc    the Python reference's topic pages that ship in `pydoc_data` (documents, passages
           for retrieval-augmented questions, long contexts). PSF-2.0.
  math     arithmetic word problems from templates in this file (names and numbers drawn
           from a seeded generator). The project's license.
  alpaca   Stanford Alpaca's instructions and answers (open chat, tasks with an input, second
           turns after an earlier answer, text to translate into English). CC BY-NC 4.0:
           non-commercial research use; leave it out (`alpaca=None`) for other uses.

Each record is a JSON line with `id`, `category` (the kind), `source`, and either `prompt`
or `messages` (a conversation ending in a user turn); records with an answer to relabel
carry it as `output`. One library item in ten (by a hash of its name) is held out for the
evaluation set (data/kinds_eval), as is everything the shipped bench prompts were made of, so
the mix can be rebuilt on any install without leaking evaluation prompts.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from ..errors import TrainError
from ..prompts import KINDS_FILE, read_prompts
from .data import select_prompts
from .sources import (
    BENCH_MODULES,
    SOURCES,
    alpaca_items,
    bench_alpaca_keys,
    held_out,
    pydoc_items,
    stdlib_items,
)

EVAL_FILE = KINDS_FILE
# Records per kind in the default mix (before the evaluation items are dropped); a run takes
# a seeded random selection of the file, so every kind shows up in any prefix of it.
DEFAULT_COUNTS = {
    "chat": 4000,
    "task": 3000,
    "multi-turn": 2500,
    "summarize": 1500,
    "doc-qa": 1500,
    "rag": 1200,
    "extract": 800,
    "long-doc": 500,
    "translate": 1200,
    "math": 1500,
    "code-write": 1200,
    "code-edit": 1500,
    "code-explain": 800,
}
LANGUAGES = ("French", "Spanish", "German", "Italian", "Portuguese", "Dutch")
MAX_DOC_CHARS = 3000  # a document in a prompt; long-doc prompts go to LONG_DOC_CHARS
LONG_DOC_CHARS = 7000  # ~1,800 tokens of English


# ---------------------------------------------------------------------------------------------
# Kinds: each builder draws one record from its source items


def _sentences(text: str) -> list[str]:
    flat = re.sub(r"\s+", " ", text)
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat)
    return [s for s in parts if 40 <= len(s) <= 240 and not re.search(r"[>{}=\[\]_|*]{2}", s)]


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit]
    end = cut.rfind("\n\n")
    return cut[: end if end > limit // 2 else limit].rstrip()


SUMMARIZE = (
    "Summarize the following text in a few sentences.",
    "Write a short summary of this documentation.",
    "Give a one-paragraph summary of the text below.",
    "Summarize the main points of this text as a bulleted list.",
    "Explain the following documentation in plain words for a beginner.",
)
DOC_QUESTIONS = (
    "What is {title} used for, according to the text?",
    "Based on the text, what are the most important things to know about {title}?",
    "According to the documentation above, what happens when something goes wrong?",
    "What does the text say about {title}? Answer in two or three sentences.",
    "Which terms does this text define, and what do they mean?",
)
EXTRACT = (
    "List every function, method or attribute name mentioned in the text.",
    "Extract the parameters described in the text and say what each one does.",
    "List the key facts from this text as bullet points.",
    "Find all the conditions or rules stated in the text and list them.",
)
LONG_DOC = (
    "Read the document below and summarize it section by section.",
    "Read the document below. Then explain its three most important points.",
    "Here is a long document. Write an outline of it.",
)
CODE_EDIT = (
    "Add type hints to this Python function.",
    "Rewrite this function to make it easier to read.",
    "Add comments to this code explaining each step.",
    "Rename the variables in this function to more descriptive names.",
    "Write unit tests for this function using pytest.",
    "Convert this Python function to JavaScript.",
    "Refactor this function into smaller helper functions.",
    "Add input validation to this function and raise ValueError on bad input.",
    "Rewrite this function without changing its behaviour, and keep its docstring.",
)
CODE_EXPLAIN = (
    "Explain what this code does, step by step.",
    "What does this function return, and when? Explain briefly.",
    "Review this code: point out possible bugs or edge cases.",
)
FOLLOW_UPS = (
    "Can you make that shorter?",
    "Explain that to a ten-year-old.",
    "Give me one concrete example.",
    "Turn your answer into a bulleted list.",
    "Translate your answer into {lang}.",
    "What are the limitations of what you said?",
    "Rewrite your answer in a more formal tone.",
    "Thanks. Can you add two more points?",
    "Summarize your answer in one sentence.",
)


def _doc_prompt(rng: random.Random, doc: dict, kind: str) -> dict:
    body = _cut(doc["text"], LONG_DOC_CHARS if kind == "long-doc" else MAX_DOC_CHARS)
    if kind == "summarize":
        ask = rng.choice(SUMMARIZE)
        return {"prompt": f"{ask}\n\n{body}" if rng.random() < 0.5 else f"{body}\n\n{ask}"}
    if kind == "doc-qa":
        ask = rng.choice(DOC_QUESTIONS).format(title=doc["title"])
        return {"prompt": f"{body}\n\n{ask}"}
    if kind == "extract":
        return {"prompt": f"{rng.choice(EXTRACT)}\n\n{body}"}
    return {"prompt": f"{rng.choice(LONG_DOC)}\n\n{body}"}


def _rag_prompt(rng: random.Random, docs: list[dict]) -> dict:
    picked = rng.sample(docs, 3)
    target = rng.randrange(3)
    passages = "\n\n".join(
        f"[{i + 1}] {d['title']}\n{_cut(d['text'], 1200)}" for i, d in enumerate(picked)
    )
    question = rng.choice(DOC_QUESTIONS).format(title=picked[target]["title"])
    prompt = (
        "Answer the question using only the passages below. Cite the passage you use "
        f"as [n].\n\n{passages}\n\nQuestion: {question}"
    )
    return {"prompt": prompt, "keys": [d["key"] for d in picked]}


def _translate_prompt(rng: random.Random, sentence: str) -> dict:
    lang = rng.choice(LANGUAGES)
    form = rng.choice(
        (
            "Translate into {lang}: {s}",
            "Translate the following sentence to {lang}.\n\n{s}",
            'How do you say this in {lang}?\n"{s}"',
        )
    )
    return {"prompt": form.format(lang=lang, s=sentence)}


def _code_prompt(rng: random.Random, fn: dict, kind: str) -> dict:
    if kind == "code-write":
        prompt = (
            f"Write a Python function `{fn['signature']}`.\n\nWhat it should do: {fn['summary']}"
        )
        return {"prompt": prompt, "output": fn["code"]}
    ask = rng.choice(CODE_EDIT if kind == "code-edit" else CODE_EXPLAIN)
    return {"prompt": f"{ask}\n\n```python\n{fn['code']}\n```"}


def _alpaca_prompt(rng: random.Random, r: dict, kind: str) -> dict:
    text = f"{r['instruction']}\n\n{r['input']}" if r["input"] else r["instruction"]
    if kind != "multi-turn":
        return {"prompt": text, "output": r["output"]}
    follow = rng.choice(FOLLOW_UPS).format(lang=rng.choice(LANGUAGES))
    return {
        "messages": [
            {"role": "user", "content": text},
            {"role": "assistant", "content": r["output"]},
            {"role": "user", "content": follow},
        ]
    }


NAMES = (
    "Ana",
    "Ben",
    "Chen",
    "Dara",
    "Elif",
    "Farid",
    "Grace",
    "Hugo",
    "Ines",
    "Jamal",
    "Kofi",
    "Lena",
    "Mateo",
    "Nadia",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sven",
    "Tariq",
    "Uma",
    "Yuki",
)
ITEMS = (
    "apples",
    "books",
    "pencils",
    "stickers",
    "cookies",
    "marbles",
    "stamps",
    "eggs",
    "oranges",
    "cards",
    "shells",
    "bottles",
)
# (template, answer) pairs: {a} {b} {c} are drawn from 2..60, {p} a price from 1..20.
MATH = (
    (
        "{n} has {a} {x}. {m} gives {n} {b} more, then {n} gives away {c}. How many {x} does {n} "
        "have now?",
        "a + b - c",
    ),
    ("A box holds {a} {x}. How many {x} are in {b} boxes?", "a * b"),
    (
        "{n} buys {a} {x} at ${p} each and pays with a ${big} bill. How much change does {n} get?",
        "big - a * p",
    ),
    ("{n} reads {a} pages a day. How many days does {n} need for a book of {ab} pages?", "ab / a"),
    (
        "A train travels at {a} km per hour for {b} hours, then at {c} km per hour for 2 hours. "
        "How far does it travel in total?",
        "a * b + c * 2",
    ),
    ("{n} and {m} share {ab} {x} equally. How many does each get?", "ab / 2"),
    (
        "The price of a jacket is ${a}0. It is on sale for {pct}% off. What is the sale price?",
        "a*10*(1-pct/100)",
    ),
    (
        "A rectangle is {a} cm long and {b} cm wide. What are its area and its perimeter?",
        "a*b, 2*(a+b)",
    ),
    ("{n} saves ${a} every week. After {b} weeks {n} spends ${c}. How much is left?", "a * b - c"),
    (
        "There are {a} students in a class and {b} of them wear glasses. What fraction of the "
        "class wears glasses?",
        "b / a",
    ),
    (
        "{n} is {a} years old. {m} is {b} years older than {n}. How old will {m} be in {c} years?",
        "a + b + c",
    ),
    ("A recipe needs {b} eggs for {a} people. How many eggs are needed for {ab2} people?", "b * 2"),
)


def _math_prompt(rng: random.Random) -> dict:
    template, _ = rng.choice(MATH)
    a, b, c = rng.randint(2, 60), rng.randint(2, 60), rng.randint(1, 20)
    n, m = rng.sample(NAMES, 2)
    p = rng.randint(1, 20)
    text = template.format(
        n=n,
        m=m,
        x=rng.choice(ITEMS),
        a=a,
        b=b,
        c=c,
        p=p,
        ab=a * b,
        ab2=a * 2,
        big=(a * p // 10 + 1) * 10,
        pct=rng.choice((10, 15, 20, 25, 30, 40, 50)),
    )
    style = rng.choice(("", " Show your work.", " Explain step by step.", " Answer briefly."))
    return {"prompt": text + style}


# ---------------------------------------------------------------------------------------------
# The mix


def build_mix(
    out: str | os.PathLike,
    alpaca: str | os.PathLike | None = None,
    counts: dict[str, int] | None = None,
    seed: int = 0,
    stdlib_root: str | os.PathLike | None = None,
) -> dict:
    """Write the prompt mix to `out` (JSON Lines; written whole to a temporary file, then
    renamed) and return its manifest: the count of each kind and source, the sources'
    licenses, the Python version whose library was read. Without `alpaca` the kinds that
    need it are left out."""
    counts = dict(DEFAULT_COUNTS if counts is None else counts)
    unknown = sorted(set(counts) - set(DEFAULT_COUNTS))
    if unknown:
        raise TrainError(f"unknown prompt kinds: {', '.join(unknown)}")
    rng = random.Random(seed)
    banned = bench_alpaca_keys()
    answered = None if alpaca is None else alpaca_items(alpaca)  # bad files fail first
    docs, funcs = stdlib_items(stdlib_root)
    # Held out by key, and by text too: on another Python version the keys (which carry line
    # numbers) differ, but a text that an evaluation prompt quotes still stays out.
    shown = _eval_prompts()
    docs = [d for d in docs + pydoc_items() if not held_out(d["key"]) and not _quoted(d, shown)]
    funcs = [f for f in funcs if not held_out(f["key"]) and not _quoted(f, shown)]
    records = list(_alpaca_records(answered, banned, counts, rng))
    records += _library_records(rng, docs, funcs, counts)
    records += [
        {**_math_prompt(rng), "category": "math", "source": "math"}
        for _ in range(counts.get("math", 0))
    ]
    for i, r in enumerate(records):
        r["id"] = f"{r['category']}-{i}"
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    return {
        "file": out.name,
        "records": len(records),
        "seed": seed,
        "kinds": dict(Counter(r["category"] for r in records)),
        "sources": {s: SOURCES[s] for s in sorted({r["source"] for r in records})},
        "python": sys.version.split()[0],
        "held_out": "stdlib/pydoc items with sha256(key) % 10 == 0, the bench prompts' sources",
    }


def _eval_prompts() -> list[str]:
    if not EVAL_FILE.exists():
        return []
    lines = EVAL_FILE.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["prompt"] for line in lines if line.strip()]


def _quoted(item: dict, prompts: list[str]) -> bool:
    """Whether an evaluation prompt quotes this document's text or function's code."""
    text = (item.get("code") or item["text"]).strip()
    return any(text in p for p in prompts)


def _alpaca_records(alpaca, banned: set[str], counts: dict, rng: random.Random) -> Iterator[dict]:
    """Alpaca's kinds (from alpaca_items): chat (no input), task (with input), multi-turn, and
    its non-English answers to translate back into English."""
    if alpaca is None:
        return
    items = [r for r in alpaca if r["key"] not in banned]
    rng.shuffle(items)
    foreign = [
        r
        for r in items
        if re.search(r"translat", r["instruction"], re.I)
        and not re.search(r"english", r["instruction"], re.I)
        and len(r["output"]) > 20
    ]
    plain = [r for r in items if r not in foreign]
    pools = {"chat": [r for r in plain if not r["input"]], "task": [r for r in plain if r["input"]]}
    pools["multi-turn"] = pools["chat"][counts.get("chat", 0) :]
    for kind in ("chat", "task", "multi-turn"):
        for r in pools[kind][: counts.get(kind, 0)]:
            yield {**_alpaca_prompt(rng, r, kind), "category": kind, "source": "alpaca"}
    for r in foreign[: counts.get("translate", 0) // 4]:
        yield {
            "prompt": f"Translate into English: {r['output']}",
            "category": "translate",
            "source": "alpaca",
        }


def _library_records(rng: random.Random, docs, funcs, counts: dict) -> Iterator[dict]:
    """The kinds built from the standard library and the reference topics."""
    long_docs = [d for d in docs if len(d["text"]) >= 2500] or docs
    for kind in ("summarize", "doc-qa", "extract", "long-doc"):
        pool = long_docs if kind == "long-doc" else docs
        for _ in range(counts.get(kind, 0) if pool else 0):
            doc = rng.choice(pool)
            source = doc["key"].split(":")[0]
            yield {**_doc_prompt(rng, doc, kind), "category": kind, "source": source}
    for _ in range(counts.get("rag", 0) if len(docs) >= 3 else 0):
        rag = _rag_prompt(rng, docs)
        yield {**rag, "category": "rag", "source": rag["keys"][0].split(":")[0]}
    sentences = [s for d in docs for s in _sentences(d["text"])]
    for _ in range(counts.get("translate", 0) * 3 // 4 if sentences else 0):
        yield {
            **_translate_prompt(rng, rng.choice(sentences)),
            "category": "translate",
            "source": "stdlib",
        }
    for kind in ("code-write", "code-edit", "code-explain"):
        for _ in range(counts.get(kind, 0) if funcs else 0):
            yield {
                **_code_prompt(rng, rng.choice(funcs), kind),
                "category": kind,
                "source": "stdlib",
            }


# ---------------------------------------------------------------------------------------------
# The evaluation set (shipped as data/kinds_eval; this rebuilds it)

EVAL_KINDS = (
    "summarize",
    "doc-qa",
    "extract",
    "long-doc",
    "rag",
    "translate",
    "code-write",
    "code-edit",
    "code-explain",
    "math",
)
# Word problems of other shapes than the training templates.
MATH_EVAL = (
    "A farmer has 23 cows and buys 3 times as many sheep. He then sells 14 sheep. How many "
    "animals does he have now?",
    "A bakery sells muffins at $3 each or 4 for $10. What is the cheapest way to buy 10 "
    "muffins, and what does it cost?",
    "A tank holds 480 litres. It is filled at 12 litres a minute and drains at 4 litres a "
    "minute. How long does it take to fill the empty tank?",
    "Three friends split a bill of $84. One of them pays $10 more than each of the other two, "
    "who pay the same. How much does each pay?",
)


def build_eval(
    out: str | os.PathLike,
    per_kind: int = 4,
    seed: int = 2026,
    stdlib_root: str | os.PathLike | None = None,
) -> int:
    """Write the evaluation set: `per_kind` prompts of each of EVAL_KINDS, made only of held-out
    library items (and MATH_EVAL); each record lists its source items in `keys`."""
    rng = random.Random(seed)
    docs, funcs = stdlib_items(stdlib_root)
    docs = [d for d in docs + pydoc_items() if _eval_item(d["key"])]
    funcs = [f for f in funcs if _eval_item(f["key"])]
    records = []
    for kind in EVAL_KINDS:
        used: set[str] = set()
        while sum(r["category"] == kind for r in records) < per_kind:
            record = _eval_record(rng, kind, docs, funcs, len(used))
            if not used & set(record["keys"]):  # every prompt of a kind from other items
                used.update(record["keys"])
                records.append({**record, "category": kind})
    for i, r in enumerate(records):
        r["id"] = f"{r['category']}-{i}"
        r["source"] = "kinds"
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")
    os.replace(tmp, out)
    return len(records)


def _eval_item(key: str) -> bool:
    source, _, name = key.partition(":")
    return held_out(key) and name.split(".")[0] not in BENCH_MODULES


def _eval_record(rng: random.Random, kind: str, docs: list, funcs: list, made: int) -> dict:
    if kind == "math":
        return {"prompt": MATH_EVAL[made % len(MATH_EVAL)], "keys": [f"eval:math-{made}"]}
    if kind == "rag":
        return _rag_prompt(rng, docs)
    if kind == "translate":
        doc = rng.choice([d for d in docs if _sentences(d["text"])])
        return {**_translate_prompt(rng, rng.choice(_sentences(doc["text"]))), "keys": [doc["key"]]}
    if kind.startswith("code-"):
        fn = rng.choice(funcs)
        record = _code_prompt(rng, fn, kind)
        record.pop("output", None)
        return {**record, "keys": [fn["key"]]}
    pool = [d for d in docs if len(d["text"]) >= 2500] if kind == "long-doc" else docs
    doc = rng.choice(pool)
    return {**_doc_prompt(rng, doc, kind), "keys": [doc["key"]]}


def data_mix(prompts_file: str | os.PathLike, num_prompts: int | None, data) -> dict:
    """What a data set is made of, by kind and source: sequences and response tokens (for
    training_log.json), with each known source's license."""
    prompts = read_prompts(prompts_file)
    selection = select_prompts(prompts, num_prompts)
    kinds: dict[str, list[int]] = {}
    sources: dict[str, list[int]] = {}
    for j in range(data.num_sequences):
        p = prompts[int(selection[int(data.prompt_index[j])])]
        n = len(data.tokens[j]) - 1
        for table, name in ((kinds, p.category or "-"), (sources, p.source or "-")):
            row = table.setdefault(name, [0, 0])
            row[0] += 1
            row[1] += n
    return {
        "kinds": _table(kinds),
        "sources": _table(sources),
        "licenses": {s: SOURCES[s] for s in sorted(sources) if s in SOURCES},
    }


def _table(rows: dict[str, list[int]]) -> dict:
    return {k: {"sequences": v[0], "tokens": v[1]} for k, v in sorted(rows.items())}
