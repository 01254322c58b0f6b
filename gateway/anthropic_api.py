"""Anthropic's Messages API's routes: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

As with the OpenAI routes, the semantics live in the handler (``handler/api/anthropic``); these
routes pick the app the body's ``model`` names (404 for one not served, the default app when
the body names none) and relay the body unchanged with ``X-LLM-Protocol``. Everything the front
says itself on these routes (a body too large or too slow, an app loading or healing, a dead
worker, a stream that breaks off, a wrong method) is in Anthropic's shape,
``{"type": "error", "error": {"type", "message"}}``, so Anthropic's SDK raises its own error
classes. The ``x-api-key`` and ``anthropic-version`` headers are accepted; the key is checked
by the front's optional API key (``gateway.auth``), the version is not needed: one is served.
"""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.contract import COUNT_TOKENS_ROUTE, MESSAGES_ROUTE, PROTOCOL_HEADER
from gateway.relay import Dialect, relay_named

# Anthropic's error types by status; any other 4xx is an invalid request, any other 5xx an api_error.
ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def anthropic_error(status: int, message: str, headers: dict[str, str] | None = None, **extra) -> JSONResponse:
    """The front's own refusals in Anthropic's shape; ``extra`` (the field, a limit) is said by the message."""
    body = {"type": "error", "error": {"type": error_type(status), "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def broken_stream(message: str, code: int) -> bytes:
    """An ``error`` event; the blank lines first close any event cut short."""
    body = {"type": "error", "error": {"type": error_type(code), "message": message}}
    return b"\n\nevent: error\ndata: " + json.dumps(body).encode() + b"\n\n"


def dialect(protocol: str) -> Dialect:
    return Dialect(anthropic_error, broken_stream, ((PROTOCOL_HEADER, protocol),), rewords_upstream=True)


MESSAGES = dialect("anthropic-messages")
COUNT_TOKENS = dialect("anthropic-count-tokens")


async def messages(request: Request) -> Response:
    return await _relay(request, MESSAGES)


async def count_tokens(request: Request) -> Response:
    return await _relay(request, COUNT_TOKENS)


async def _relay(request: Request, protocol: Dialect) -> Response:
    return await relay_named(request, protocol, _unknown)


def _unknown(model: str, served: str) -> JSONResponse:
    return anthropic_error(404, f"model: {model[:100]!r} does not exist; served: {served}")


async def wrong_method(request: Request) -> Response:
    return anthropic_error(405, f"{request.method} is not allowed on {request.url.path}; use POST")


def anthropic_routes() -> list[Route]:
    """Before the OpenAI routes, whose catch-all under ``/v1`` would answer these paths in OpenAI's shape."""
    others = ["GET", "PUT", "DELETE", "PATCH"]
    return [
        Route(MESSAGES_ROUTE, messages, methods=["POST"]),
        Route(COUNT_TOKENS_ROUTE, count_tokens, methods=["POST"]),
        Route(MESSAGES_ROUTE, wrong_method, methods=others),
        Route(COUNT_TOKENS_ROUTE, wrong_method, methods=others),
    ]
