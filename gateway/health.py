"""Readiness from TorchServe's management API.

``/ping`` and ``/v2/health/ready`` answer "healthy" while ``initialize`` is
still loading weights and while a crashed worker restarts; the management API's
worker list is the only place that says whether a worker can answer now.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

READY = "READY"


@dataclass(frozen=True)
class Readiness:
    """One app's state for the health route: ``ready`` decides 200 or 503, the rest is its JSON body."""

    ready: bool
    status: str
    model: str
    workers: tuple[str, ...] = ()
    detail: str = ""

    @property
    def http_status(self) -> int:
        return 200 if self.ready else 503

    def payload(self) -> dict:
        payload = {"status": self.status, "model": self.model, "workers": list(self.workers)}
        if self.detail:
            payload["detail"] = self.detail
        return payload


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


def worker_pids(workers: list[dict]) -> frozenset[int]:
    return frozenset(worker["pid"] for worker in workers if isinstance(worker.get("pid"), int))


def worker_counts(body: bytes) -> tuple[int, int]:
    """``(minWorkers, maxWorkers)`` of the first version, (1, 1) when the description does not say."""
    try:
        versions = json.loads(body)
        first = versions[0] if isinstance(versions, list) else versions
        low, high = int(first.get("minWorkers", 1)), int(first.get("maxWorkers", 1))
    except (ValueError, TypeError, IndexError, AttributeError):
        return 1, 1
    low = max(low, 1)
    return low, max(low, high)
