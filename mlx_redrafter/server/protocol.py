"""What clients may send: the errors a client can cause, the request limits, the guarded JSON
parse, and the request bodies of both APIs (OpenAI chat and completions, Anthropic Messages)
as pydantic models. Nothing here touches the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error a client gets as a JSON body; each API adapter renders it in its own format."""

    KINDS = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        415: "invalid_request_error",
        503: "server_busy",
        504: "timeout_error",
    }

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = ""):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind or self.KINDS.get(status, "server_error")


class QueueFullError(APIError):
    def __init__(self, limit: int):
        super().__init__(
            503, f"the server is busy: {limit} requests are already waiting; retry later"
        )


class ShuttingDownError(APIError):
    def __init__(self):
        super().__init__(503, "the server is shutting down", kind="server_shutting_down")


@dataclass(frozen=True)
class Limits:
    """Per-request bounds, checked before any model work."""

    max_body_bytes: int = 4 << 20  # set from the door's (DoorSettings.max_body_bytes)
    max_messages: int = 512
    max_stop: int = 16
    max_stop_chars: int = 256
    max_tools: int = 128
    max_depth: int = 64  # JSON nesting
    request_timeout: float = 600.0  # seconds from arrival to the last token


# ---------------------------------------------------------------------------------------------
# Parsing


