"""Every route of the front, in one table; under ``/v1``, Anthropic's Messages API's come from
``anthropic_api`` and the OpenAI API's from ``openai_api``.

Order matters: Vertex's routes come first, because ``$AIP_PREDICT_ROUTE`` may itself start
with ``/v1`` or ``/predictions``.
"""

from __future__ import annotations

from dataclasses import replace

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.anthropic_api import anthropic_routes
from gateway.auth import ApiKeyGuard
from gateway.contract import HEALTH_ROUTE, predict_route
from gateway.health import dtype_report
from gateway.openai_api import openai_routes
from gateway.relay import error, relay


async def health(request: Request) -> Response:
    """200 only while every served app has a READY worker that answered, and is not healing; each app's
    entry also shows the dtype decision its worker serves with."""
    front = request.app.state.front
    apps = []
    for state in front.apps:
        readiness = state.readiness()
        if readiness.ready:
            readiness = await front.live_readiness(state.name)
        apps.append(replace(readiness, dtype=dtype_report(front.upstream.run_dir, state.name)))
    ready = all(a.ready for a in apps)
    headers = None if ready else {"Retry-After": str(front.settings.retry_after_s)}
    return JSONResponse(
        {"status": "ready" if ready else "unavailable", "apps": [a.payload() for a in apps]},
        status_code=200 if ready else 503,
        headers=headers,
    )


async def ping(request: Request) -> Response:
    """Liveness, as TorchServe's /ping was: the front answers. Readiness is the health route."""
    return JSONResponse({"status": "Healthy"})


async def vertex_predict(request: Request) -> Response:
    front = request.app.state.front
    return await relay(request, front.settings.app, predict_route(front.settings.app))


async def predictions(request: Request) -> Response:
    """``/predictions/APP`` and ``/predictions/APP/VERSION/...``, as TorchServe has them."""
    return await relay(request, request.path_params["app"], request.url.path)


async def not_found(request: Request, exc: Exception) -> Response:
    return error(404, f"no route {request.url.path}; predictions go to {predict_route('APP')}, health to {HEALTH_ROUTE}")


async def wrong_method(request: Request, exc: Exception) -> Response:
    return error(405, f"{request.method} is not allowed on {request.url.path}")


async def metrics(request: Request) -> Response:
    front = request.app.state.front
    return Response(await front.metrics_text(), media_type="text/plain; version=0.0.4; charset=utf-8")


def front_routes(settings) -> list[Route]:
    routes = [Route(settings.health_route, health, methods=["GET"])]
    if settings.health_route != HEALTH_ROUTE:
        routes.append(Route(HEALTH_ROUTE, health, methods=["GET"]))
    routes += [
        Route(settings.predict_route, vertex_predict, methods=["POST"]),
        Route("/predictions/{app}", predictions, methods=["POST", "PUT"]),
        Route("/predictions/{app}/{rest:path}", predictions, methods=["POST", "PUT"]),
        Route("/ping", ping, methods=["GET"]),
        *anthropic_routes(),
        *openai_routes(),
    ]
    return routes


def guarded(settings) -> list[Middleware]:
    """The API key's guard when ``LLM_API_KEY`` is set (``gateway.auth``); health stays open."""
    if not settings.api_key:
        return []
    return [
        Middleware(ApiKeyGuard, key=settings.api_key, open_paths=settings.open_routes, native_paths=(settings.predict_route,))
    ]


def build_app(front) -> Starlette:
    app = Starlette(
        routes=front_routes(front.settings),
        exception_handlers={404: not_found, 405: wrong_method},
        middleware=guarded(front.settings),
    )
    app.state.front = front
    return app


def build_metrics_app(front) -> Starlette:
    """The metrics port: loopback unless LLM_EXPOSE_ADMIN; behind the API key too when one is set."""
    app = Starlette(
        routes=[Route("/metrics", metrics, methods=["GET"])],
        exception_handlers={404: not_found},
        middleware=guarded(front.settings),
    )
    app.state.front = front
    return app
