"""The Anthropic Messages API (`/v1/messages`) over real HTTP, driven by the official
`anthropic` client: answers equal plain greedy decoding, streamed events add up to the
whole answer, system prompts and content blocks reach the template, stop sequences and
max_tokens give Anthropic's stop reasons, and errors come in Anthropic's format."""

from __future__ import annotations

import anthropic
import httpx
import pytest
from helpers import write_tiny_model
from server_helpers import running, user

from mlx_redrafter.generation import stream_generate
from mlx_redrafter.loading import load
from mlx_redrafter.server import Engine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model_dir = write_tiny_model(tmp_path_factory.mktemp("anthropic") / "tiny", context_length=512)
    return load(model_dir)


@pytest.fixture(scope="module")
def url(tiny):
    model, tokenizer = tiny
    with running(Engine(model, tokenizer, None, model_name="tiny")) as base:
        yield base


def api(url) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=60)


def plain(tiny, messages, max_tokens, stop=()) -> tuple[str, list]:
    model, tokenizer = tiny
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    out = list(
        stream_generate(model, tokenizer, ids, None, max_tokens=max_tokens, lookup=False, stop=stop)
    )
    return "".join(r.text for r in out), out


def test_messages_equal_plain_greedy_decoding(url, tiny):
    text, out = plain(tiny, user("Tell me a story"), 20)
    message = api(url).messages.create(
        model="tiny", max_tokens=20, messages=user("Tell me a story")
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text" and message.content[0].text == text
    assert message.stop_reason == ("max_tokens" if len(out) == 20 else "end_turn")
    assert message.usage.output_tokens == len(out)
    assert message.id.startswith("msg_")


def test_streamed_events_add_up_to_the_whole_answer(url):
    client = api(url)
    whole = client.messages.create(model="tiny", max_tokens=16, messages=user("hello world"))
    with client.messages.stream(model="tiny", max_tokens=16, messages=user("hello world")) as s:
        pieces = list(s.text_stream)
        final = s.get_final_message()
    assert len(pieces) >= 2
    assert "".join(pieces) == whole.content[0].text == final.content[0].text
    assert final.stop_reason == whole.stop_reason
    raw = httpx.post(
        f"{url}/v1/messages",
        json={"model": "tiny", "max_tokens": 4, "stream": True, "messages": user("hi")},
        timeout=30,
    )
    events = [line.split(": ", 1)[1] for line in raw.text.splitlines() if line.startswith("event")]
    assert events[0] == "message_start" and events[-2:] == ["message_delta", "message_stop"]
    assert "content_block_start" in events and "content_block_stop" in events


def test_system_prompt_and_content_blocks_reach_the_template(url, tiny):
    system = "You answer in French."
    blocks = [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "a story"}]
    expected, _ = plain(tiny, [{"role": "system", "content": system}] + user("Tell me a story"), 12)
    message = api(url).messages.create(
        model="tiny", max_tokens=12, system=system, messages=[{"role": "user", "content": blocks}]
    )
    assert message.content[0].text == expected


def test_multi_turn_and_stop_sequences(url, tiny):
    turns = user("hello world") + [{"role": "assistant", "content": "hi"}] + user("Tell me a story")
    full, _ = plain(tiny, turns, 32)
    assert len(full) > 8
    stop = full[5:7]
    message = api(url).messages.create(
        model="tiny", max_tokens=32, messages=turns, stop_sequences=["\x01never", stop]
    )
    assert message.content[0].text == full[: full.find(stop)]
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == stop


@pytest.mark.parametrize(
    "body, status",
    [
        ({"messages": user("hi")}, 400),  # max_tokens is required
        ({"max_tokens": 4, "messages": []}, 400),
        ({"max_tokens": 4, "messages": user("hi"), "temperature": 1.5}, 400),
        ({"max_tokens": 4, "messages": [{"role": "system", "content": "x"}]}, 400),
        ({"max_tokens": 4, "messages": user("hi"), "model": "claude-opus"}, 400),
        ({"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image"}]}]}, 400),
    ],
)
def test_bad_requests_get_anthropic_errors(url, body, status):
    resp = httpx.post(f"{url}/v1/messages", json=body, timeout=30)
    assert resp.status_code == status, resp.text
    data = resp.json()
    assert data["type"] == "error" and data["error"]["type"] == "invalid_request_error"
    assert data["error"]["message"]


def test_the_client_raises_bad_request(url):
    with pytest.raises(anthropic.BadRequestError) as info:
        api(url).messages.create(
            model="tiny", max_tokens=4, messages=user("hi"), extra_body={"temperature": 3}
        )
    assert "temperature" in str(info.value)


def test_count_tokens(url, tiny):
    _, tokenizer = tiny
    messages = user("Tell me a story")
    counted = api(url).messages.count_tokens(model="tiny", messages=messages, system="Be brief.")
    system = [{"role": "system", "content": "Be brief."}]
    assert counted.input_tokens == len(
        tokenizer.apply_chat_template(system + messages, add_generation_prompt=True)
    )
