"""Every error this package raises on purpose, in one place.

`RedrafterError` is the base: the command line prints any of them as one line (no traceback),
and library callers can catch it to tell bad input from bugs. Each is a `ValueError`, so code
written against the earlier per-module errors keeps working. `TrainInterrupted` is the one
exception: it is a `KeyboardInterrupt` that says the work was saved.
"""

from __future__ import annotations

import json
from pathlib import Path


class RedrafterError(ValueError):
    """Bad input or settings: the message names the file, option or value."""


class LoadError(RedrafterError):
    """A model, tokenizer or weight file that cannot be loaded; the message names the file."""


class GGUFError(LoadError):
    """A GGUF file this converter cannot turn into a model directory."""


class UnsupportedModelError(RedrafterError):
    """The checkpoint's architecture is not one this package implements."""


class ConvertError(RedrafterError):
    """A checkpoint that cannot be converted; the message names the file and the problem."""


class DrafterError(RedrafterError):
    """A drafter checkpoint or configuration that cannot be used (as it is, or with this base)."""


class GenerationError(RedrafterError):
    """Bad generation request (empty prompt, context overflow, bad settings); `param` names
    the request field it is about, when there is one (the server's 400 reports it)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ConstraintError(GenerationError):
    """A response format or JSON schema that cannot constrain generation (bad or unsupported
    schema, a tokenizer the grammar library cannot read)."""


class ContextFullError(GenerationError):
    """The next turn does not fit in the model's context window."""


class NotTextError(GenerationError):
    """Input that is not UTF-8 text."""


class PromptError(RedrafterError):
    """A prompt file or prompt source that cannot be read."""


class TrainError(RedrafterError):
    """Bad training input: prompt file, settings, or a work directory made for something else."""


class BenchError(RedrafterError):
    """A benchmark request that cannot run (bad prompt file, unknown method, no drafter)."""


class DistributedError(RedrafterError):
    """A distributed run that cannot start or go on (no backend, a model that does not split
    over the ranks, another rank gone)."""


class TrainInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: the work is saved and the same call resumes it."""

    def __init__(self, message: str, step: int | None = None, work_dir: Path | None = None):
        super().__init__(message)
        self.step = step
        self.work_dir = work_dir


def read_json_object(path: Path, error: type[RedrafterError] = RedrafterError) -> dict:
    """The JSON object in the file `path`; `error` naming the file when it is missing, not
    UTF-8 JSON, or not an object. Every config file the package reads goes through here."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise error(f"{path}: not valid JSON ({first})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data
