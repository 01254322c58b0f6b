"""The front's optional API key: with ``LLM_API_KEY`` set, every route but the health routes wants it.

A client sends it as ``Authorization: Bearer KEY`` (OpenAI's SDKs, vLLM's and llama.cpp's
``--api-key``) or ``x-api-key: KEY`` (Anthropic's SDK); either is enough. Health stays open
because load balancers and Vertex probe it without credentials (Vertex deployments leave the
key unset: Vertex authenticates its callers itself). A refusal is a 401 in the route's own
error shape, so each SDK raises its own authentication error: Anthropic's on ``/v1/messages``,
OpenAI's elsewhere under ``/v1``, the native JSON on the rest. The key is compared in constant
time (``hmac.compare_digest``), so a timing cannot reveal it piece by piece.
"""

from __future__ import annotations

import hmac
from typing import Callable, Iterable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.anthropic_api import anthropic_error
from gateway.contract import MESSAGES_ROUTE
from gateway.openai_api import openai_error
from gateway.relay import error

REFUSAL = "a valid API key is required: send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'"
CHALLENGE = {"WWW-Authenticate": "Bearer"}


def presented_keys(headers: Iterable[tuple[bytes, bytes]]) -> list[bytes]:
    """Every key the request offers: each bearer token and each ``x-api-key``."""
    keys = []
    for name, value in headers:
        name = name.lower()
        if name == b"x-api-key":
            keys.append(value.strip())
        elif name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                keys.append(token.strip())
    return keys


def refusal_shape(path: str, native_paths: frozenset[str]) -> Callable[..., JSONResponse]:
    """The error shape of the route at ``path``: native for Vertex's predict route (which may sit
    under ``/v1``), Anthropic's for the Messages API, OpenAI's for the rest of ``/v1``."""
    if path in native_paths:
        return error
    if path == MESSAGES_ROUTE or path.startswith(MESSAGES_ROUTE + "/"):
        return anthropic_error
    if path == "/v1" or path.startswith("/v1/"):
        return openai_error
    return error


class ApiKeyGuard:
    """ASGI middleware in front of every route: open paths pass, the rest need the key."""

    def __init__(self, app: ASGIApp, key: str, open_paths: Iterable[str], native_paths: Iterable[str] = ()) -> None:
        self.app = app
        self.key = key.encode()
        self.open_paths = frozenset(open_paths)
        self.native_paths = frozenset(native_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths or self.allowed(scope["headers"]):
            await self.app(scope, receive, send)
            return
        shape = refusal_shape(scope["path"], self.native_paths)
        await shape(401, REFUSAL, CHALLENGE)(scope, receive, send)

    def allowed(self, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        # Every offered key is compared, so the time taken does not depend on which one matched.
        matches = [hmac.compare_digest(key, self.key) for key in presented_keys(headers)]
        return any(matches)
