"""Structured output and logprobs through the server over real HTTP with the `openai` client:
json_schema answers validate and equal constrained plain decoding, streamed equals whole,
logprobs equal plain decoding's, bad formats are 400s naming response_format, and the prompt
cache serves constrained and free requests alike."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import anthropic
import httpx
import jsonschema
import openai
import pytest
from helpers import assert_close, write_tiny_drafter, write_tiny_model
from server_helpers import client, running, user
from test_constrain import generated_schemas

from mlx_redrafter.constrain import JsonGrammar
from mlx_redrafter.drafter import load_drafter
from mlx_redrafter.generation import stream_generate
from mlx_redrafter.loading import load
from mlx_redrafter.server import Engine

MAX_TOKENS = 300
SCHEMAS = generated_schemas(10, seed=24)
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


def json_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny model with a real BPE tokenizer and a random drafter; its grammar."""
    root = tmp_path_factory.mktemp("formats")
    model_dir = write_tiny_model(root / "model")
    write_tiny_drafter(model_dir, root / "drafter")
    model, tokenizer = load(model_dir)
    drafter = load_drafter(root / "drafter", base=model)
    return model, tokenizer, drafter, JsonGrammar.for_model(model, tokenizer)


@pytest.fixture(scope="module")
def url(tiny):
    model, tokenizer, drafter, _ = tiny
    # Speculative (drafter and lookup) serving, compared below with plain decoding.
    with running(Engine(model, tokenizer, drafter, model_name="tiny")) as base:
        yield base


def chat_ids(tokenizer, messages) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def plain(tiny, ids, max_tokens=MAX_TOKENS, schema=None, logprobs=None):
    """Plain greedy decoding (no drafter, no lookup), constrained when a schema is given."""
    model, tokenizer, _, grammar = tiny
    constraint = None if schema is None else grammar.json_schema(schema)
    return list(
        stream_generate(
            model, tokenizer, ids, None, max_tokens=max_tokens, lookup=False,
            constraint=constraint, logprobs=logprobs,
        )
    )  # fmt: skip


def text_of(responses) -> str:
    return "".join(r.text for r in responses)


# ---------------------------------------------------------------------------------------------
# response_format


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_json_schema_answers_validate_and_equal_constrained_plain_decoding(url, tiny, index):
    schema = SCHEMAS[index]
    messages = user(f"Describe item {index} as JSON.")
    resp = client(url).chat.completions.create(
        model="tiny", messages=messages, max_tokens=MAX_TOKENS,
        response_format=json_format(schema),
    )  # fmt: skip
    content = resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "stop", content
    jsonschema.validate(json.loads(content), schema)
    expected = plain(tiny, chat_ids(tiny[1], messages), schema=schema)
    assert content == text_of(expected)
    assert resp.usage.completion_tokens == len(expected)


def test_streamed_constrained_answer_with_logprobs_equals_the_whole_one(url):
    api = client(url)
    kwargs = dict(
        model="tiny", messages=user("Who are you?"), max_tokens=MAX_TOKENS,
        response_format=json_format(PERSON), logprobs=True, top_logprobs=2,
    )  # fmt: skip
    whole = api.chat.completions.create(**kwargs)
    chunks = list(api.chat.completions.create(**kwargs, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    jsonschema.validate(json.loads(content), PERSON)
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]  # fmt: skip
    content = whole.choices[0].logprobs.content
    # The second request reuses the first's prompt cache: the same tokens, floats as close
    # as another prefill split gives.
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in content]
    assert_close([e.logprob for e in streamed], [e.logprob for e in content])
    assert [[t.token for t in e.top_logprobs] for e in streamed] == [
        [t.token for t in e.top_logprobs] for e in content
    ]
    assert len(streamed) == whole.usage.completion_tokens
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and not any(finishes[:-1])


