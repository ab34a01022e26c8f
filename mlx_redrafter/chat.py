"""Chat: a session that keeps the conversation in the KV cache.

`ChatSession` owns the conversation (messages, the token ids the model has seen, the KV
cache) and streams one answer per user turn, prefilling only the new turn. The terminal loop
on it (`mlx-redrafter chat`) is in `mlx_redrafter.cli.chat`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from .errors import ContextFullError, NotTextError
from .generation import (
    OPTION_DEFAULTS,
    DecodeStats,
    GenerationError,
    GenerationResponse,
    SamplingConfig,
    stream_generate,
)
from .lookup_memory import LookupMemory
from .plan import DecodePlan
from .prompts import encode_messages, eos_ids

_PROBE = "\x00mlx-redrafter-probe\x00"


def check_text(text: str, what: str) -> str:
    """`text` if it is valid Unicode; NotTextError naming `what` if it holds undecodable bytes
    (Python keeps those as lone surrogates, which the tokenizer rejects)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise NotTextError(
            f"{what} is not UTF-8 text (an undecodable byte at character {e.start + 1})"
        ) from None
    return text


@dataclass
class TurnRecord:
    """What one turn did, for the stats line and /stats."""

    prompt_tokens: int  # tokens prefilled for this turn (the rest came from the cache)
    num_tokens: int
    finish_reason: str  # "stop", "length" or "interrupted"
    stats: DecodeStats | None
    capped: bool = False  # max_tokens was lowered to what the context had left


