"""Readiness from TorchServe's management API.

``/ping`` and ``/v2/health/ready`` answer "healthy" while ``initialize`` is
still loading weights and while a crashed worker restarts; the management API's
worker list is the only place that says whether a worker can answer now.
"""

from __future__ import annotations

import http.client
import json
import logging
from dataclasses import dataclass

from gateway.settings import Upstream

log = logging.getLogger(__name__)

READY = "READY"


@dataclass(frozen=True)
class Readiness:
    """The health route's answer: ``ready`` decides 200 or 503, the rest is its JSON body."""

    ready: bool
    status: str
    model: str
    workers: tuple[str, ...] = ()
    detail: str = ""

    @property
    def http_status(self) -> int:
        return 200 if self.ready else 503

    def body(self) -> bytes:
        payload = {"status": self.status, "model": self.model, "workers": list(self.workers)}
        if self.detail:
            payload["detail"] = self.detail
        return json.dumps(payload).encode()


def readiness_from_description(app: str, status: int, body: bytes) -> Readiness:
    """Decide readiness from ``GET /models/<app>``'s answer.

    The answer is a list with one description per registered version, each
    with ``workers[].status``; one READY worker anywhere is enough to serve.
    """
    if status == 404:
        return Readiness(False, "not-registered", app, detail="TorchServe does not know this model (yet)")
    if status != 200:
        return Readiness(False, "unavailable", app, detail=f"management API answered {status}")
    try:
        described = workers_of(body)
    except ValueError as exc:
        return Readiness(False, "unavailable", app, detail=str(exc))
    workers = tuple(str(worker.get("status", "UNKNOWN")) for worker in described)
    if READY in workers:
        return Readiness(True, "ready", app, workers)
    return Readiness(False, "loading", app, workers)


def workers_of(body: bytes) -> list[dict]:
    """Every worker of every registered version in ``GET /models/<app>``'s JSON; ValueError if it is not one."""
    try:
        versions = json.loads(body)
    except ValueError:
        raise ValueError("management API sent invalid JSON") from None
    if isinstance(versions, dict):
        versions = [versions]
    if not isinstance(versions, list):
        raise ValueError("unexpected model description")
    return [
        worker
        for version in versions
        if isinstance(version, dict)
        for worker in version.get("workers") or ()
        if isinstance(worker, dict)
    ]


def describe(app: str, management: Upstream, timeout_s: float) -> tuple[int, bytes]:
    """``GET /models/<app>`` on the management API: its status and body. OSError or HTTPException if unreachable."""
    conn = http.client.HTTPConnection(management.host, management.port, timeout=timeout_s)
    try:
        conn.request("GET", f"/models/{app}")
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def check(app: str, management: Upstream, timeout_s: float) -> Readiness:
    """Ask the management API now; an unreachable API means "not ready", never an error."""
    try:
        status, body = describe(app, management, timeout_s)
    except (OSError, http.client.HTTPException) as exc:
        log.debug("management API unreachable: %s", exc)
        return Readiness(False, "starting", app, detail=f"management API unreachable: {exc.__class__.__name__}")
    return readiness_from_description(app, status, body)
