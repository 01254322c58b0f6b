"""The front's client of TorchServe's own APIs: management (describe, scale), metrics, and a probe.

A restart of TorchServe gives it new ports, so every call reads the ``Upstream`` afresh.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

import httpx2

from gateway import health
from gateway.contract import JSON, PROBE, predict_route

# The first probe after a restart can also be lost (see gateway.healer's _until_retried).
PROBE_TIMEOUT_S = 30.0
DESCRIBE_TIMEOUT_S = 5.0


class HealFailed(RuntimeError):
    """The management API could not bring the app back in time."""


class Upstream(Protocol):
    """Where TorchServe answers now; a restart gives it new ports, so this is read per call."""

    @property
    def inference_url(self) -> str: ...

    @property
    def management_url(self) -> str: ...

    @property
    def metrics_url(self) -> str: ...

    # The run folder TorchServe's workers share with the front ($LLM_RUN_DIR).
    run_dir: Path


class ManagementClient:
    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.client = httpx2.AsyncClient(timeout=httpx2.Timeout(10.0, read=120.0))

    async def describe(self, app: str) -> tuple[int, bytes]:
        """``GET /models/APP``: its status and body; httpx2.HTTPError when TorchServe does not answer."""
        response = await self.client.get(f"{self.upstream.management_url}/models/{app}", timeout=DESCRIBE_TIMEOUT_S)
        return response.status_code, response.content

    async def scale(self, app: str, low: int, high: int, deadline: float) -> None:
        """Workers to ``low``..``high``, synchronously, by ``deadline`` (monotonic); HealFailed if refused."""
        url = f"{self.upstream.management_url}/models/{app}"
        params: dict[str, int | str] = {"min_worker": low, "max_worker": high, "synchronous": "true"}
        left = max(1.0, deadline - time.monotonic())
        response = await self.client.put(url, params=params, timeout=httpx2.Timeout(left))
        if response.status_code >= 300:
            raise HealFailed(f"scaling {app} to {low} answered {response.status_code}: {response.text[:200]}")

    async def answers(self, app: str) -> bool:
        """A READY worker that answers a one-token prediction with 200."""
        status, body = await self.describe(app)
        return health.readiness_from_description(app, status, body).ready and await self.probe(app)

    async def probe(self, app: str) -> bool:
        try:
            response = await self.client.post(
                f"{self.upstream.inference_url}{predict_route(app)}",
                content=PROBE,
                headers={"Content-Type": JSON},
                timeout=PROBE_TIMEOUT_S,
            )
        except httpx2.TimeoutException:
            return False
        return response.status_code == 200

    async def metrics_text(self) -> bytes:
        """TorchServe's own metrics (``ts_*`` and the handler's); empty when it does not answer."""
        try:
            response = await self.client.get(f"{self.upstream.metrics_url}/metrics", timeout=DESCRIBE_TIMEOUT_S)
        except httpx2.HTTPError:
            return b""
        return response.content if response.status_code == 200 else b""

    async def aclose(self) -> None:
        await self.client.aclose()
