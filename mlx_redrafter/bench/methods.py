"""What a benchmark compares: the methods (mlx-lm, plain decoding, ReDrafter with or without
context lookup, lookup alone; lookup v1 or v2, with or without the cross-request memory), one
`Method` per beam shape in a sweep, and the checks a request must pass before any model is
loaded."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import BenchError
from ..prompts import Prompt

METHODS = (
    "mlx-lm",
    "ar",
    "redrafter",
    "lookup",
    "redrafter+lookup",  # the default: what `generate` runs with a drafter
    "lookup-v1",
    "redrafter+lookup-v1",
    "lookup+memory",
    "redrafter+lookup+memory",
)
# the methods that run the drafter
DRAFTER_METHODS = tuple(m for m in METHODS if m.startswith("redrafter"))
DEFAULT_METHOD = "redrafter+lookup"
# the single sources the default is checked against (`bench` flags the groups where it loses)
SINGLE_METHODS = ("redrafter", "lookup")
DEFAULT_WIDTHS = (1, 2, 3, 4)
DEFAULT_LENGTHS = (2, 3, 4, 5, 6)


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "mlx-lm", "ar", "redrafter" (drafter, maybe with lookup) or "lookup"
    beam_width: int | None = None
    beam_length: int | None = None
    lookup: bool = False  # context lookup candidates (with the cost-aware tree)
    draft: str | None = None  # when sampling: beam, sbs or gumbel-topk (None: the default)
    lookup_version: int = 2
    memory: bool = False  # lookup also copies from earlier prompts of the run (one client)

    @property
    def speculative(self) -> bool:
        return self.kind in ("redrafter", "lookup")


def _check_names(names: Sequence[str]) -> None:
    for name in names:
        if name not in METHODS:
            raise BenchError(f"unknown method {name!r} (choose from {', '.join(METHODS)})")


def make_methods(
    names: Sequence[str],
    shapes: Sequence[tuple[int, int]],
    sweep: bool = False,
    drafts: Sequence[str] | None = None,
) -> list[Method]:
    """Methods in the order given; `redrafter` becomes one method per beam shape in a sweep,
    and one per draft method (`--draft`, named name/draft) when several are compared."""
    out = []
    for name in names:
        _check_names([name])
        looks = {
            "lookup": "lookup" in name,
            "lookup_version": 1 if name.endswith("-v1") else 2,
            "memory": name.endswith("+memory"),
        }
        if name not in DRAFTER_METHODS:
            kind = "lookup" if looks["lookup"] else name
            out.append(Method(name, kind, **looks))
            continue
        for w, length in shapes:
            if w < 1 or length < 2:
                raise BenchError(f"beam shape W={w}, L={length}: need W >= 1 and L >= 2")
            label = f"{name}-W{w}-L{length}" if sweep else name
            for draft in drafts or [None]:
                full = f"{label}/{draft}" if drafts and len(drafts) > 1 else label
                out.append(Method(full, "redrafter", w, length, draft=draft, **looks))
    if len({m.name for m in out}) != len(out):
        raise BenchError(f"a method is listed twice: {', '.join(names)}")
    return out


def beam_shapes(widths: Sequence[int], lengths: Sequence[int]) -> list[tuple[int, int]]:
    """Every (W, L) of a sweep, widths outermost."""
    return [(w, length) for w in widths for length in lengths]


def needs_drafter(names: Sequence[str]) -> bool:
    """Whether any of these methods runs the drafter (then the caller must load one)."""
    return bool(set(DRAFTER_METHODS) & set(names))


def check_request(
    names: Sequence[str],
    prompts: Sequence[Prompt],
    sweep: bool = False,
    beam_width: int | None = None,
    beam_length: int | None = None,
    plot: str | None = None,
) -> None:
    """The checks of a `bench` request that need no model: known method names, a sweep given
    widths and lengths rather than one shape, and a plot that has something to draw (a sweep,
    or prompts from two source/category groups or more). Raises BenchError."""
    _check_names(names)
    if sweep and (beam_width or beam_length):
        raise BenchError("--sweep takes --widths/--lengths, not --beam-width/--beam-length")
    if plot and not sweep and len({(p.source, p.category) for p in prompts}) < 2:
        raise BenchError("--plot needs a --sweep, or prompts from several sources/categories")
