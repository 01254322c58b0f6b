"""Relay one prediction to TorchServe and its answer back, as it arrives.

The body is read whole (it is bounded by ``max_request_bytes``, and TorchServe wants a
Content-Length anyway); the answer is streamed: its bytes go to the client as TorchServe
sends them, so a streaming generation reaches the client token by token. A stream's first
piece is read before anything goes to the client, so until then the prediction can still be
sent again.

While the app heals, a prediction waits in the front until it serves again
(``heal_wait_s``, ``heal_wait_requests``; 503 with ``Retry-After`` past either). An app still
starting answers 503 at once: a start can take minutes, and Vertex sends no traffic before
the health route says 200 anyway. Then, what can end a relay early:

- the worker died (the healer cuts the ``HeldRequest`` on the async path; TorchServe answers
  ``Worker died.`` on the dynamic one) before a byte reached the client: the prediction is
  sent again once the app serves, once (``HeldRequest.replay`` decides); a second death
  answers 507. Once a stream has begun, it ends with its protocol's error event, saying it
  was cut;
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

from gateway.apps import AppState
from gateway.contract import REQUEST_ID_HEADER, predict_route
from gateway.held_request import HeldRequest
from gateway.torchserve import pid_alive

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
STREAM_CUT = "the model worker died during this answer, which is cut short here; retry it"
# How long a prediction that TorchServe failed waits to learn whether its worker died (the
# healer looks every 0.2 s).
WORKER_DEATH_SEEN_S = 2.0


class Lost:
    """The worker died before a byte of the answer reached the client: the prediction may be sent again."""


LOST = Lost()


class Full:
    """TorchServe answered 503 ("no worker", its words for a full queue too) where that is no
    refusal: the app's worker had just died (the healer had not seen it yet), or the prediction
    waited out a heal or is a replay, and the heal released every waiting prediction at once, more
    than the job queue takes. Either way it was promised a wait, so it is sent again."""


FULL = Full()
# The pause before a prediction that met a full queue after a heal is sent again.
FULL_RETRY_S = 0.5


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
    if not state.ready and not state.healing:
        return unavailable(front, app, "still loading", dialect)
    arrived = time.monotonic()
    if body is None:
        try:
            body = await read_body(request, front.settings.max_request_bytes, front.settings.body_timeout_s)
        except BodyError as exc:
            return exc.response(dialect)
        except ClientDisconnect:
            front.metrics.disconnects.labels(app).inc()
            return Response(status_code=499)
    waited_for_heal = not state.serving.is_set()
    refusal = await _until_serving(front, state, request, dialect)
    if refusal is not None:
        return refusal
    wait_until = arrived + front.settings.heal_wait_s
    with HeldRequest(front.apps, front.metrics, app, arrived, lambda id_: front.canceller.cancel(app, id_)) as held:

        def waits_out_503() -> bool:
            """Within the heal wait's bound, TorchServe's 503 is no refusal when its worker has just died
            or this prediction waited out a heal."""
            in_time = time.monotonic() + FULL_RETRY_S < wait_until
            return in_time and (waited_for_heal or held.replays > 0 or _lost_a_worker(state))

        while True:
            answer = await _forward(front, request, path, body, held, dialect, waits_out_503)
            if isinstance(answer, Full):
                if _lost_a_worker(state):
                    # The healer sees the death within its next look; then this waits like any prediction sent during a heal.
                    await held.worker_died(WORKER_DEATH_SEEN_S)
                    refusal = await _until_serving(front, state, request, dialect)
                    if refusal is not None:
                        return held.answered(refusal)
                    waited_for_heal = True
                else:
                    await asyncio.sleep(FULL_RETRY_S)
                held.hold_again()
                continue
            if not isinstance(answer, Lost):
                return held.answered(answer)
            if not held.replay(body):
                return held.answered(_worker_died(front, dialect))
            # TorchServe answers "Worker died." before the healer's next look: let it mark the
            # heal first, so the replay waits for the app rather than queueing ahead of its probe.
            await held.worker_died(WORKER_DEATH_SEEN_S)
            refusal = await _until_serving(front, state, request, dialect, replay=True)
            if refusal is not None:
                held.replay_ended("client-left" if refusal.status_code == 499 else "not-served")
                return held.answered(refusal)
            held.hold()


def _lost_a_worker(state: AppState) -> bool:
    """The app heals, or one of its workers has died and the healer has not looked yet."""
    return state.healing or not all(pid_alive(pid) for pid in state.pids)


async def _until_serving(front, state: AppState, request: Request, dialect: Dialect, replay: bool = False) -> Response | None:
    """None once ``state`` serves (at once, unless it heals); else the answer: 503 (507 for a
    replay, whose worker died) past the wait's bounds, 499 when the client left meanwhile."""
    if state.serving.is_set():
        return None
    settings = front.settings
    bound = None if replay else settings.heal_wait_requests
    outcome = await front.apps.until_serving(state, settings.heal_wait_s, bound, _disconnected(request))
    if not replay:
        front.metrics.heal_waits.labels(state.name, WAIT_OUTCOMES[outcome]).inc()
    if outcome == "serving":
        return None
    if outcome == "gone":
        front.metrics.disconnects.labels(state.name).inc()
        return Response(status_code=499)
    if replay:
        return _worker_died(front, dialect)
    return unavailable(front, state.name, "being restarted after a worker crash", dialect)


WAIT_OUTCOMES = {"serving": "served", "full": "full", "timeout": "timeout", "gone": "client-left"}


