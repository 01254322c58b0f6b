"""Build the gateway's HTTP server from its settings."""

from __future__ import annotations

from http.server import ThreadingHTTPServer

from gateway.proxy import GatewayHandler
from gateway.settings import GatewaySettings


class GatewayServer(ThreadingHTTPServer):
    """Threads per connection: a long stream must not hold up the health checks."""

    daemon_threads = True
    # Restarts of the container reuse the port at once.
    allow_reuse_address = True
    request_queue_size = 64


def make_server(settings: GatewaySettings) -> GatewayServer:
    """Bind now (so a port clash fails at start) and return the server, not yet serving."""
    handler = type("BoundGatewayHandler", (GatewayHandler,), {"settings": settings})
    return GatewayServer((settings.bind_host, settings.port), handler)
