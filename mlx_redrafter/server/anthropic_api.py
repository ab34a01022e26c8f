"""The Anthropic Messages API: `POST /v1/messages` with system prompts, content blocks (text,
tool_use, tool_result), stop sequences, tools and streaming events, so clients written for it
(coding agents, the `anthropic` SDK) work unchanged."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..prompts import eos_ids
from .door import error_body
from .engine import Done, Failed, Outcome, Text
from .flow import Gateway, JobStream, gone, sse
from .prompting import Sampling, generation_options, render_chat
from .protocol import (
    AnthropicText,
    AnthropicToolResult,
    AnthropicToolUse,
    APIError,
    CountTokensRequest,
    MessagesRequest,
)
from .tools import ParsedCall, ToolStream, parse_output


def _text_of(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(block.text for block in content)


def message_turns(body: MessagesRequest) -> list[dict]:
    """Anthropic messages -> the dicts chat templates read (tool results become tool turns,
    tool uses the assistant's tool calls)."""
    turns = []
    system = _text_of(body.system)
    if system:
        turns.append({"role": "system", "content": system})
    for m in body.messages:
        if isinstance(m.content, str):
            turns.append({"role": m.role, "content": m.content})
            continue
        text = "".join(b.text for b in m.content if isinstance(b, AnthropicText))
        uses = [b for b in m.content if isinstance(b, AnthropicToolUse)]
        for block in m.content:
            if isinstance(block, AnthropicToolResult):
                turns.append(
                    {
                        "role": "tool",
                        "content": _text_of(block.content),
                        "tool_call_id": block.tool_use_id,
                    }
                )
        if m.role == "assistant" and uses:
            calls = [
                {"id": u.id, "type": "function", "function": {"name": u.name, "arguments": u.input}}
                for u in uses
            ]
            turns.append({"role": "assistant", "content": text, "tool_calls": calls})
        elif text or not any(isinstance(b, AnthropicToolResult) for b in m.content):
            turns.append({"role": m.role, "content": text})
    return turns


def _tools(body: MessagesRequest) -> list[dict] | None:
    choice = body.tool_choice
    if not body.tools or (choice is not None and choice.type == "none"):
        return None
    tools = [
        {
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description or "",
                "parameters": t.input_schema,
            },
        }
        for t in body.tools
    ]
    if choice is not None and choice.type == "tool":
        tools = [t for t in tools if t["function"]["name"] == choice.name]
        if not tools:
            raise APIError(400, f"tool_choice: no tool named {choice.name!r}", "tool_choice")
    return tools


def _usage(outcome: Outcome | None, output_tokens: int | None = None) -> dict:
    if outcome is None:
        return {"input_tokens": 0, "output_tokens": output_tokens or 0}
    return {
        "input_tokens": outcome.prompt_tokens - outcome.cached_tokens,
        "cache_read_input_tokens": outcome.cached_tokens,
        "cache_creation_input_tokens": 0,
        "output_tokens": outcome.completion_tokens if output_tokens is None else output_tokens,
    }


def _tool_block(call: ParsedCall) -> dict:
    return {
        "type": "tool_use",
        "id": call.id.replace("call_", "toolu_"),
        "name": call.name,
        "input": call.as_dict(),
    }


