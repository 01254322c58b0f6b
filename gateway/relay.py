"""Relay one prediction to TorchServe and its answer back, as it arrives.

The body is read whole (it is bounded by ``max_request_bytes``, and TorchServe wants a
Content-Length anyway); the answer is streamed: its bytes go to the client as TorchServe
sends them, so a streaming generation reaches the client token by token. Three things can
end a relay early:

- the worker died (the healer cuts the ``HeldRequest``): 507 JSON saying to retry, or, once a
  stream has started, a last JSON line saying so;
- the client went away: the upstream request is closed, and the app's workers are told to
  stop its generation (``gateway.cancel``; TorchServe 0.12 itself would not tell the handler);
- TorchServe does not answer: 502 JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import httpx2
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from gateway.contract import REQUEST_ID_HEADER, predict_route
from gateway.held_request import HeldRequest

log = logging.getLogger(__name__)

# RFC 9110 §7.6.1: headers that describe one connection, not the message.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "expect",
    }
)
WORKER_DIED = "the model worker died during this request; retry it"


def error(status: int, message: str, headers: dict[str, str] | None = None, **extra) -> JSONResponse:
    return JSONResponse({"error": message, "code": status, **extra}, status_code=status, headers=headers)


def _broken_line(message: str, code: int) -> bytes:
    return b"\n" + json.dumps({"error": message, "code": code}).encode()


@dataclass(frozen=True)
class Dialect:
    """How the front words its own answers for one protocol: its refusals (`error`), the last piece
    of a stream that broke off, and the headers that tell the handler which protocol it speaks.
    With `rewords_upstream`, TorchServe's own refusals (queue full) are reworded too; the
    handler's are already in the protocol's shape."""

    error: Callable[..., JSONResponse] = error
    broken_stream: Callable[[str, int], bytes] = _broken_line
    headers: tuple[tuple[str, str], ...] = ()
    rewords_upstream: bool = False


NATIVE = Dialect()


class BodyError(Exception):
    def __init__(self, status: int, message: str, **extra) -> None:
        self.status, self.message, self.extra = status, message, extra

    def response(self, dialect: Dialect) -> JSONResponse:
        return dialect.error(self.status, self.message, **self.extra)


def unavailable(front, app: str, why: str, dialect: Dialect = NATIVE) -> JSONResponse:
    seconds = front.settings.retry_after_s
    return dialect.error(503, f"{app} is {why}; retry after {seconds} s", {"Retry-After": str(seconds)})


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body, refused past ``limit`` bytes (413) or when a piece is slower than ``timeout_s`` (408)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise BodyError(400, f"Content-Length {declared!r} is not a number", field="Content-Length")
        if int(declared) > limit:
            raise _too_large(limit, int(declared))
    body = bytearray()
    stream = request.stream().__aiter__()
    while True:
        try:
            piece = await asyncio.wait_for(stream.__anext__(), timeout_s)
        except StopAsyncIteration:
            return bytes(body)
        except TimeoutError:
            raise BodyError(408, f"the request body stalled for {timeout_s:.0f} s") from None
        body += piece
        if len(body) > limit:
            raise _too_large(limit, len(body))


def _too_large(limit: int, size: int) -> BodyError:
    return BodyError(413, f"the request body must be <= {limit} bytes, got {size}", field="body", limit=limit, value=size)


def named_app(body: bytes, default: str) -> str:
    """The app the body's `model` names (the OpenAI and Anthropic APIs both pick it so); a body
    that is not JSON, or names none, goes to the default app, whose handler then answers it
    (a bad body with its error)."""
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError, RecursionError):
        return default
    return model if isinstance(model, str) and model else default


def forwardable(headers) -> list[tuple[str, str]]:
    """The end-to-end headers of a message, repeats kept; also drops those named in ``Connection:``."""
    named = {token.strip().lower() for value in headers.getlist("connection") for token in value.split(",")}
    return [(k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP and k.lower() not in named]


async def relay_named(request: Request, dialect: Dialect, unknown: Callable[[str, str], JSONResponse]) -> Response:
    """A protocol route's request: its body read under the front's limits, then relayed to the app its
    `model` names. `unknown(model, served)` refuses a model no app serves, in the protocol's own words."""
    front = request.app.state.front
    try:
        body = await read_body(request, front.settings.max_request_bytes, front.settings.body_timeout_s)
    except BodyError as exc:
        return exc.response(dialect)
    except ClientDisconnect:
        return Response(status_code=499)
    app = named_app(body, front.settings.app)
    if app not in front.apps:
        return unknown(app, ", ".join(front.apps.names()))
    return await relay(request, app, predict_route(app), dialect, body)


async def relay(request: Request, app: str, path: str, dialect: Dialect = NATIVE, body: bytes | None = None) -> Response:
    """Forward ``request`` (its ``body`` when the caller has read it already) to TorchServe's ``path`` for
    ``app``; the answer streams back."""
    front = request.app.state.front
    state = front.apps.get(app)
    if state is None:
        return dialect.error(404, f"no app named {app!r}; served: {front.apps.names()}", field="app")
    if not state.ready:
        return unavailable(front, app, "being restarted after a worker crash" if state.healing else "still loading", dialect)
    arrived = time.monotonic()
    if body is None:
        try:
            body = await read_body(request, front.settings.max_request_bytes, front.settings.body_timeout_s)
        except BodyError as exc:
            return exc.response(dialect)
        except ClientDisconnect:
            front.metrics.disconnects.labels(app).inc()
            return Response(status_code=499)
    with HeldRequest(front.apps, front.metrics, app, arrived, lambda id_: front.canceller.cancel(app, id_)) as held:
        return held.answered(await _forward(front, request, path, body, held, dialect))


