"""One prediction the front holds, from the moment it is relayed until its answer ends.

It owns the bookkeeping that every way out of a relay needs: the app's hold (which the healer
cuts when the worker dies), the in-flight gauge, the queue-wait, time-to-first-byte and
latency histograms, the replay, and the release. Each is done once, whichever exit comes
first, so the relay's exits only choose the answer. It also holds the prediction's id
(``request_id``, sent to TorchServe in ``X-LLM-Request-Id``, the same for a replay) and, when the
client leaves, hands it to ``on_leave`` (gateway.cancel), which tells the workers to stop its
generation.

A prediction whose worker died before a byte of its answer reached the client is sent again,
once (``replay``): generation has no side effects, and greedy or seeded requests give the
same text. One held by a worker that dies a second time is answered 507 and logged as a
suspected poison request, so a request that kills workers cannot do so forever.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from types import TracebackType
from typing import Callable

from starlette.responses import Response, StreamingResponse

from gateway.apps import AppRegistry
from gateway.cancel import new_request_id
from gateway.metrics import FrontMetrics

log = logging.getLogger(__name__)

# How many times one prediction is sent again after its worker died.
MAX_REPLAYS = 1
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
        self.replays = 0
        self._wait_counted = False
        self._released = False

    def __enter__(self) -> HeldRequest:
        self.hold()
        self.metrics.in_flight.labels(self.app).inc()
        return self

    def hold(self) -> None:
        """The app's hold for one sending of the prediction: the healer sets ``cut`` if its worker dies."""
        self.cut = self.apps.hold(self.app)

    def hold_again(self) -> None:
        """Before the prediction is sent again without a replay (TorchServe refused it unseen)."""
        self.apps.release(self.app, self.cut)
        self.hold()

    def replay(self, body: bytes) -> bool:
        """The worker died before a byte of the answer reached the client: True to send the
        prediction again (the first time), False to answer it (a second death: a suspected
        poison request). The only place that decides; the hold is let go either way."""
        self.apps.release(self.app, self.cut)
        if self.replays < MAX_REPLAYS:
            self.replays += 1
            log.warning("%s: the worker died before answering a prediction; it is sent again once the app serves", self.app)
            return True
        self.replay_ended("lost-again")
        # The prompt stays private: its size and digest let an operator match it to a client's log.
        log.error(
            "%s: suspected poison request: a worker died while holding it, and again after it was sent again"
            " (%d bytes, sha256 %s); answering 507",
            self.app,
            len(body),
            hashlib.sha256(body).hexdigest()[:16],
        )
        return False

    async def worker_died(self, within_s: float) -> bool:
        """Whether this prediction's worker is found dead (its hold cut, or its app healing) within
        ``within_s``: how an answer that TorchServe broke off tells a dead worker from another fault."""
        state = self.apps.get(self.app)
        deadline = time.monotonic() + within_s
        while not (self.cut.is_set() or (state is not None and state.healing)):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def replay_ended(self, outcome: str) -> None:
        """Counts how a replay ended: answered, lost-again, not-served (no worker in time) or client-left."""
        if self.replays and not self._replay_counted:
            self._replay_counted = True
            self.metrics.replays.labels(self.app, outcome).inc()

    _replay_counted = False

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
        self.replay_ended("client-left")
        if self.on_leave is not None:
            self.on_leave(self.request_id)

    def finished(self, status: int) -> None:
        """The last byte went out (or never will): its latency, then the release."""
        self.metrics.latency.labels(self.app, str(status)).observe(time.monotonic() - self.arrived)
        self.replay_ended("answered")
        self.release()

    def release(self) -> None:
        """Once, whichever of the stream's end or the response's background task comes first."""
        if self._released:
            return
        self._released = True
        self.apps.release(self.app, self.cut)
        self.metrics.in_flight.labels(self.app).dec()
