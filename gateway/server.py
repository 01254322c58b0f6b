"""The front's state and its two uvicorn servers: the public one and the metrics one.

Why Starlette + uvicorn + httpx2 (docs/reliability.md says more): they are maintained,
small, and already in the runtime image's dependency tree (huggingface_hub brings httpx2
and anyio). uvicorn does the HTTP/1.1 framing, chunking and keep-alive that the old
hand-written proxy did itself; httpx2 (the maintained successor of httpx) pools the
upstream connections and streams answers; Starlette routes and streams them back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import httpx2
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from gateway import health
from gateway.apps import AppRegistry
from gateway.cancel import Canceller
from gateway.management import ManagementClient, Upstream
from gateway.metrics import FrontMetrics
from gateway.routes import build_app, build_metrics_app
from gateway.settings import FrontSettings

log = logging.getLogger(__name__)


class Front:
    """What every route needs: settings, the apps, TorchServe's APIs and the upstream client, the metrics."""

    def __init__(
        self,
        settings: FrontSettings,
        apps: AppRegistry,
        management: ManagementClient,
        upstream: Upstream,
        metrics: FrontMetrics,
        canceller: Canceller | None = None,
    ) -> None:
        self.settings = settings
        # Tells the workers when a client went away (gateway.cancel); without one, nothing is cancelled.
        self.canceller = canceller or Canceller(None)
        self.apps = apps
        self.management = management
        self.upstream = upstream
        self.metrics = metrics
        self.client = httpx2.AsyncClient(
            timeout=httpx2.Timeout(settings.upstream_timeout_s, connect=10.0, pool=settings.upstream_timeout_s),
            limits=httpx2.Limits(max_connections=settings.max_connections, max_keepalive_connections=64),
        )

    async def live_readiness(self, app: str) -> health.Readiness:
        """Ask the management API now; unreachable means "not ready", never an error."""
        try:
            status, body = await self.management.describe(app)
        except httpx2.HTTPError as exc:
            return health.Readiness(False, "unavailable", app, detail=f"management API unreachable: {exc.__class__.__name__}")
        return health.readiness_from_description(app, status, body)

    async def metrics_text(self) -> bytes:
        """Ours, then TorchServe's own (``ts_*`` and the handler's), so one scrape gets both."""
        return self.metrics.render() + await self.management.metrics_text()

    async def aclose(self) -> None:
        await self.client.aclose()
        self.canceller.close()


class BoundedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, plus a deadline for a request's headers.

    uvicorn has a keep-alive timeout but none for a client that connects and then sends its
    headers slowly (or never): without one, slow clients could hold every connection slot. The
    deadline runs from the connection's start, and on a kept-alive connection from the next
    request's first byte: an idle kept-alive connection is the keep-alive timeout's to end, which
    outlasts clients' own pool expiry (httpx's 5 s), so a client never reuses a connection the
    front is closing at that moment.
    """

    header_timeout_s = 10.0
    # The request cycle the deadline was armed for, and the deadline itself (None when disarmed).
    _armed_for: object = None
    _header_deadline: asyncio.TimerHandle | None = None
    # A response has ended and no byte of the next request has come yet.
    _idle = False

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may already have begun a pipelined request's cycle
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None
        if self.cycle is not None and self.cycle.response_complete:
            if self.conn.trailing_data[0]:
                self._arm_header_deadline()  # part of the next request is here already
            else:
                self._idle = True

    def data_received(self, data: bytes) -> None:
        if self._idle:
            self._idle = False
            self._arm_header_deadline()
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not self._armed_for and self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def connection_lost(self, exc) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        self._armed_for = self.cycle
        self._header_deadline = None
        if not self.transport.is_closing():
            self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _headers_too_slow(self) -> None:
        if self.cycle is self._armed_for and not self.transport.is_closing():
            log.info("closing a connection that sent no complete request headers in %.0f s", self.header_timeout_s)
            self.transport.close()


class Server(uvicorn.Server):
    """A uvicorn server whose signals are the supervisor's to handle."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def bind(host: str, port: int) -> socket.socket:
    """Bind now, so a busy port fails before TorchServe starts; OSError if it cannot."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def servers(front: Front, drain_s: float) -> tuple[Server, Server]:
    """The public server (bounded connections, header and keep-alive timeouts, drain) and the metrics one."""
    settings = front.settings
    protocol = type("FrontH11Protocol", (BoundedH11Protocol,), {"header_timeout_s": settings.header_timeout_s})
    public = Server(
        uvicorn.Config(
            build_app(front),
            http=protocol,
            lifespan="off",
            access_log=False,
            log_config=None,
            limit_concurrency=settings.max_connections,
            timeout_keep_alive=30,
            timeout_graceful_shutdown=max(1, int(drain_s)),
        )
    )
    metrics = Server(
        uvicorn.Config(
            build_metrics_app(front),
            http=protocol,
            lifespan="off",
            access_log=False,
            log_config=None,
            limit_concurrency=64,
            timeout_graceful_shutdown=1,
        )
    )
    return public, metrics


async def stop(server: Server, task: asyncio.Task, timeout_s: float) -> None:
    """Let ``server`` finish what it serves (uvicorn's graceful shutdown), then make sure it is gone."""
    server.should_exit = True
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout_s)
    except TimeoutError:
        server.force_exit = True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
