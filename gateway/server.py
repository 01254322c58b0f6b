"""Build the gateway's HTTP server from its settings, and drain it at shutdown."""

from __future__ import annotations

import threading
import time
from http.server import ThreadingHTTPServer

from gateway.proxy import GatewayHandler
from gateway.settings import GatewaySettings
from gateway.worker_watch import WorkerWatch


class GatewayServer(ThreadingHTTPServer):
    """Threads per connection, so a long stream never holds up the health checks.

    It counts requests in flight so that a stopping container can let them
    finish (``drain``) before TorchServe goes away under them, and runs the
    ``WorkerWatch`` that fails the predictions a dead worker held.
    """

    daemon_threads = True
    # A restarted container binds its port again at once.
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address, handler, watch: WorkerWatch) -> None:
        self.watch = watch  # before binding: a failed bind calls server_close
        super().__init__(address, handler)
        self._idle = threading.Condition()
        self._active = 0
        self.draining = False

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self.watch.start()
        super().serve_forever(poll_interval)

    def server_close(self) -> None:
        self.watch.stop()
        super().server_close()

    def request_started(self) -> None:
        with self._idle:
            self._active += 1

    def request_finished(self) -> None:
        with self._idle:
            self._active -= 1
            if self._active == 0:
                self._idle.notify_all()

    @property
    def active_requests(self) -> int:
        with self._idle:
            return self._active

    def drain(self, timeout_s: float) -> bool:
        """Refuse new requests, wait up to ``timeout_s`` for those in flight; True if none is left."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            self.draining = True
            while self._active:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True


def make_server(settings: GatewaySettings) -> GatewayServer:
    """Bind now (so a port clash fails at start) and return the server, not yet serving."""
    handler = type("BoundGatewayHandler", (GatewayHandler,), {"settings": settings})
    return GatewayServer((settings.bind_host, settings.port), handler, WorkerWatch(settings.app, settings.management))