class AnthropicRoutes:
    def __init__(self, gateway: Gateway):
        self.gw = gateway
        self.eos = eos_ids(gateway.engine.tokenizer)

    async def messages(self, request: Request) -> Response:
        gw = self.gw
        body: MessagesRequest = await gw.read(request, MessagesRequest)
        gw.check_model(body.model)
        tools = _tools(body)
        turns = message_turns(body)
        ids = await gw.off_loop(render_chat, gw.engine.tokenizer, gw.facts, turns, tools)
        s = Sampling(body.max_tokens, body.temperature, body.top_p, body.top_k, body.stop_sequences)
        options = generation_options(gw.engine, len(ids), "messages", s, True)
        constraint = await gw.constraint(*(body.output_schema() or (None,)))
        started = await gw.start(request, "messages", ids, options, constraint)
        if started is None:
            return gone()
        job, first = started
        fmt = gw.facts.tool_format if tools else None
        names = {t["function"]["name"] for t in tools or ()}
        if body.stream:
            return JobStream(job, self._stream(job, first, body, fmt, names))
        texts, outcome = await gw.collect(request, job, first)
        text = "".join(t.text for t in texts)
        content, calls = parse_output(text, fmt, names) if fmt else (text, [])
        blocks = [{"type": "text", "text": content}] if content else []
        blocks += [_tool_block(c) for c in calls]
        reason, sequence = self._stop(texts, body.stop_sequences, bool(calls))
        return JSONResponse(
            {
                **self._message(outcome),
                "content": blocks,
                "stop_reason": reason,
                "stop_sequence": sequence,
            }
        )

    async def count_tokens(self, request: Request) -> Response:
        gw = self.gw
        body: CountTokensRequest = await gw.read(request, CountTokensRequest)
        gw.check_model(body.model)
        tools = _tools(body)
        ids = await gw.off_loop(
            render_chat, gw.engine.tokenizer, gw.facts, message_turns(body), tools
        )
        return JSONResponse({"input_tokens": len(ids)})

    def _message(self, outcome: Outcome | None) -> dict:
        return {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": self.gw.engine.model_name,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": _usage(outcome),
        }

    def _stop(self, texts: list[Text], stops: list[str], called: bool):
        """(stop_reason, stop_sequence) of a finished answer."""
        if called:
            return "tool_use", None
        last = texts[-1] if texts else None
        if last is None or last.finish != "stop":
            return "max_tokens" if last is not None and last.finish else "end_turn", None
        if last.token in self.eos or not stops:
            return "end_turn", None
        # Which stop sequence ended it: the decoded tokens run on past the emitted text.
        tokenizer = self.gw.engine.tokenizer
        full = tokenizer.decode([t.token for t in texts])
        rest = full[len("".join(t.text for t in texts)) :]
        return "stop_sequence", next((s for s in stops if rest.startswith(s)), stops[0])

    async def _stream(self, job, first, body, fmt, names) -> AsyncIterator[str]:
        parser = ToolStream(fmt, names) if fmt else None
        index, open_text, called, texts = 0, False, False, []
        start = self._message(None)
        start["usage"]["input_tokens"] = len(job.ids)
        yield sse({"type": "message_start", "message": start}, "message_start")

        def blocks(pieces) -> list[str]:
            nonlocal index, open_text, called
            out = []
            for piece in pieces:
                if isinstance(piece, str) and piece:
                    if not open_text:
                        out.append(
                            _event(
                                "content_block_start",
                                index=index,
                                content_block={"type": "text", "text": ""},
                            )
                        )
                        open_text = True
                    out.append(
                        _event(
                            "content_block_delta",
                            index=index,
                            delta={"type": "text_delta", "text": piece},
                        )
                    )
                elif isinstance(piece, ParsedCall):
                    if open_text:
                        out.append(_event("content_block_stop", index=index))
                        index, open_text = index + 1, False
                    block = {**_tool_block(piece), "input": {}}
                    out.append(_event("content_block_start", index=index, content_block=block))
                    out.append(
                        _event(
                            "content_block_delta",
                            index=index,
                            delta={"type": "input_json_delta", "partial_json": piece.arguments},
                        )
                    )
                    out.append(_event("content_block_stop", index=index))
                    index, called = index + 1, True
            return out

        async for event in self.gw.events(job, first):
            if isinstance(event, Text):
                texts.append(event)
                for line in blocks(parser.feed(event.text) if parser else [event.text]):
                    yield line
            elif isinstance(event, Done):
                for line in blocks(parser.finish() if parser else []):
                    yield line
                if open_text:
                    yield _event("content_block_stop", index=index)
                reason, sequence = self._stop(texts, body.stop_sequences, called)
                yield _event(
                    "message_delta",
                    delta={"stop_reason": reason, "stop_sequence": sequence},
                    usage={"output_tokens": event.outcome.completion_tokens},
                )
                yield _event("message_stop")
            elif isinstance(event, Failed):
                yield sse(error_body("/v1/messages", event.error), "error")


def _event(kind: str, **fields) -> str:
    return sse({"type": kind, **fields}, kind)