async def _forward(
    front,
    request: Request,
    path: str,
    body: bytes,
    held: HeldRequest,
    dialect: Dialect,
    waits_out_503: Callable[[], bool] = lambda: False,
) -> Response | Lost | Full:
    """TorchServe's answer; ``LOST`` when the worker died before a byte of it reached the client;
    ``FULL`` for TorchServe's 503 when ``waits_out_503()``; the front's own answer when the client
    left or TorchServe failed."""
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
    if not await _done_first(sending, cut, request):
        sending.cancel()
        cut.cancel()
        if held.cut.is_set():
            return LOST
        held.client_left()
        return Response(status_code=499)
    try:
        response = sending.result()
    except httpx2.HTTPError as exc:
        cut.cancel()
        if held.cut.is_set():
            return LOST
        log.warning("TorchServe failed for %s %s: %s", request.method, path, exc)
        return dialect.error(502, "TorchServe is not answering; retry it")
    if held.cut.is_set() or (response.status_code == 503 and waits_out_503()):
        cut.cancel()
        await response.aclose()
        return LOST if held.cut.is_set() else FULL
    streaming = "chunked" in response.headers.get("transfer-encoding", "").lower()
    reword = dialect.rewords_upstream and response.status_code >= 400
    if (response.status_code in (500, 507) or reword) and not streaming:
        # The dynamic path: TorchServe answers a dead worker's requests itself, as
        # {"message": "Worker died."} (500 or 507).
        try:
            text = await response.aread()
        except httpx2.HTTPError:
            text = b""
        finally:
            cut.cancel()
            await response.aclose()
        if b"Worker died" in text:
            return LOST
        held.waited(response.status_code)
        if reword and not _in_shape(text):
            busy = {"Retry-After": str(front.settings.retry_after_s)} if response.status_code == 503 else None
            return dialect.error(response.status_code, _upstream_message(text), busy)
        kept = {k: v for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP}
        return Response(text, response.status_code, kept)
    held.waited(response.status_code)
    raw = response.aiter_raw().__aiter__()
    first = b""
    if streaming:
        # Nothing has reached the client yet: until the first piece comes, a death is a replay.
        first_piece = await _first_piece(raw, cut, request)
        if first_piece is None or isinstance(first_piece, Lost):
            cut.cancel()
            await response.aclose()
            if first_piece is None:
                held.client_left()
                return Response(status_code=499)
            return LOST
        first = first_piece
        held.first_byte(response.status_code)
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
        _pieces(held, response, raw, first, cut, streaming, dialect),
        status_code=response.status_code,
        headers=_header_dict(answer_headers, response),
        background=BackgroundTask(cleanup),
    )


async def _first_piece(raw: AsyncIterator[bytes], cut: asyncio.Future, request: Request) -> bytes | Lost | None:
    """A stream's first piece (b"" for an empty stream); ``LOST`` when the worker died first (the
    healer's cut, or the connection broken while the app heals); None when the client left."""
    piece = asyncio.ensure_future(raw.__anext__())
    if not await _done_first(piece, cut, request):
        _discard(piece)
        return LOST if cut.done() else None
    try:
        return piece.result()
    except StopAsyncIteration:
        return b""
    except httpx2.HTTPError as exc:
        log.warning("TorchServe's stream broke off before its first piece: %s", exc)
        return LOST


def _header_dict(items: list[tuple[str, str]], response: httpx2.Response) -> dict[str, str]:
    """Starlette takes a mapping; a repeated header (rare from TorchServe) is joined with commas."""
    joined: dict[str, str] = {}
    for name, value in items:
        joined[name] = f"{joined[name]}, {value}" if name in joined else value
    if "content-length" in response.headers and "chunked" not in response.headers.get("transfer-encoding", ""):
        joined["content-length"] = response.headers["content-length"]
    return joined


async def _pieces(
    held: HeldRequest,
    response: httpx2.Response,
    raw: AsyncIterator[bytes],
    first: bytes,
    cut: asyncio.Future,
    streaming: bool,
    dialect: Dialect,
) -> AsyncIterator[bytes]:
    """The answer's bytes as they arrive, after ``first`` (a stream's first piece, already read);
    a dead worker ends the stream with the protocol's error event saying it was cut."""
    status = response.status_code
    piece: asyncio.Future | None = None
    try:
        if first:
            yield first
        while True:
            piece = asyncio.ensure_future(raw.__anext__())
            await asyncio.wait({piece, cut}, return_when=asyncio.FIRST_COMPLETED)
            if not piece.done():
                _discard(piece)
                yield dialect.broken_stream(STREAM_CUT, 507)
                return
            try:
                data = piece.result()
            except StopAsyncIteration:
                return
            except httpx2.HTTPError as exc:
                log.warning("TorchServe's answer to %s broke off: %s", held.app, exc)
                if streaming:
                    # The dynamic path: TorchServe breaks off the streams of a worker that died.
                    if await held.worker_died(WORKER_DEATH_SEEN_S):
                        yield dialect.broken_stream(STREAM_CUT, 507)
                    else:
                        yield dialect.broken_stream("TorchServe broke off the answer; retry it", 502)
                return
            yield data
    except asyncio.CancelledError:
        held.client_left()
        raise
    finally:
        cut.cancel()
        if piece is not None:
            _discard(piece)
        await response.aclose()
        held.finished(status)


def _discard(task: asyncio.Future) -> None:
    """Cancels a read the answer no longer needs; its end (the closed connection's error, often) is
    retrieved, so that asyncio does not log it as never retrieved."""
    task.cancel()
    task.add_done_callback(lambda done: done.cancelled() or done.exception())


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


async def _done_first(work: asyncio.Future, cut: asyncio.Future, request: Request) -> bool:
    """Wait until ``work`` is done, the worker dies (``cut``) or the client leaves; True when
    ``work`` finished, whichever else happened too. The caller cancels what is left."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, cut, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    return work.done()


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is already read, so only that can come)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
