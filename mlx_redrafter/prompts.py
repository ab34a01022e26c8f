"""Prompts: one `Prompt`, one reader for prompt files, the shipped prompt sources, the chat
encoding and the end-of-sequence ids. Training, the benchmark, the CLI, the chat session and
the server all take their prompts and their chat encoding from here.

A prompt file is a JSON array (Alpaca's `alpaca_data.json`) or JSON Lines (MT-Bench's
`question.jsonl`). A record is a string, or an object with `messages` (a conversation of
{role, content} objects ending in the user turn to answer), `turns` (the first is the prompt,
the second an optional follow-up), `prompt`, `text`, or `instruction` with an optional `input`
(Alpaca; the instruction and input are joined by a blank line). An `output` or `answer` string
is kept as the record's own answer (the `dataset` training target reads it).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import PromptError

DATA_DIR = Path(__file__).resolve().parent / "data"
MT_BENCH = "mt-bench"  # MT-Bench's first turns
MT_BENCH_2 = "mt-bench-2"  # second turns, after the model's own greedy first answer
DOC_PROMPTS = "doc-prompts"  # prompts that carry a document (Alpaca items with an input)
EDIT = "edit"  # a standard-library function + an edit instruction; the answer is the whole
AGENT = "agent"  # multi-turn agent loops: tool outputs fed back, answers that quote them
KINDS = "kinds"  # the drafter's evaluation set: many kinds, held out of the training mix
MT_BENCH_FILE = DATA_DIR / "mt_bench" / "question.jsonl"
DOC_PROMPTS_FILE = DATA_DIR / "doc_prompts" / "prompts.jsonl"
EDIT_FILE = DATA_DIR / "edit_prompts" / "prompts.jsonl"
AGENT_FILE = DATA_DIR / "agent_prompts" / "prompts.jsonl"
KINDS_FILE = DATA_DIR / "kinds_eval" / "prompts.jsonl"
SOURCES = (MT_BENCH, MT_BENCH_2, DOC_PROMPTS, EDIT, AGENT, KINDS)


@dataclass
class Prompt:
    id: str
    text: str
    category: str | None = None
    before: tuple[str, ...] = ()  # earlier user turns, each answered by the model first
    source: str | None = None  # one of SOURCES or the file's name
    answer: str | None = None  # the file's own answer (Alpaca `output`), if any
    turns: tuple[str, ...] = ()  # every user turn the record holds
    history: tuple[dict, ...] = ()  # earlier messages ({role, content}) answered in the file

    def messages(self) -> list[dict]:
        """The conversation to answer: the file's earlier messages, then this prompt."""
        return [*self.history, {"role": "user", "content": self.text}]


# ---------------------------------------------------------------------------------------------
# Reading


def _record(record: Any, where: str, index: int) -> Prompt:
    if isinstance(record, str):
        return Prompt(str(index), record, turns=(record,))
    if not isinstance(record, dict):
        raise PromptError(f"{where} is a {type(record).__name__}, expected an object or a string")
    pid = str(record.get("question_id", record.get("id", index)))
    category = record.get("category") if isinstance(record.get("category"), str) else None
    prompt = _fields(record, where, pid, category)
    prompt.source = record.get("source") if isinstance(record.get("source"), str) else None
    return prompt


def _fields(record: dict, where: str, pid: str, category: str | None) -> Prompt:
    answer = record.get("output", record.get("answer"))
    answer = answer if isinstance(answer, str) else None
    if "messages" in record:
        return _messages_record(record["messages"], where, pid, category, answer)
    if "turns" in record:
        turns = record["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise PromptError(f"{where} has 'turns' but not a list of strings")
        return Prompt(pid, turns[0], category, answer=answer, turns=tuple(turns))
    for key in ("prompt", "text"):
        if key in record:
            if not isinstance(record[key], str):
                raise PromptError(f"{where} has a non-string '{key}'")
            return Prompt(pid, record[key], category, answer=answer, turns=(record[key],))
    if "instruction" in record:
        instruction, extra = record["instruction"], record.get("input") or ""
        if not isinstance(instruction, str) or not isinstance(extra, str):
            raise PromptError(f"{where} has a non-string 'instruction' or 'input'")
        text = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return Prompt(pid, text, category, answer=answer, turns=(text,))
    raise PromptError(
        f"{where} has none of 'turns', 'prompt', 'text' or 'instruction' "
        f"(keys: {', '.join(sorted(record)) or 'none'})"
    )


def _messages_record(messages, where: str, pid: str, category, answer) -> Prompt:
    """A conversation ({role, content} objects) that ends in the user turn to answer."""
    ok = (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict)
            and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str)
            for m in messages
        )
    )
    if not ok or messages[-1]["role"] != "user":
        raise PromptError(
            f"{where} has 'messages' but not a list of {{role, content}} objects "
            "ending in a user turn"
        )
    last = messages[-1]["content"]
    users = tuple(m["content"] for m in messages if m["role"] == "user")
    history = tuple({"role": m["role"], "content": m["content"]} for m in messages[:-1])
    return Prompt(pid, last, category, answer=answer, turns=users, history=history)


