"""The OpenAI API's routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/responses``, ``GET /v1/models``.

Its semantics live in the handler (``handler/api/openai``), where they share validation,
limits and statuses with the native API. These routes only pick the app the body's
``model`` names (404 in OpenAI's shape for one not served; the default app when the body
names none) and relay the body unchanged to TorchServe's ``/predictions/APP`` with
``X-LLM-Protocol``, the answer (JSON, or an SSE stream) streaming back as it comes. What the
front refuses itself (a body too large, an app still loading, a dead worker) is worded in
OpenAI's ``{"error": {message, type, param, code}}`` too; so is a stream that breaks off.
"""

from __future__ import annotations

import json
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.contract import CHAT_COMPLETIONS_ROUTE, COMPLETIONS_ROUTE, MODELS_ROUTE, PROTOCOL_HEADER, RESPONSES_ROUTE
from gateway.relay import Dialect, relay_named

CODES = {
    401: "invalid_api_key",
    404: "model_not_found",
    408: "timeout",
    413: "request_too_large",
    502: "upstream_unavailable",
    503: "unavailable",
    507: "worker_died",
}
STARTED = int(time.time())


def openai_error(status: int, message: str, headers: dict[str, str] | None = None, **extra) -> JSONResponse:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = {"message": message, "type": kind, "param": extra.get("field"), "code": CODES.get(status)}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def broken_stream(message: str, code: int) -> bytes:
    """An SSE error event and the stream's end; the blank lines first close any event cut short."""
    event = {"error": {"message": message, "type": "server_error", "param": None, "code": CODES.get(code)}}
    return b"\n\ndata: " + json.dumps(event).encode() + b"\n\ndata: [DONE]\n\n"


def dialect(protocol: str) -> Dialect:
    return Dialect(openai_error, broken_stream, ((PROTOCOL_HEADER, protocol),), rewords_upstream=True)


def broken_response_stream(message: str, code: int) -> bytes:
    """The Responses API's `error` event, which its SDK raises on."""
    event = {"type": "error", "code": CODES.get(code, "server_error"), "message": message, "param": None, "sequence_number": 0}
    return b"\n\nevent: error\ndata: " + json.dumps(event).encode() + b"\n\n"


CHAT = dialect("openai-chat")
COMPLETIONS = dialect("openai-completions")
RESPONSES = Dialect(openai_error, broken_response_stream, ((PROTOCOL_HEADER, "openai-responses"),), rewords_upstream=True)


async def chat_completions(request: Request) -> Response:
    return await _relay(request, CHAT)


async def completions(request: Request) -> Response:
    return await _relay(request, COMPLETIONS)


async def responses(request: Request) -> Response:
    return await _relay(request, RESPONSES)


async def _relay(request: Request, protocol: Dialect) -> Response:
    return await relay_named(request, protocol, _unknown)


def _unknown(model: str, served: str) -> JSONResponse:
    return openai_error(404, f"the model {model[:100]!r} does not exist; served: {served}", field="model")


def _card(name: str) -> dict:
    return {"id": name, "object": "model", "created": STARTED, "owned_by": "torchserve-llm"}


async def models(request: Request) -> Response:
    front = request.app.state.front
    return JSONResponse({"object": "list", "data": [_card(name) for name in front.apps.names()]})


async def model(request: Request) -> Response:
    front = request.app.state.front
    name = request.path_params["model"]
    return JSONResponse(_card(name)) if name in front.apps else _unknown(name, ", ".join(front.apps.names()))


ROUTES = {CHAT_COMPLETIONS_ROUTE: "POST", COMPLETIONS_ROUTE: "POST", RESPONSES_ROUTE: "POST", MODELS_ROUTE: "GET"}


async def no_route(request: Request) -> Response:
    """Anything else under /v1: a known path with the wrong method is a 405, the rest a 404."""
    path = request.url.path.rstrip("/")
    if path in ROUTES:
        return openai_error(405, f"{request.method} is not allowed on {path}; use {ROUTES[path]}")
    served = ", ".join(f"{method} {route}" for route, method in ROUTES.items())
    return openai_error(404, f"no route {request.method} {request.url.path}; served: {served}")


def openai_routes() -> list[Route]:
    return [
        Route(CHAT_COMPLETIONS_ROUTE, chat_completions, methods=["POST"]),
        Route(COMPLETIONS_ROUTE, completions, methods=["POST"]),
        Route(RESPONSES_ROUTE, responses, methods=["POST"]),
        Route(MODELS_ROUTE, models, methods=["GET"]),
        Route(MODELS_ROUTE + "/{model:path}", model, methods=["GET"]),
        Route("/v1/{rest:path}", no_route, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
    ]
