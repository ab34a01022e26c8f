"""Shared by the server tests: a server on a free loopback port in a thread, the clients, a
scripted generation function (recorded model outputs, for tool calls), a tool-capable chat
template for the tiny model."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import openai

from mlx_redrafter.generation import GenerationResponse
from mlx_redrafter.server import bind, make_server, url_of


@contextmanager
def running(engine, door=None, limits=None):
    """Serve `engine` on a free loopback port in a thread; yields the base URL."""
    sock = bind("127.0.0.1", 0)
    server = make_server(engine, door, limits, bound_host="127.0.0.1")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start in 30 s"
        assert thread.is_alive(), "the server thread died during start-up"
        time.sleep(0.02)
    try:
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


def client(url: str, timeout: float = 60, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=timeout)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


class Scripted:
    """A generation function that answers every request with the next recorded output, in
    pieces as a model would stream them, and keeps the prompts it was given."""

    def __init__(self, tokenizer, outputs: list[str], piece: int = 3):
        self.tokenizer = tokenizer
        self.outputs = list(outputs)
        self.piece = piece
        self.prompts: list[str] = []

    def __call__(self, model, tokenizer, ids, drafter=None, **options):
        self.prompts.append(tokenizer.decode(list(ids)))
        text = self.outputs.pop(0) if self.outputs else "nothing more"
        pieces = [text[i : i + self.piece] for i in range(0, len(text), self.piece)] or [""]
        for n, piece in enumerate(pieces, 1):
            yield GenerationResponse(
                text=piece,
                token=5,
                prompt_tokens=len(ids),
                prompt_tps=0.0,
                generation_tokens=n,
                generation_tps=0.0,
                peak_memory=0.0,
                finish_reason="stop" if n == len(pieces) else None,
            )


# A Hermes-style template in the shape Qwen2.5's takes (tools in the system turn, calls as
# <tool_call> JSON, results as <tool_response> in a user turn); written for these tests.
HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{%- if messages[0].role == 'system' %}{{ messages[0].content }}{% else %}You help.{% endif %}"
    "\n# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools>\n"
    'Call one with <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n'
    "{%- elif messages[0].role == 'system' %}"
    "<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' %}"
    "{%- elif m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n{{ m.content }}"
    "{%- for c in m.tool_calls %}<tool_call>\n"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}'
    "\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}"
    "\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)

# A Llama 3.x-style template: tools as JSON in the system turn, calls as one JSON object,
# results in an `ipython` turn; written for these tests.
LLAMA3_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t | tojson }}{% endfor %}"
    '\nAnswer with {"name": function name, "parameters": dictionary of argument name and its '
    "value}<|im_end|>\n{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n"
    "{%- for c in m.tool_calls %}<|python_tag|>"
    '{"name": "{{ c.function.name }}", "parameters": {{ c.function.arguments | tojson }}}'
    "{%- endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>ipython\n{{ m.content }}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


def set_template(model_dir: Path, template: str) -> None:
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = template
    config_path.write_text(json.dumps(config))
