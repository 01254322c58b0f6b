"""Readiness from TorchServe's management API.

``/ping`` and ``/v2/health/ready`` answer "healthy" while ``initialize`` is
still loading weights and while a crashed worker restarts; the management API's
worker list is the only place that says whether a worker can answer now.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gateway.contract import DTYPE_REPORTS

READY = "READY"


@dataclass(frozen=True)
class Readiness:
    """One app's state for the health route: ``ready`` decides 200 or 503, the rest is its JSON body."""

    ready: bool
    status: str
    model: str
    workers: tuple[str, ...] = ()
    detail: str = ""
    # `dtype: auto`'s decision as the app's worker reported it (`dtype_report`), where it made one.
    dtype: dict | None = None

    @property
    def http_status(self) -> int:
        return 200 if self.ready else 503

    def payload(self) -> dict:
        payload: dict[str, object] = {"status": self.status, "model": self.model, "workers": list(self.workers)}
        if self.detail:
            payload["detail"] = self.detail
        if self.dtype is not None:
            payload["dtype"] = self.dtype
        return payload


def dtype_report(run_dir: Path, app: str) -> dict | None:
    """The dtype decision ``app``'s worker reported at its last start: the format it serves, whether it
    was timed at that start or read back from the host's decision cache, and the decode-step timings
    behind it. None where the app decides no dtype (a pinned one, a GPU) or the report is unreadable."""
    try:
        report = json.loads((run_dir / DTYPE_REPORTS / f"{app}.json").read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


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