def test_json_object_answers_are_objects(url):
    resp = client(url).chat.completions.create(
        model="tiny", messages=user("Give me a JSON object."), max_tokens=MAX_TOKENS,
        response_format={"type": "json_object"},
    )  # fmt: skip
    content = resp.choices[0].message.content
    assert content.startswith("{")
    if resp.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    text = client(url).chat.completions.create(
        model="tiny", messages=user("hello"), max_tokens=4, response_format={"type": "text"}
    )
    assert text.choices[0].message.content is not None


def test_concurrent_requests_each_get_their_own_schema(url, tiny):
    """Requests with different schemas queued together: each answer is its own schema's."""
    schemas = [SCHEMAS[0], PERSON, SCHEMAS[1], None]
    messages = user("Concurrent JSON, please.")

    def one(schema):
        fmt = {} if schema is None else {"response_format": json_format(schema)}
        resp = client(url).chat.completions.create(
            model="tiny", messages=messages, max_tokens=MAX_TOKENS, **fmt
        )
        return resp.choices[0].message.content

    with ThreadPoolExecutor(len(schemas)) as pool:
        answers = list(pool.map(one, schemas))
    ids = chat_ids(tiny[1], messages)
    for schema, answer in zip(schemas, answers, strict=True):
        assert answer == text_of(plain(tiny, ids, schema=schema))
        if schema is not None:
            jsonschema.validate(json.loads(answer), schema)


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_schema", "json_schema": {"name": "x"}},  # no schema
        {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": "{not json"}},
        {"type": "yaml"},
    ],
)
def test_bad_response_formats_are_400s_naming_response_format(url, response_format):
    with pytest.raises(openai.BadRequestError) as info:
        client(url).chat.completions.create(
            model="tiny", messages=user("hi"), max_tokens=4, response_format=response_format
        )
    assert info.value.body["param"].startswith("response_format"), info.value.body
    assert "response_format" in info.value.body["message"]
    assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"


def test_an_engine_without_constraints_refuses_formats_but_serves_text(tiny):
    model, tokenizer, _, _ = tiny
    engine = Engine(model, tokenizer, None, model_name="tiny")
    engine.no_constraints = "not served while the model is split over ranks"
    with running(engine) as base:
        with pytest.raises(openai.BadRequestError) as info:
            client(base).chat.completions.create(
                model="tiny", messages=user("hi"), max_tokens=4,
                response_format={"type": "json_object"},
            )  # fmt: skip
        assert info.value.body["param"] == "response_format"
        assert "split over ranks" in info.value.body["message"]
        text = client(base).chat.completions.create(
            model="tiny", messages=user("hi"), max_tokens=4, response_format={"type": "text"}
        )
        assert text.choices[0].finish_reason in ("stop", "length")


def test_a_json_format_with_tools_or_top_logprobs_alone_is_refused(url):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as info:
        client(url).chat.completions.create(
            model="tiny", messages=user("hi"), max_tokens=4, tools=[tool],
            response_format={"type": "json_object"},
        )  # fmt: skip
    assert info.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as info:
        client(url).chat.completions.create(
            model="tiny", messages=user("hi"), max_tokens=4, top_logprobs=2
        )
    assert info.value.body["param"] == "top_logprobs"


def test_the_prompt_cache_serves_constrained_and_free_requests_alike(url, tiny):
    """A constrained answer leaves the cache matching its tokens: the same prompt answered
    freely next (from that cache) is plain decoding's, and constrained again is too."""
    api = client(url)
    messages = user("Tell me about the cache, in JSON please.")
    ids = chat_ids(tiny[1], messages)

    def ask(fmt):
        return api.chat.completions.create(model="tiny", messages=messages, max_tokens=40, **fmt)

    for fmt in (
        {"response_format": json_format(PERSON)},
        {},
        {"response_format": json_format(PERSON)},
    ):
        resp = ask(fmt)
        schema = PERSON if fmt else None
        expected = text_of(plain(tiny, ids, max_tokens=40, schema=schema))
        assert resp.choices[0].message.content == expected, fmt
    assert resp.usage.prompt_tokens_details.cached_tokens > 0  # really from the cache


# ---------------------------------------------------------------------------------------------
# logprobs


