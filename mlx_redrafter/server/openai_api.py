"""The OpenAI API: `/v1/chat/completions` (with tools) and `/v1/completions`, whole or
streamed as server-sent events ending in `[DONE]`, errors in OpenAI's format."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .engine import Done, Failed, Outcome, Text
from .flow import Gateway, JobStream, gone, sse
from .formats import CompletionLogprobs, chat_logprobs
from .prompting import Sampling, completion_ids, generation_options, render_chat
from .protocol import APIError, ChatMessage, ChatRequest, CompletionRequest
from .tools import ParsedCall, ToolStream, parse_output


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(outcome: Outcome) -> dict:
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": outcome.cached_tokens},
    }


def _content(message: ChatMessage) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)


def chat_turns(messages: list[ChatMessage]) -> list[dict]:
    """OpenAI messages -> the dicts chat templates read (tool calls with their arguments as
    objects, as Hugging Face templates expect)."""
    turns = []
    for i, m in enumerate(messages):
        turn = {"role": "system" if m.role == "developer" else m.role, "content": _content(m)}
        if m.tool_calls:
            turn["tool_calls"] = []
            for j, call in enumerate(m.tool_calls):
                param = f"messages[{i}].tool_calls[{j}].function.arguments"
                try:
                    arguments = json.loads(call.function.arguments)
                except (ValueError, RecursionError):
                    raise APIError(400, f"{param}: not a JSON object", param) from None
                if not isinstance(arguments, dict):
                    raise APIError(400, f"{param}: not a JSON object", param)
                function = {"name": call.function.name, "arguments": arguments}
                turn["tool_calls"].append({"id": call.id, "type": "function", "function": function})
        if m.role == "tool":
            turn["tool_call_id"] = m.tool_call_id
        if m.name:
            turn["name"] = m.name
        turns.append(turn)
    return turns


def _tools(body: ChatRequest) -> list[dict] | None:
    """The tools the template renders (a named tool_choice keeps only that one)."""
    if not body.tools or body.tool_choice == "none":
        return None
    tools = [t.model_dump(exclude_none=True) for t in body.tools]
    choice = body.tool_choice
    if choice is not None and not isinstance(choice, str):
        tools = [t for t in tools if t["function"]["name"] == choice.function.name]
        if not tools:
            raise APIError(
                400, f"tool_choice: no tool named {choice.function.name!r}", "tool_choice"
            )
    return tools


def _call_json(call: ParsedCall) -> dict:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


class OpenAIRoutes:
    def __init__(self, gateway: Gateway):
        self.gw = gateway

    async def chat(self, request: Request) -> Response:
        gw = self.gw
        body: ChatRequest = await gw.read(request, ChatRequest)
        gw.check_model(body.model)
        tools = _tools(body)
        turns = chat_turns(body.messages)
        ids = await gw.off_loop(render_chat, gw.engine.tokenizer, gw.facts, turns, tools)
        s = Sampling(
            body.max_completion_tokens or body.max_tokens,
            body.temperature,
            body.top_p,
            body.top_k,
            body.stop,
            body.seed,
        )
        options = generation_options(gw.engine, len(ids), "messages", s, s.max_tokens is not None)
        constraint = await gw.constraint(body.response_format)
        top = body.top_logprobs_wanted()
        started = await gw.start(request, "chat", ids, options, constraint, top)
        if started is None:
            return gone()
        job, first = started
        fmt = gw.facts.tool_format if tools else None
        names = {t["function"]["name"] for t in tools or ()}
        if body.stream:
            return JobStream(job, self._chat_stream(job, first, body, fmt, names))
        texts, outcome = await gw.collect(request, job, first)
        text = "".join(t.text for t in texts)
        content, calls = parse_output(text, fmt, names) if fmt else (text, [])
        message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [_call_json(c) for c in calls]
        finish = "tool_calls" if calls else _finish(texts)
        logprobs = None
        if top is not None:
            logprobs = chat_logprobs(gw.engine.tokenizer, [t.logprobs for t in texts])
        choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}
        return JSONResponse(self._whole("chat.completion", "chatcmpl", [choice], outcome))

    async def completions(self, request: Request) -> Response:
        gw = self.gw
        body: CompletionRequest = await gw.read(request, CompletionRequest)
        gw.check_model(body.model)
        ids = await gw.off_loop(completion_ids, gw.engine.tokenizer, gw.facts, body.prompt)
        # OpenAI's default for completions is 16 tokens.
        s = Sampling(
            body.max_tokens or 16, body.temperature, body.top_p, body.top_k, body.stop, body.seed
        )
        options = generation_options(gw.engine, len(ids), "prompt", s, True)
        started = await gw.start(request, "completion", ids, options, None, body.logprobs)
        if started is None:
            return gone()
        job, first = started
        if body.stream:
            return JobStream(job, self._completion_stream(job, first, body))
        texts, outcome = await gw.collect(request, job, first)
        logprobs = None
        if body.logprobs is not None:
            table = CompletionLogprobs(gw.engine.tokenizer)
            for t in texts:
                table.add(t.logprobs, t.text)
            logprobs = table.take() or _NO_LOGPROBS
        choice = {
            "index": 0,
            "text": "".join(t.text for t in texts),
            "logprobs": logprobs,
            "finish_reason": _finish(texts),
        }
        return JSONResponse(self._whole("text_completion", "cmpl", [choice], outcome))

    # --- responses ----------------------------------------------------------------------------

    def _base(self, obj: str, prefix: str) -> dict:
        return {
            "id": new_id(prefix),
            "object": obj,
            "created": int(time.time()),
            "model": self.gw.engine.model_name,
            "system_fingerprint": None,
        }

    def _whole(self, obj: str, prefix: str, choices: list, outcome: Outcome) -> dict:
        return {
            **self._base(obj, prefix),
            "choices": choices,
            "usage": usage(outcome),
            "redrafter": outcome.extra(),
        }

    async def _chat_stream(self, job, first, body, fmt, names) -> AsyncIterator[str]:
        base = self._base("chat.completion.chunk", "chatcmpl")
        tokenizer = self.gw.engine.tokenizer
        pending = []  # logprobs of tokens whose text has not gone out yet

        def chunk(delta: dict, finish=None, **extra) -> str:
            logprobs = None
            if pending and delta:
                logprobs = chat_logprobs(tokenizer, pending)
                pending.clear()
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return sse({**base, "choices": [choice], **extra})

        parser = ToolStream(fmt, names) if fmt else None
        calls = 0

        def deltas(pieces) -> list[str]:
            nonlocal calls
            out = []
            for piece in pieces:
                if isinstance(piece, ParsedCall):
                    out.append(chunk({"tool_calls": [{"index": calls, **_call_json(piece)}]}))
                    calls += 1
                elif piece:
                    out.append(chunk({"content": piece}))
            return out

        yield chunk({"role": "assistant", "content": ""})
        finish = None
        async for event in self.gw.events(job, first):
            if isinstance(event, Text):
                finish = event.finish or finish
                if event.logprobs is not None:
                    pending.append(event.logprobs)
                for line in deltas(parser.feed(event.text) if parser else [event.text]):
                    yield line
            elif isinstance(event, Done):
                for line in deltas(parser.finish() if parser else []):
                    yield line
                if pending:  # tokens that added no text (the end of sequence, a held piece)
                    yield chunk({"content": ""})
                yield chunk({}, "tool_calls" if calls else finish, redrafter=event.outcome.extra())
                if body.stream_options and body.stream_options.include_usage:
                    yield sse({**base, "choices": [], "usage": usage(event.outcome)})
            elif isinstance(event, Failed):
                yield stream_error(event.error)
        yield sse("[DONE]")

    async def _completion_stream(self, job, first, body) -> AsyncIterator[str]:
        base = self._base("text_completion", "cmpl")
        table = CompletionLogprobs(self.gw.engine.tokenizer)

        def chunk(text: str, finish=None, **extra) -> str:
            logprobs = table.take()
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
            return sse({**base, "choices": [choice], **extra})

        finish = None
        async for event in self.gw.events(job, first):
            if isinstance(event, Text):
                finish = event.finish or finish
                if event.logprobs is not None:
                    table.add(event.logprobs, event.text)
                if event.text:
                    yield chunk(event.text)
            elif isinstance(event, Done):
                if table.tokens:  # tokens that added no text (the end of sequence)
                    yield chunk("")
                yield chunk("", finish, redrafter=event.outcome.extra())
                if body.stream_options and body.stream_options.include_usage:
                    yield sse({**base, "choices": [], "usage": usage(event.outcome)})
            elif isinstance(event, Failed):
                yield stream_error(event.error)
        yield sse("[DONE]")


_NO_LOGPROBS = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


def _finish(texts: list[Text]) -> str | None:
    return next((t.finish for t in reversed(texts) if t.finish), None)


def stream_error(error: APIError) -> str:
    return sse(
        {
            "error": {
                "message": error.message,
                "type": error.kind,
                "param": error.param,
                "code": error.status,
            }
        }
    )
