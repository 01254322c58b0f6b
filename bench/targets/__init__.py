"""The systems the serving benchmark compares. Each one is started, runs workloads, and is stopped.

A target answers `run(workload, concurrency) -> list[RequestResult]`. One that cannot be
used (a server that is not up, a missing model) raises `TargetUnavailable` from `start`,
and the benchmark goes on without it.
"""

from __future__ import annotations

from typing import Protocol

from bench.stats import RequestResult
from bench.workloads import Workload


class TargetUnavailable(RuntimeError):
    """The target cannot be benchmarked; the message says why and what to do."""


class Target(Protocol):
    label: str
    kind: str

    def start(self) -> None: ...

    def run(self, workload: Workload, concurrency: int) -> list[RequestResult]: ...

    def stop(self) -> None: ...

    def describe(self) -> dict: ...