def test_chat_logprobs_equal_plain_decodings(url, tiny):
    _, tokenizer, _, _ = tiny
    messages = user("What is the capital of France?")
    expected = plain(tiny, chat_ids(tokenizer, messages), max_tokens=24, logprobs=3)
    resp = client(url).chat.completions.create(
        model="tiny", messages=messages, max_tokens=24, logprobs=True, top_logprobs=3
    )
    content = resp.choices[0].logprobs.content
    assert [e.token for e in content] == [tokenizer.decode([r.token]) for r in expected]
    assert_close([e.logprob for e in content], [r.logprobs.logprob for r in expected])
    for entry, r in zip(content, expected, strict=True):
        assert [t.token for t in entry.top_logprobs] == [
            tokenizer.decode([t]) for t, _ in r.logprobs.top
        ]
        assert_close([t.logprob for t in entry.top_logprobs], [lp for _, lp in r.logprobs.top])
        assert entry.bytes == list(entry.token.encode("utf-8"))
    without = client(url).chat.completions.create(
        model="tiny", messages=messages, max_tokens=4, logprobs=False
    )
    assert without.choices[0].logprobs is None
    no_top = client(url).chat.completions.create(
        model="tiny", messages=messages, max_tokens=4, logprobs=True
    )
    assert all(e.top_logprobs == [] for e in no_top.choices[0].logprobs.content)


def test_completion_logprobs_equal_plain_decodings_whole_and_streamed(url, tiny):
    _, tokenizer, _, _ = tiny
    prompt = "the quick brown fox"
    expected = plain(tiny, tokenizer.encode(prompt), max_tokens=20, logprobs=2)
    api = client(url)
    whole = api.completions.create(model="tiny", prompt=prompt, max_tokens=20, logprobs=2)
    lp = whole.choices[0].logprobs
    assert lp.tokens == [tokenizer.decode([r.token]) for r in expected]
    assert_close(lp.token_logprobs, [r.logprobs.logprob for r in expected])
    best = [max(top.values()) for top in lp.top_logprobs]
    assert_close(best, [r.logprobs.top[0][1] for r in expected])
    text = whole.choices[0].text
    offsets = [sum(len(r.text) for r in expected[:i]) for i in range(len(expected))]
    assert lp.text_offset == offsets and text == text_of(expected)
    streamed = list(
        api.completions.create(model="tiny", prompt=prompt, max_tokens=20, logprobs=2, stream=True)
    )
    parts = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == lp.tokens
    assert_close([t for p in parts for t in p.token_logprobs], lp.token_logprobs)
    assert [t for p in parts for t in p.text_offset] == lp.text_offset
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text


# ---------------------------------------------------------------------------------------------
# Anthropic Messages: output_config.format (and the beta's output_format)


def test_anthropic_output_format_validates_and_equals_constrained_plain_decoding(url, tiny):
    claude = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=60)
    messages = user("Describe a person in JSON.")
    expected = text_of(plain(tiny, chat_ids(tiny[1], messages), schema=PERSON))
    fmt = {"type": "json_schema", "schema": PERSON}
    whole = claude.messages.create(
        model="tiny", max_tokens=MAX_TOKENS, messages=messages, output_config={"format": fmt}
    )
    assert whole.content[0].text == expected and whole.stop_reason == "end_turn"
    jsonschema.validate(json.loads(expected), PERSON)
    with claude.messages.stream(
        model="tiny", max_tokens=MAX_TOKENS, messages=messages, output_config={"format": fmt}
    ) as stream:
        assert "".join(stream.text_stream) == expected
    beta = claude.messages.create(
        model="tiny", max_tokens=MAX_TOKENS, messages=messages, extra_body={"output_format": fmt}
    )
    assert beta.content[0].text == expected
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.messages.create(
            model="tiny", max_tokens=8, messages=messages,
            output_config={"format": {"type": "json_schema", "schema": {"type": "nonsense"}}},
        )  # fmt: skip
    assert "output_config.format" in info.value.body["error"]["message"]
