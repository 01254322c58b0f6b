"""One prediction the front holds, from the moment it is relayed until its answer ends.

It owns the bookkeeping that every way out of a relay needs: the app's hold (which the healer
cuts when the worker dies), the in-flight gauge, the queue-wait, time-to-first-byte and
latency histograms, and the release. Each is done once, whichever exit comes first, so the
relay's exits only choose the answer. It also holds the prediction's id (``request_id``, sent to
TorchServe in ``X-LLM-Request-Id``) and, when the client leaves, hands it to ``on_leave``
(gateway.cancel), which tells the workers to stop its generation.
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import Callable

from starlette.responses import Response, StreamingResponse

from gateway.apps import AppRegistry
from gateway.cancel import new_request_id
from gateway.metrics import FrontMetrics

# httpx2's trace event for the moment the request's headers start to leave for TorchServe.
SENDING = "http11.send_request_headers.started"


class HeldRequest:
    """``with HeldRequest(...) as held: return held.answered(await forward(held))``."""

    # Set when the worker the request was on died; the app's hold, taken on entering.
    cut: asyncio.Event

    def __init__(
        self, apps: AppRegistry, metrics: FrontMetrics, app: str, arrived: float, on_leave: Callable[[str], object] | None = None
    ) -> None:
        self.request_id = new_request_id()
        self.on_leave = on_leave
        self.apps = apps
        self.metrics = metrics
        self.app = app
        self.arrived = arrived
        self.sent: float | None = None
        self._wait_counted = False
        self._released = False

    def __enter__(self) -> HeldRequest:
        self.cut = self.apps.hold(self.app)
        self.metrics.in_flight.labels(self.app).inc()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if kind is not None:
            self.release()

    async def trace(self, event: str, info: dict) -> None:
        """httpx2's ``trace`` extension: notes when the request first started to leave."""
        if event == SENDING and self.sent is None:
            self.sent = time.monotonic()

    def answered(self, response: Response) -> Response:
        """The answer the client gets now, counted and released; a stream counts itself when it ends."""
        if not isinstance(response, StreamingResponse):
            self.waited(response.status_code)
            self.finished(response.status_code)
        return response

    def waited(self, status: int) -> None:
        """Counts, once, how long the request waited for a connection to TorchServe."""
        if self._wait_counted:
            return
        self._wait_counted = True
        if self.sent is not None:
            self.metrics.queue_wait.labels(self.app, str(status)).observe(self.sent - self.arrived)

    def first_byte(self, status: int) -> None:
        self.metrics.ttft.labels(self.app, str(status)).observe(time.monotonic() - self.arrived)

    def client_left(self) -> None:
        self.metrics.disconnects.labels(self.app).inc()
        if self.on_leave is not None:
            self.on_leave(self.request_id)

    def finished(self, status: int) -> None:
        """The last byte went out (or never will): its latency, then the release."""
        self.metrics.latency.labels(self.app, str(status)).observe(time.monotonic() - self.arrived)
        self.release()

    def release(self) -> None:
        """Once, whichever of the stream's end or the response's background task comes first."""
        if self._released:
            return
        self._released = True
        self.apps.release(self.app, self.cut)
        self.metrics.in_flight.labels(self.app).dec()
