"""Tool calling: template detection, the parsers fed recorded model outputs (whole and split
at every point as a stream would split them), and round trips over real HTTP with the
`openai` and `anthropic` clients on a tiny model carrying a Hermes-style tool template, whose
answers are recorded outputs (a random model does not call tools)."""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest
from helpers import write_tiny_model
from server_helpers import (
    HERMES_TEMPLATE,
    LLAMA3_TEMPLATE,
    Scripted,
    client,
    running,
    set_template,
    user,
)

from mlx_redrafter.loading import load
from mlx_redrafter.server import Engine
from mlx_redrafter.server.tools import HERMES, LLAMA3, ToolStream, parse_output, tool_format

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
NAMES = {"get_weather", "get_time"}

# Recorded answers in the two formats (Qwen2.5-style and Llama 3.1-style).
HERMES_ONE = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
    "\n</tool_call>"
)
HERMES_TWO = (
    "Let me check both.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n'
    '{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
)
HERMES_BROKEN = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par\n</tool_call>'
HERMES_UNKNOWN = '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>'
HERMES_CUT = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}'  # EOS, no end
LLAMA_ONE = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
LLAMA_TAGGED = '<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}'
LLAMA_TEXT = "The weather in Paris is mild {usually}."


def _calls(calls) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize(
    "text, fmt, content, calls",
    [
        (HERMES_ONE, HERMES, None, [("get_weather", {"city": "Paris", "unit": "celsius"})]),
        (
            HERMES_TWO,
            HERMES,
            "Let me check both.",
            [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})],
        ),
        (HERMES_BROKEN, HERMES, HERMES_BROKEN, []),
        (HERMES_UNKNOWN, HERMES, HERMES_UNKNOWN, []),
        (HERMES_CUT, HERMES, None, [("get_time", {"zone": "UTC"})]),
        ("Just text, <tool no call.", HERMES, "Just text, <tool no call.", []),
        (LLAMA_ONE, LLAMA3, None, [("get_weather", {"city": "Paris"})]),
        (LLAMA_TAGGED, LLAMA3, None, [("get_time", {"zone": "UTC"})]),
        (LLAMA_TEXT, LLAMA3, LLAMA_TEXT, []),
        ('{"not": "a call"}', LLAMA3, '{"not": "a call"}', []),
    ],
)
def test_recorded_outputs_parse_whole_and_streamed_split_anywhere(text, fmt, content, calls):
    whole_content, whole_calls = parse_output(text, fmt, NAMES)
    assert whole_content == content
    assert _calls(whole_calls) == calls
    for cut in range(len(text) + 1):
        for step in (1, 4):
            stream = ToolStream(fmt, NAMES)
            pieces = stream.feed(text[:cut])
            for i in range(cut, len(text), step):
                pieces += stream.feed(text[i : i + step])
            pieces += stream.finish()
            streamed_calls = [p for p in pieces if not isinstance(p, str)]
            streamed_text = "".join(p for p in pieces if isinstance(p, str))
            assert _calls(streamed_calls) == calls
            assert streamed_text == (content or ""), (cut, step)


def test_template_detection():
    assert tool_format(HERMES_TEMPLATE) == HERMES
    llama = "{%- if tools %}{{ '<|python_tag|>' }}{{ 'ipython' }}{%- endif %}"
    assert tool_format(llama) == LLAMA3
    assert tool_format("{% for m in messages %}{{ m.content }}{% endfor %}") is None
    assert tool_format(None) is None
    assert tool_format("{% if tools %}{{ tools }}{% endif %}") == ""


# ---------------------------------------------------------------------------------------------
# Over HTTP


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory):
    model_dir = write_tiny_model(tmp_path_factory.mktemp("tools") / "tiny", context_length=2048)
    plain = load(model_dir)
    set_template(model_dir, HERMES_TEMPLATE)
    return plain, load(model_dir)


def _engine(model, tokenizer, outputs) -> tuple[Engine, Scripted]:
    script = Scripted(tokenizer, outputs)
    return Engine(model, tokenizer, None, model_name="tiny", generate=script), script


def test_a_template_without_tools_gets_a_400(tool_model):
    (model, tokenizer), _ = tool_model
    engine = Engine(model, tokenizer, None, model_name="tiny")
    with running(engine) as url:
        with pytest.raises(openai.BadRequestError) as info:
            client(url).chat.completions.create(
                model="tiny", messages=user("weather?"), tools=[WEATHER], max_tokens=4
            )
        assert "renders no tools" in str(info.value)
        assert info.value.body["param"] == "tools"
        # tool_choice "none" asks for no tools, so it is answered.
        answer = client(url).chat.completions.create(
            model="tiny", messages=user("hi"), tools=[WEATHER], tool_choice="none", max_tokens=2
        )
        assert answer.choices[0].message.tool_calls is None