@dataclass
class ChatSession:
    """A multi-turn conversation with one model (and optionally a drafter).

    The conversation lives in `ids` (every token the model has seen, answers as generated,
    never re-tokenized) and in the KV cache, which holds all of them but the last. A new turn
    appends the template's end of the previous answer and the new user turn, so only those
    tokens are prefilled. Context lookup copies from all of it; with a `lookup_memory` also
    from earlier conversations (kept there after /reset, or loaded from a history file).
    """

    model: object
    tokenizer: object
    drafter: object = None
    system: str | None = None
    max_tokens: int = OPTION_DEFAULTS.max_tokens
    temperature: float = OPTION_DEFAULTS.temperature
    top_p: float = OPTION_DEFAULTS.top_p
    top_k: int = OPTION_DEFAULTS.top_k
    seed: int | None = None
    beam_width: int | None = None  # None: the tuned shape, else the default (as the CLI)
    beam_length: int | None = None
    lookup: bool | None = None  # context lookup candidates (None: the default, on)
    lookup_max: int | None = None
    # the decoding settings resolved once (the loaders build it); None: resolved here from
    # beam_width, beam_length, lookup and lookup_max, which are then left unset with a plan
    plan: DecodePlan | None = None
    # earlier conversations (and this one's turns) as a second lookup corpus; keep one memory
    # across sessions (and a history file, see LookupMemory.save) to copy from past chats
    lookup_memory: LookupMemory | None = None
    lookup_client: str | None = None
    messages: list[dict] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    turns: list[TurnRecord] = field(default_factory=list)

    def __post_init__(self):
        SamplingConfig(self.temperature, self.top_p, self.top_k).validate()
        if self.max_tokens < 1:
            raise GenerationError(
                f"max_tokens must be >= 1, got {self.max_tokens}", param="max_tokens"
            )
        given = (self.beam_width, self.beam_length, self.lookup, self.lookup_max)
        if self.plan is None:
            self.plan = DecodePlan.resolve(self.model, *given)
        elif any(v is not None for v in given):
            raise GenerationError(
                "pass either plan= or beam_width/beam_length/lookup/lookup_max, not both"
            )
        sampling = SamplingConfig(self.temperature, self.top_p, self.top_k)
        self.beam_width, self.beam_length = self.plan.beam_for(sampling)
        self.cache = self.model.make_cache()
        self._templated = getattr(self.tokenizer, "chat_template", None) is not None
        self._close_ids = self._assistant_close_ids() if self._templated else None
        self._seeded = False
        self.reset()

    # --- conversation state -----------------------------------------------------------------

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.ids = []
        self.turns = []
        self.cache.reset()

    @property
    def context_length(self) -> int | None:
        return self.model.context_length

    @property
    def context_used(self) -> int:
        return len(self.ids)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _assistant_close_ids(self) -> list[int] | None:
        """The tokens the template puts after an assistant message (ChatML: `<|im_end|>\\n`)."""
        try:
            text = self._render(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}],
                add_generation_prompt=False,
            )
        except Exception:  # templates may reject anything; then every turn is re-rendered
            return None
        if text.count(_PROBE) != 1:
            return None
        tail = text.split(_PROBE, 1)[1]
        return self._encode(tail) if tail else None

    def turn_ids(self, text: str) -> list[int]:
        """All token ids of the conversation plus a new user turn and the generation prompt."""
        user = {"role": "user", "content": text}
        if not self._templated:  # a base model: turns are plain lines of text
            if not self.ids:
                return list(self.tokenizer.encode(text + "\n"))
            return self.ids + self._encode("\n" + text + "\n")
        if self.ids and self._close_ids:
            before = self._render(self.messages, add_generation_prompt=False)
            after = self._render(self.messages + [user], add_generation_prompt=True)
            close = self.tokenizer.decode(self._close_ids, skip_special_tokens=False)
            if after.startswith(before) and before.endswith(close):
                return self.ids + self._close_ids + self._encode(after[len(before) :])
        # First turn, or a template that rewrites earlier turns: render everything.
        # stream_generate still reuses the cache up to the first token that differs.
        return encode_messages(self.tokenizer, self.messages + [user])

    def _extra_tokens(self) -> int:
        return self.plan.lookahead(self.drafter is not None)

    def room(self, ids: list[int]) -> int | None:
        """How many tokens an answer to `ids` may have; None = unlimited."""
        if not self.context_length:
            return None
        return self.context_length - len(ids) - self._extra_tokens()

    # --- one turn ---------------------------------------------------------------------------

    def send(self, text: str) -> Iterator[GenerationResponse]:
        """Stream the answer to `text`. The turn is recorded however the stream ends:
        completed, closed early, or interrupted (Ctrl-C): the partial answer stays in the
        conversation, as it was shown.

        Raises ContextFullError (before anything changes) if the turn does not fit.
        """
        check_text(text, "the message")
        ids = self.turn_ids(text)
        room = self.room(ids)
        if room is not None and room < 1:
            raise ContextFullError(
                f"this turn needs {len(ids)} tokens of context but the model has "
                f"{self.context_length}; /reset starts a new conversation"
            )
        max_tokens = self.max_tokens if room is None else min(self.max_tokens, room)
        if self.seed is not None and not self._seeded:
            self._seeded = True
            seed = self.seed
        else:
            seed = None
        return self._stream(text, ids, max_tokens, seed)

    def _stream(self, text, ids, max_tokens, seed) -> Iterator[GenerationResponse]:
        stream = stream_generate(
            self.model,
            self.tokenizer,
            ids,
            self.drafter,
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=seed,
            plan=self.plan,
            cache=self.cache,
            lookup_memory=self.lookup_memory,
            lookup_client=self.lookup_client,
        )
        tokens: list[int] = []
        pieces: list[str] = []
        last: GenerationResponse | None = None
        failed = False
        try:
            for response in stream:
                tokens.append(response.token)
                pieces.append(response.text)
                last = response
                yield response
        except GenerationError:
            failed = True  # a rejected request leaves the conversation as it was
            raise
        finally:
            stream.close()  # runs stream_generate's cleanup: the cache then matches `tokens`
            if not failed:
                self._record(text, ids, tokens, pieces, last, max_tokens)

    def _record(self, text, ids, tokens, pieces, last, max_tokens) -> None:
        finish = last.finish_reason if last is not None else None
        if finish == "stop" and tokens and tokens[-1] in eos_ids(self.tokenizer):
            tokens = tokens[:-1]  # the template's own end of turn is appended next turn
        self.messages.append({"role": "user", "content": text})
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
        self.ids = list(ids) + tokens
        stats = last.stats if last is not None else None
        self.turns.append(
            TurnRecord(
                prompt_tokens=stats.prompt_tokens if stats else 0,
                num_tokens=last.generation_tokens if last is not None else 0,
                finish_reason=finish or "interrupted",
                stats=stats,
                capped=max_tokens < self.max_tokens,
            )
        )
