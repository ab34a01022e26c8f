"""Prompt files and sources (one reader for training and the benchmark) and the chat encoding."""

from __future__ import annotations

import json

import pytest

from mlx_redrafter.errors import PromptError
from mlx_redrafter.prompts import (
    encode_chat,
    encode_messages,
    eos_ids,
    load_prompts,
    read_prompts,
    select_categories,
)


def test_reads_alpaca_and_mt_bench(tmp_path):
    alpaca = tmp_path / "a.json"
    alpaca.write_text(
        json.dumps(
            [
                {"instruction": "Sum these.", "input": "1 2", "output": "3"},
                {"instruction": "Say hi.", "input": "", "output": "hi"},
            ]
        )
    )
    got = read_prompts(alpaca)
    assert [p.text for p in got] == ["Sum these.\n\n1 2", "Say hi."]
    assert [p.answer for p in got] == ["3", "hi"]

    bench = tmp_path / "q.jsonl"
    bench.write_text(
        '{"question_id": 81, "turns": ["First turn?", "Second turn?"]}\n\n'
        '{"question_id": 82, "turns": ["Another?", "More?"]}\n'
    )
    got = read_prompts(bench)
    assert [p.text for p in got] == ["First turn?", "Another?"]
    assert got[0].answer is None


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        ("", "is empty"),
        ("   \n", "is empty"),
        ('[{"instruction": "a", ', "not valid JSON"),
        ('{"turns": ["a"]}\n{"turns": ["b"]\n', "not valid JSON Lines \\(line 2"),
        ("[]", "has no prompts"),
        ('[{"question": "a"}]', "none of 'turns'"),
        ("[3]", "expected an object or a string"),
    ],
)
def test_bad_prompt_files_are_named(tmp_path, content, message):
    path = tmp_path / "prompts.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(PromptError, match=message) as err:
        read_prompts(path)
    assert str(path) in str(err.value)


def test_load_prompts(tmp_path):
    mt = load_prompts("mt-bench")
    assert len(mt) == 80 and mt[0].id == "81" and mt[0].text.startswith("Compose an engaging")
    assert len(load_prompts("mt-bench", 5)) == 5
    path = tmp_path / "p.jsonl"
    lines = [
        {"turns": ["first", "second"]},
        {"prompt": "a prompt"},
        {"instruction": "Do it.", "input": "with this"},
        "plain string",
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    texts = [p.text for p in load_prompts(str(path))]
    assert texts == ["first", "a prompt", "Do it.\n\nwith this", "plain string"]
    with pytest.raises(PromptError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.jsonl"))


def test_sources_per_category_and_second_turns():
    mt = load_prompts("mt-bench", per_category=1)
    assert len(mt) == 8 and len({p.category for p in mt}) == 8
    second = load_prompts("mt-bench-2", 3)
    assert [p.source for p in second] == ["mt-bench-2"] * 3
    first = load_prompts("mt-bench", 3)
    assert [p.before for p in second] == [(p.text,) for p in first]
    assert all(p.text != q.text for p, q in zip(second, first, strict=True))
    doc = load_prompts("doc-prompts", per_category=2)
    assert len(doc) == 2 * len({p.category for p in doc}) >= 10
    both = load_prompts("mt-bench,doc-prompts", 2)
    assert [p.source for p in both] == ["mt-bench"] * 2 + ["doc-prompts"] * 2
    with pytest.raises(PromptError, match="per_category"):
        load_prompts("mt-bench", per_category=0)


def test_select_categories():
    prompts = load_prompts("kinds,mt-bench-2", per_category=2)
    kept = select_categories(prompts, " humanities, translate ")
    assert [p.category for p in kept] == ["translate"] * 2 + ["humanities"] * 2
    assert [p.source for p in kept] == ["kinds"] * 2 + ["mt-bench-2"] * 2
    assert select_categories(prompts, None) is prompts
    with pytest.raises(PromptError, match=r"category 'poetry' \(these prompts have: .*humanities"):
        select_categories(prompts, "humanities,poetry")
    with pytest.raises(PromptError, match="no category given"):
        select_categories(prompts, " , ")


def test_bench_sources_read_alpaca_json(tmp_path):
    path = tmp_path / "alpaca_data.json"
    path.write_text(
        json.dumps([{"instruction": "Fix it.", "input": "teh cat", "output": "the cat"}])
    )
    (p,) = load_prompts(str(path))
    assert (p.text, p.answer, p.source) == ("Fix it.\n\nteh cat", "the cat", "alpaca_data.json")


class _Tok:
    """Characters as ids; a template that tags each turn with its role's first letter."""

    def __init__(self, template=True, eos_token_ids=None, eos_token_id=None):
        self.chat_template = "tagged" if template else None
        self.eos_token_ids, self.eos_token_id = eos_token_ids, eos_token_id

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]

    def apply_chat_template(self, messages, add_generation_prompt=True):
        text = "".join(f"{m['role'][0]}:{m['content']};" for m in messages)
        return self.encode(text + ("a:" if add_generation_prompt else ""))


def _text(ids):
    return "".join(chr(i) for i in ids)


def test_chat_encoding_with_and_without_a_template():
    tok = _Tok()
    assert _text(encode_chat(tok, "hi")) == "u:hi;a:"
    assert _text(encode_chat(tok, "hi", system="be brief")) == "s:be brief;u:hi;a:"
    convo = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert _text(encode_messages(tok, convo)) == "u:a;a:b;a:"
    base = _Tok(template=False)
    assert _text(encode_chat(base, "hi", system="ignored")) == "hi"
    assert _text(encode_messages(base, convo)) == "a\nb\n"


def test_eos_ids_prefers_the_wrappers_set_and_falls_back():
    assert eos_ids(_Tok(eos_token_ids=[2, 7], eos_token_id=2)) == {2, 7}
    assert eos_ids(_Tok(eos_token_ids=[], eos_token_id=5)) == {5}
    assert eos_ids(_Tok()) == set()
