"""Fail the predictions that a dead model worker held.

TorchServe's async mode (the continuous batching path) never answers the requests a worker
held when it died: their clients wait for their own timeout. On the classic path TorchServe
answers 507 itself. The gateway polls the management API for the worker pids; when none of
the pids listed at a request's start is left, it shuts that request's upstream socket, and
the proxy answers 507 the way TorchServe does.
"""

from __future__ import annotations

import http.client
import logging
import socket
import threading

from gateway import health
from gateway.settings import Upstream

log = logging.getLogger(__name__)


class HeldRequest:
    """One forwarded prediction: the worker pids it may be on, and whether it was cut off."""

    def __init__(self, sock: socket.socket, pids: frozenset[int]):
        self.sock = sock
        self.pids = pids
        self.worker_died = False


class WorkerWatch:
    def __init__(self, app: str, management: Upstream, interval_s: float = 1.0, timeout_s: float = 2.0):
        self.app = app
        self.management = management
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._held: set[HeldRequest] = set()
        self._pids: frozenset[int] = frozenset()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="worker-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(self.interval_s + self.timeout_s + 1)

    def hold(self, sock: socket.socket) -> HeldRequest:
        """Register a prediction just sent on `sock`; `release` it once answered."""
        with self._lock:
            held = HeldRequest(sock, self._pids)
            self._held.add(held)
        return held

    def release(self, held: HeldRequest) -> None:
        with self._lock:
            self._held.discard(held)

    def poll(self) -> None:
        """Read the worker pids once; cut off every request whose workers are all gone."""
        pids = self.worker_pids()
        if pids is None:  # management API unreachable: no news, no action
            return
        with self._lock:
            self._pids = pids
            orphans = [held for held in self._held if held.pids and not held.pids & pids]
            for held in orphans:
                held.worker_died = True
                self._held.discard(held)
        for held in orphans:
            log.warning("worker %s is gone: failing a prediction it held", sorted(held.pids))
            try:
                held.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def worker_pids(self) -> frozenset[int] | None:
        """The pids of the app's workers now, or None when the management API cannot say."""
        try:
            status, body = health.describe(self.app, self.management, self.timeout_s)
            workers = health.workers_of(body) if status == 200 else None
        except (OSError, http.client.HTTPException, ValueError):
            return None
        if workers is None:
            return None
        return frozenset(worker["pid"] for worker in workers if isinstance(worker.get("pid"), int))

    @property
    def known_pids(self) -> frozenset[int]:
        """The pids seen by the last poll that reached the management API."""
        with self._lock:
            return self._pids

    def _run(self) -> None:
        while not self._stopped.is_set():
            self.poll()
            self._stopped.wait(self.interval_s)