def _depth(data: Any, limit: int) -> bool:
    """Whether `data` nests deeper than `limit` (iterative: deep input cannot recurse us)."""
    stack = [(data, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            items = item.values()
        elif isinstance(item, list):
            items = item
        else:
            continue
        if level > limit:
            return True
        stack.extend((child, level + 1) for child in items if isinstance(child, dict | list))
    return False


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def field_name(loc: tuple) -> str | None:
    """('messages', 0, 'content') -> 'messages[0].content' (pydantic's union tags dropped)."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif not (part in _TYPE_TAGS or "[" in part or part[:1].isupper() or "-" in part):
            name += ("." if name else "") + part
    return name or None


def parse_body(model: type[BaseModel], raw: bytes, limits: Limits) -> Any:
    """`raw` as a `model`, or an APIError 400 for any way it can be wrong (never another
    exception: deep nesting, huge integers and bad Unicode included)."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise APIError(400, "the request body nests too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, int digit limit, ...
        raise APIError(400, f"the request body is not valid JSON: {_short(e)}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    if _depth(data, limits.max_depth):
        raise APIError(400, f"the request body nests deeper than {limits.max_depth} levels")
    try:
        request = model.model_validate(data)
    except ValidationError as e:
        error = e.errors(include_url=False)[0]
        param = field_name(error["loc"])
        if error["type"] == "missing":
            raise APIError(400, f"{param}: required", param) from None
        raise APIError(400, f"{param or 'body'}: {error['msg']}", param) from None
    except (RecursionError, ValueError) as e:
        raise APIError(400, f"the request body could not be read: {_short(e)}") from None
    request.check(limits)
    return request


def _short(error: Exception) -> str:
    return str(error).split("\n")[0][:200]


def check_text(value: str, param: str) -> str:
    """`value` if it is encodable text (JSON may carry lone surrogates, which no tokenizer
    takes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(
            400, f"{param}: contains invalid Unicode (a lone surrogate)", param
        ) from None
    return value


def check_stop(stop: list[str], limits: Limits, param: str) -> list[str]:
    if len(stop) > limits.max_stop:
        raise APIError(400, f"{param}: at most {limits.max_stop} stop strings", param)
    for s in stop:
        if len(s) > limits.max_stop_chars:
            raise APIError(
                400, f"{param}: stop strings have at most {limits.max_stop_chars} characters", param
            )
        check_text(s, param)
    return [s for s in stop if s]


# ---------------------------------------------------------------------------------------------
# OpenAI


class Body(BaseModel):
    # Clients send many fields this server does not use; they are ignored, not refused.
    model_config = ConfigDict(extra="allow")

    def check(self, limits: Limits) -> None:
        """Checks beyond the field types (what is not supported, the per-request limits)."""


class StreamOptions(Body):
    include_usage: bool = False


class Sampling(Body):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def check(self, limits: Limits) -> None:
        if self.n not in (None, 1):
            raise APIError(400, "n: only n=1 is supported", "n")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name}: penalties are not supported", name)
        if self.logit_bias:
            raise APIError(400, "logit_bias: not supported", "logit_bias")
        self.stop = check_stop(self.stop_list(), limits, "stop")

    def stop_list(self) -> list[str]:
        return self.stop if isinstance(self.stop, list) else [self.stop] if self.stop else []


class TextPart(Body):
    type: Literal["text"]
    text: str


class FunctionCall(Body):
    name: str = Field(min_length=1, max_length=128)
    arguments: str = "{}"


class ToolCall(Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDef(Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Body):
    name: str


class NamedToolChoice(Body):
    type: Literal["function"]
    function: NamedFunction


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # Grammar-constrained output (compiled per request in formats.py) and per-token logprobs.
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def check(self, limits: Limits) -> None:
        super().check(limits)
        if len(self.messages) > limits.max_messages:
            raise APIError(400, f"messages: at most {limits.max_messages} messages", "messages")
        if self.tools and len(self.tools) > limits.max_tools:
            raise APIError(400, f"tools: at most {limits.max_tools} tools", "tools")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs set to true", "top_logprobs")
        fmt = self.response_format
        if fmt is not None and fmt.type != "text":
            if self.tools and self.tool_choice != "none":
                raise APIError(
                    400,
                    "response_format: a JSON response format cannot be combined with tools",
                    "response_format",
                )
            if fmt.type == "json_schema" and not isinstance(
                (fmt.json_schema or {}).get("schema"), dict | str
            ):
                raise APIError(
                    400,
                    "response_format: json_schema needs a `schema` object",
                    "response_format",
                )

    def top_logprobs_wanted(self) -> int | None:
        """stream_generate's `logprobs`: None (off) or the number of top logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def tool_names(self) -> set[str]:
        return {t.function.name for t in self.tools or ()}


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = None
    suffix: str | None = None

    def check(self, limits: Limits) -> None:
        super().check(limits)
        for name in ("echo", "suffix"):
            if getattr(self, name):
                raise APIError(400, f"{name}: not supported", name)
        if self.best_of not in (None, 1):
            raise APIError(400, "best_of: only best_of=1 is supported", "best_of")


# ---------------------------------------------------------------------------------------------
# Anthropic Messages


class AnthropicText(Body):
    type: Literal["text"]
    text: str


class AnthropicToolUse(Body):
    type: Literal["tool_use"]
    id: str
    name: str = Field(min_length=1, max_length=128)
    input: dict[str, Any]


class AnthropicToolResult(Body):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[AnthropicText] | None = None
    is_error: bool | None = None


Block = AnthropicText | AnthropicToolUse | AnthropicToolResult


class AnthropicMessage(Body):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class AnthropicTool(Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    description: str | None = None
    input_schema: dict[str, Any]


class AnthropicToolChoice(Body):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None


class AnthropicFormat(Body):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class AnthropicOutputConfig(Body):
    format: AnthropicFormat | None = None


class MessagesRequest(Body):
    model: str | None = None
    messages: list[AnthropicMessage] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    system: str | list[AnthropicText] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    metadata: dict[str, Any] | None = None
    # Structured output: `output_config.format` (and the beta's `output_format`).
    output_config: AnthropicOutputConfig | None = None
    output_format: AnthropicFormat | None = None

    def output_schema(self) -> tuple[dict, str] | None:
        """The requested JSON schema as an OpenAI response_format, and the field it came
        from; None for free text."""
        if self.output_config is not None and self.output_config.format is not None:
            schema, param = self.output_config.format.schema_, "output_config.format"
        elif self.output_format is not None:
            schema, param = self.output_format.schema_, "output_format"
        else:
            return None
        return {"type": "json_schema", "json_schema": {"schema": schema}}, param

    def check(self, limits: Limits) -> None:
        wanted = self.output_schema()
        if (
            wanted is not None
            and self.tools
            and not (self.tool_choice is not None and self.tool_choice.type == "none")
        ):
            raise APIError(
                400, f"{wanted[1]}: an output format cannot be combined with tools", wanted[1]
            )
        if len(self.messages) > limits.max_messages:
            raise APIError(400, f"messages: at most {limits.max_messages} messages", "messages")
        if self.tools and len(self.tools) > limits.max_tools:
            raise APIError(400, f"tools: at most {limits.max_tools} tools", "tools")
        self.stop_sequences = check_stop(self.stop_sequences or [], limits, "stop_sequences")


class CountTokensRequest(MessagesRequest):
    """`/v1/messages/count_tokens`: a Messages request without max_tokens."""

    max_tokens: int | None = Field(None, ge=1)
