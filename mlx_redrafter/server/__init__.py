"""`mlx-redrafter serve`: a local OpenAI- and Anthropic-compatible HTTP server with ReDrafter
speculative decoding, locked to its clients.

`protocol` (what clients may send), `engine` (the model's worker thread, queue, prompt
caches in `caches`), `prompting` (requests -> token ids), `tools` (tool-call formats),
`formats` (response_format constraints, logprobs shapes), `flow` (one request's way
through), one adapter per API (`openai_api`, `anthropic_api`), `door` (host, origin, key,
content type, size, timeouts) and `app` (routes, the server).
"""

from .app import bind, create_app, make_server, serve, url_of
from .caches import PromptCaches
from .door import API_KEY_ENV, DoorSettings
from .engine import Engine, Outcome
from .protocol import APIError, Limits

__all__ = [
    "API_KEY_ENV",
    "APIError",
    "DoorSettings",
    "Engine",
    "Limits",
    "Outcome",
    "PromptCaches",
    "bind",
    "create_app",
    "make_server",
    "serve",
    "url_of",
]