async def _forward(front, request: Request, path: str, body: bytes, held: HeldRequest, dialect: Dialect) -> Response:
    """TorchServe's answer, or the front's own when the worker died, the client left or TorchServe failed."""
    headers = [h for h in forwardable(request.headers) if h[0].lower() != REQUEST_ID_HEADER.lower()] + list(dialect.headers)
    headers.append((REQUEST_ID_HEADER, held.request_id))
    headers.append(("X-Forwarded-For", request.client.host if request.client else ""))
    query = request.url.query
    upstream = front.client.build_request(
        request.method,
        f"{front.upstream.inference_url}{path}" + (f"?{query}" if query else ""),
        headers=headers,
        content=body,
        extensions={"trace": held.trace},
    )
    sending = asyncio.ensure_future(front.client.send(upstream, stream=True))
    cut = asyncio.ensure_future(held.cut.wait())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({sending, cut, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not sending.done():
        sending.cancel()
        cut.cancel()
        if held.cut.is_set():
            return _worker_died(front, dialect)
        held.client_left()
        return Response(status_code=499)
    try:
        response = sending.result()
    except httpx2.HTTPError as exc:
        cut.cancel()
        if held.cut.is_set():
            return _worker_died(front, dialect)
        log.warning("TorchServe failed for %s %s: %s", request.method, path, exc)
        return dialect.error(502, "TorchServe is not answering; retry it")
    if held.cut.is_set():
        cut.cancel()
        await response.aclose()
        return _worker_died(front, dialect)
    held.waited(response.status_code)
    streaming = "chunked" in response.headers.get("transfer-encoding", "").lower()
    reword = dialect.rewords_upstream and response.status_code >= 400
    if (response.status_code in (500, 507) or reword) and not streaming:
        # The dynamic path: TorchServe answers a dead worker's requests itself, as
        # {"message": "Worker died."} (500 or 507). Say it the same way on both paths.
        try:
            text = await response.aread()
        except httpx2.HTTPError:
            text = b""
        finally:
            cut.cancel()
            await response.aclose()
        if b"Worker died" in text:
            return _worker_died(front, dialect)
        if reword and not _in_shape(text):
            return dialect.error(response.status_code, _upstream_message(text))
        kept = {k: v for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP}
        return Response(text, response.status_code, kept)
    answer_headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in HOP_BY_HOP]
    if response.status_code == 503 and "retry-after" not in response.headers:
        # TorchServe's "queue full" (its message says "no worker"): it means retry later.
        answer_headers.append(("retry-after", str(front.settings.retry_after_s)))

    async def cleanup() -> None:
        # Runs even when the client left before the first byte, when the generator never started.
        cut.cancel()
        await response.aclose()
        held.release()

    return StreamingResponse(
        _pieces(held, response, cut, streaming, dialect),
        status_code=response.status_code,
        headers=_header_dict(answer_headers, response),
        background=BackgroundTask(cleanup),
    )


def _header_dict(items: list[tuple[str, str]], response: httpx2.Response) -> dict[str, str]:
    """Starlette takes a mapping; a repeated header (rare from TorchServe) is joined with commas."""
    joined: dict[str, str] = {}
    for name, value in items:
        joined[name] = f"{joined[name]}, {value}" if name in joined else value
    if "content-length" in response.headers and "chunked" not in response.headers.get("transfer-encoding", ""):
        joined["content-length"] = response.headers["content-length"]
    return joined


async def _pieces(
    held: HeldRequest, response: httpx2.Response, cut: asyncio.Future, streaming: bool, dialect: Dialect
) -> AsyncIterator[bytes]:
    """The answer's bytes as they arrive; a dead worker ends the stream with a JSON line saying so."""
    status = response.status_code
    first = True
    raw = response.aiter_raw().__aiter__()
    try:
        while True:
            piece = asyncio.ensure_future(raw.__anext__())
            await asyncio.wait({piece, cut}, return_when=asyncio.FIRST_COMPLETED)
            if not piece.done():
                piece.cancel()
                yield dialect.broken_stream(WORKER_DIED, 507)
                return
            try:
                data = piece.result()
            except StopAsyncIteration:
                return
            except httpx2.HTTPError as exc:
                log.warning("TorchServe's answer to %s broke off: %s", held.app, exc)
                if streaming:
                    yield dialect.broken_stream("TorchServe broke off the answer; retry it", 502)
                return
            if first and streaming:
                held.first_byte(status)
            first = False
            yield data
    except asyncio.CancelledError:
        held.client_left()
        raise
    finally:
        cut.cancel()
        await response.aclose()
        held.finished(status)


def _worker_died(front, dialect: Dialect) -> JSONResponse:
    seconds = front.settings.retry_after_s
    return dialect.error(507, WORKER_DIED, {"Retry-After": str(seconds)})


def _in_shape(text: bytes) -> bool:
    """Already an error in the handler's protocol shape: `{"error": {...}}`."""
    try:
        body = json.loads(text)
    except ValueError:
        return False
    return isinstance(body, dict) and isinstance(body.get("error"), dict)


def _upstream_message(text: bytes) -> str:
    """TorchServe's own refusal, `{"code", "type", "message"}`, as one message."""
    try:
        body = json.loads(text)
    except ValueError:
        return text.decode(errors="replace")[:500] or "TorchServe refused the request"
    return str(body.get("message", body)) if isinstance(body, dict) else str(body)


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is already read, so only that can come)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