def read_prompts(path: str | os.PathLike, num_prompts: int | None = None) -> list[Prompt]:
    """The prompts of a JSON or JSON Lines file (see the module's docstring), in file order,
    empty ones dropped; the first `num_prompts` if given. PromptError names the file (and the
    line or record) of anything that cannot be read."""
    path = Path(path).expanduser()
    if not path.exists():
        raise PromptError(f"prompt file {path} does not exist")
    if not path.is_file():
        raise PromptError(f"prompt file {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PromptError(f"prompt file {path} is not UTF-8 text ({exc.reason})") from None
    if not text.strip():
        raise PromptError(f"prompt file {path} is empty")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PromptError(
                f"prompt file {path} is not valid JSON (line {exc.lineno}: {exc.msg})"
            ) from None
        prompts = [_record(r, f"{path}: record {i}", i) for i, r in enumerate(records)]
    else:
        prompts = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PromptError(
                    f"prompt file {path} is not valid JSON Lines (line {lineno}: {exc.msg})"
                ) from None
            prompts.append(_record(record, f"{path}: line {lineno}", lineno))
            if num_prompts is not None and len(prompts) >= num_prompts:
                break
    prompts = [p for p in prompts if p.text.strip()][:num_prompts]
    if not prompts:
        raise PromptError(f"prompt file {path} has no prompts")
    return prompts


def load_prompts(
    source: str = MT_BENCH, num_prompts: int | None = None, per_category: int | None = None
) -> list[Prompt]:
    """Prompts from one or more comma-separated sources: `mt-bench` (first turns),
    `mt-bench-2` (second turns; the first turn is in `before`, to be answered by the model),
    `doc-prompts` (document-carrying prompts shipped with the package), `edit` (a function
    and an edit instruction), `agent` (the last turn of an agent loop; the earlier turns are in
    `before`), `kinds` (the drafter's evaluation set of many kinds) or a prompt file.
    `num_prompts` applies to each source; `per_category` keeps the first K of each category."""
    if per_category is not None:
        if per_category < 1:
            raise PromptError(f"per_category must be >= 1, got {per_category}")
        seen: dict[tuple, int] = {}
        kept = []
        for p in load_prompts(source):
            key = (p.source, p.category)
            seen[key] = seen.get(key, 0) + 1
            if seen[key] <= per_category:
                kept.append(p)
        return kept[:num_prompts] if num_prompts is not None else kept
    if "," in source:
        return [p for part in source.split(",") if part for p in load_prompts(part, num_prompts)]
    if source == MT_BENCH_2:
        prompts = []
        for p in read_prompts(MT_BENCH_FILE):
            if len(p.turns) < 2:
                raise PromptError(f"{MT_BENCH_FILE}: question {p.id} has no second turn")
            prompts.append(Prompt(f"{p.id}-2", p.turns[1], p.category, (p.turns[0],)))
        prompts = prompts[:num_prompts]
    elif source == AGENT:
        prompts = [
            Prompt(p.id, p.turns[-1], p.category, p.turns[:-1])
            for p in read_prompts(AGENT_FILE, num_prompts)
        ]
    elif source in (MT_BENCH, DOC_PROMPTS, EDIT, KINDS):
        files = {
            MT_BENCH: MT_BENCH_FILE,
            DOC_PROMPTS: DOC_PROMPTS_FILE,
            EDIT: EDIT_FILE,
            KINDS: KINDS_FILE,
        }
        prompts = read_prompts(files[source], num_prompts)
    else:
        prompts = read_prompts(source, num_prompts)
    for p in prompts:
        p.source = source if source in SOURCES else Path(source).name
    return prompts


def select_categories(prompts: list[Prompt], categories: str | None) -> list[Prompt]:
    """The prompts of the comma-separated `categories` (all of them for None), in their
    order; a category none of the prompts has is a PromptError naming the ones they have."""
    if categories is None:
        return prompts
    wanted = {c.strip() for c in categories.split(",") if c.strip()}
    if not wanted:
        raise PromptError(f"no category given in {categories!r}")
    known = {p.category for p in prompts}
    unknown = sorted(wanted - known)
    if unknown:
        raise PromptError(
            f"no prompts of category {', '.join(map(repr, unknown))} "
            f"(these prompts have: {', '.join(sorted(map(str, known)))})"
        )
    return [p for p in prompts if p.category in wanted]


# ---------------------------------------------------------------------------------------------
# Encoding


def as_ids(out) -> list[int]:
    """Token ids from what a tokenizer returns (a list, an array, a BatchEncoding, a batch of one)."""
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], list):
        out = out[0]
    return [int(t) for t in out]


def has_template(tokenizer) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def encode_plain(tokenizer, text: str) -> list[int]:
    """`text`'s ids without the special tokens a tokenizer may add around it."""
    try:
        return as_ids(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:
        return as_ids(tokenizer.encode(text))


def encode_messages(tokenizer, messages: list[dict]) -> list[int]:
    """A conversation's ids in the model's chat template with the generation prompt. Without
    a template (a base model) the turns are plain lines of text, the last one ended too."""
    if not has_template(tokenizer):
        return as_ids(tokenizer.encode("".join(m["content"] + "\n" for m in messages)))
    return as_ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def encode_chat(tokenizer, text: str, system: str | None = None) -> list[int]:
    """One prompt as a user turn (after an optional system message), ready for the answer.
    Without a chat template the prompt's text is encoded as it is."""
    if not has_template(tokenizer):
        return as_ids(tokenizer.encode(text))
    system_turn = [{"role": "system", "content": system}] if system else []
    return encode_messages(tokenizer, system_turn + [{"role": "user", "content": text}])


def eos_ids(tokenizer) -> set[int]:
    """The ids that end generation: the tokenizer's `eos_token_ids` (mlx-lm's wrapper folds in
    generation_config.json), else its `eos_token_id`; empty if it has neither."""
    ids = {int(i) for i in getattr(tokenizer, "eos_token_ids", None) or ()}
    if not ids and getattr(tokenizer, "eos_token_id", None) is not None:
        ids = {int(tokenizer.eos_token_id)}
    return ids


def main_eos(tokenizer) -> int | None:
    """The one end-of-sequence id to append to a training answer."""
    eid = getattr(tokenizer, "eos_token_id", None)
    return int(eid) if eid is not None else min(eos_ids(tokenizer), default=None)
