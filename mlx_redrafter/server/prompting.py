"""Requests -> token ids and generation options, shared by the API adapters: the chat template
(with tools when it renders them), completion prompts, the context-length checks, and the
bound that refuses a prompt too long for the context before it is tokenised.

Everything here is synchronous and may be slow (templates, tokenising): the app runs it off
the event loop.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from jinja2 import TemplateError

from ..prompts import as_ids, encode_messages, has_template
from .protocol import APIError, check_text
from .tools import tool_format

log = logging.getLogger("mlx_redrafter.server")


@dataclass(frozen=True)
class ModelFacts:
    """What the request checks need to know about the model and its tokenizer."""

    context_length: int | None
    vocab_size: int
    max_token_bytes: int  # the longest token's text, in UTF-8 bytes
    template: str | None
    tool_format: str | None

    @classmethod
    def of(cls, model, tokenizer) -> ModelFacts:
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        vocab_size = embed.weight.shape[0] if embed is not None else 1 << 31
        try:
            vocab = tokenizer.get_vocab()
            longest = max((len(str(t).encode("utf-8", "replace")) for t in vocab), default=64)
        except Exception:  # a tokenizer without a vocabulary listing: assume long tokens
            longest = 256
        template = getattr(tokenizer, "chat_template", None)
        return cls(
            context_length=getattr(model, "context_length", None),
            vocab_size=vocab_size,
            max_token_bytes=max(longest, 1),
            template=template if isinstance(template, str) else None,
            tool_format=tool_format(template if isinstance(template, str) else None),
        )

    def check_size(self, texts: list[str], param: str) -> None:
        """Refuse, before tokenising, text that cannot fit the context: no token holds more
        than `max_token_bytes` bytes, so that many bytes per context position is a bound."""
        if not self.context_length:
            return
        size = sum(len(check_text(t, param).encode("utf-8")) for t in texts)
        if size > self.context_length * self.max_token_bytes:
            raise APIError(
                400,
                f"{param}: the prompt ({size} bytes) cannot fit the model's context length of "
                f"{self.context_length} tokens",
                param,
            )


def render_chat(tokenizer, facts: ModelFacts, turns: list[dict], tools: list[dict] | None):
    """A conversation's ids in the chat template with the generation prompt (and the tools,
    in the template's own format)."""
    texts = [t.get("content") or "" for t in turns]
    texts += [json.dumps(tools)] if tools else []
    facts.check_size(texts, "messages")
    needs_tools = tools or any(t.get("tool_calls") or t["role"] == "tool" for t in turns)
    if needs_tools and not facts.tool_format:
        what = (
            "tools in a format this server cannot parse"
            if facts.tool_format == ""
            else ("no tools")
        )
        param = "tools" if tools else "messages"
        raise APIError(400, f"{param}: this model's chat template renders {what}", param)
    try:
        if tools and has_template(tokenizer):
            rendered = tokenizer.apply_chat_template(turns, tools=tools, add_generation_prompt=True)
            return as_ids(rendered)
        return encode_messages(tokenizer, turns)
    except TemplateError as e:  # templates raise on what they do not accept (role order...)
        message = str(e).split("\n")[0][:200]
        raise APIError(
            400, f"messages: the chat template refused them: {message}", "messages"
        ) from None
    except Exception:  # anything else is logged, never shown
        log.exception("the chat template failed")
        raise APIError(
            400, "messages: the chat template could not render them", "messages"
        ) from None


def completion_ids(tokenizer, facts: ModelFacts, prompt) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        raise APIError(400, "prompt: only one prompt per request is supported", "prompt")
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "prompt: empty", "prompt")
        facts.check_size([prompt], "prompt")
        try:
            return list(tokenizer.encode(prompt))
        except Exception:
            raise APIError(400, "prompt: the tokenizer could not encode it", "prompt") from None
    if not prompt:
        raise APIError(400, "prompt: empty", "prompt")
    if facts.context_length and len(prompt) > facts.context_length:
        raise APIError(
            400,
            f"prompt: the prompt has {len(prompt)} tokens; the model's context "
            f"length is {facts.context_length} tokens",
            "prompt",
        )
    bad = [t for t in prompt if not 0 <= t < facts.vocab_size]
    if bad:
        raise APIError(400, f"prompt: token id {bad[0]} outside the vocabulary", "prompt")
    return list(prompt)


@dataclass(frozen=True)
class Sampling:
    """A request's own sampling settings (None: the server's default)."""

    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    stop: list[str]
    seed: int | None = None


def generation_options(engine, n_ids: int, prompt_field: str, s: Sampling, explicit: bool):
    """stream_generate's per-request keyword arguments, with the context checked. Without an
    explicit max_tokens the server's default applies, shortened to what the context holds."""
    limit = engine.model.context_length
    max_tokens = s.max_tokens
    if limit and n_ids + 1 + engine.headroom > limit:
        raise APIError(
            400,
            f"{prompt_field}: the prompt has {n_ids} tokens; the model's context length "
            f"is {limit} tokens",
            prompt_field,
        )
    if not explicit:
        max_tokens = engine.defaults["max_tokens"]
        if limit:
            max_tokens = min(max_tokens, limit - n_ids - engine.headroom)
    elif limit and n_ids + max_tokens > limit:
        raise APIError(
            400,
            f"max_tokens: the prompt ({n_ids} tokens) plus max_tokens ({max_tokens}) "
            f"exceeds the model's context length of {limit} tokens",
            "max_tokens",
        )
    d = engine.defaults
    options = {
        "max_tokens": max_tokens,
        "temperature": d["temperature"] if s.temperature is None else s.temperature,
        "top_p": d["top_p"] if s.top_p is None else s.top_p,
        "top_k": d["top_k"] if s.top_k is None else s.top_k,
        "stop": s.stop,
    }
    if s.seed is not None:
        options["seed"] = s.seed
    return options