def test_openai_tool_call_round_trip(tool_model):
    _, (model, tokenizer) = tool_model
    engine, script = _engine(model, tokenizer, [HERMES_ONE, "It is 18 degrees in Paris."])
    with running(engine) as url:
        api = client(url)
        messages = user("What is the weather in Paris?")
        first = api.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER])
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather" and call.id.startswith("call_")
        assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
        assert '"name": "get_weather"' in script.prompts[0] and "<tools>" in script.prompts[0]
        messages += [
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 18}'},
        ]
        second = api.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER])
        assert second.choices[0].message.content == "It is 18 degrees in Paris."
        assert second.choices[0].finish_reason == "stop"
        prompt = script.prompts[1]
        assert '<tool_response>\n{"celsius": 18}\n</tool_response>' in prompt
        assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"' in prompt


def test_openai_tool_calls_stream_as_deltas(tool_model):
    _, (model, tokenizer) = tool_model
    engine, _ = _engine(model, tokenizer, [HERMES_TWO])
    with running(engine) as url:
        chunks = list(
            client(url).chat.completions.create(
                model="tiny", messages=user("Paris?"), tools=[WEATHER, CLOCK], stream=True
            )
        )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "Let me check both."
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
    assert [(d.index, d.function.name) for d in deltas] == [(0, "get_weather"), (1, "get_time")]
    assert json.loads(deltas[1].function.arguments) == {"zone": "CET"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_broken_tool_json_is_text_not_an_error(tool_model):
    _, (model, tokenizer) = tool_model
    engine, _ = _engine(model, tokenizer, [HERMES_BROKEN])
    with running(engine) as url:
        answer = client(url).chat.completions.create(
            model="tiny", messages=user("Paris?"), tools=[WEATHER]
        )
    assert answer.choices[0].message.content == HERMES_BROKEN
    assert answer.choices[0].finish_reason == "stop"


def test_bad_tool_requests_are_400s(tool_model):
    _, (model, tokenizer) = tool_model
    engine, _ = _engine(model, tokenizer, [])
    with running(engine) as url:
        bad = [
            {"tools": [{"type": "function", "function": {"name": "has space"}}]},
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [
                            {
                                "id": "1",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{not json"},
                            }
                        ],
                    }
                ]
            },
        ]
        for extra in bad:
            body = {"messages": user("hi"), **extra}
            resp = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
            assert resp.status_code == 400, resp.text
            assert resp.json()["error"]["param"]


def test_anthropic_tool_use_round_trip_and_stream(tool_model):
    _, (model, tokenizer) = tool_model
    engine, script = _engine(model, tokenizer, [HERMES_ONE, "Mild, 18 degrees.", HERMES_TWO])
    tool = {
        "name": "get_weather",
        "description": "The weather",
        "input_schema": WEATHER["function"]["parameters"],
    }
    clock = {"name": "get_time", "input_schema": {"type": "object"}}
    with running(engine) as url:
        api = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=30)
        messages = user("Weather in Paris?")
        first = api.messages.create(model="tiny", max_tokens=64, messages=messages, tools=[tool])
        assert first.stop_reason == "tool_use"
        (use,) = first.content
        assert use.type == "tool_use" and use.name == "get_weather"
        assert use.input == {"city": "Paris", "unit": "celsius"}
        messages += [
            {"role": "assistant", "content": [b.model_dump() for b in first.content]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 C"}],
            },
        ]
        second = api.messages.create(model="tiny", max_tokens=64, messages=messages, tools=[tool])
        assert second.content[0].text == "Mild, 18 degrees." and second.stop_reason == "end_turn"
        assert "<tool_response>\n18 C\n</tool_response>" in script.prompts[1]
        with api.messages.stream(
            model="tiny", max_tokens=64, messages=user("Both?"), tools=[tool, clock]
        ) as stream:
            final = stream.get_final_message()
        assert [b.type for b in final.content] == ["text", "tool_use", "tool_use"]
        assert final.content[0].text == "Let me check both."
        assert final.content[2].input == {"zone": "CET"}
        assert final.stop_reason == "tool_use"


def test_llama3_json_tool_call_round_trip(tmp_path):
    model_dir = write_tiny_model(tmp_path / "tiny", context_length=2048)
    set_template(model_dir, LLAMA3_TEMPLATE)
    model, tokenizer = load(model_dir)
    assert tool_format(tokenizer.chat_template) == LLAMA3
    engine, script = _engine(model, tokenizer, [LLAMA_TAGGED, "It is noon."])
    with running(engine) as url:
        api = client(url)
        messages = user("What time is it?")
        first = api.chat.completions.create(model="tiny", messages=messages, tools=[CLOCK])
        (call,) = first.choices[0].message.tool_calls
        assert call.function.name == "get_time"
        assert json.loads(call.function.arguments) == {"zone": "UTC"}
        messages += [
            first.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "12:00"},
        ]
        second = api.chat.completions.create(model="tiny", messages=messages, tools=[CLOCK])
        assert second.choices[0].message.content == "It is noon."
    assert '"name": "get_time"' in script.prompts[0]
    assert '<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}' in script.prompts[1]
    assert "<|im_start|>ipython\n12:00<|im_end|>" in script.prompts[1]
