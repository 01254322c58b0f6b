"""Notice a dead model worker, answer what it held, and bring the app back.

TorchServe 0.12's async mode (the continuous batching path) never answers the requests a
worker held when it died, and its restarted worker thread can fail forever with "Received
more than 1 control command" (docs/reliability.md). The dynamic path answers them 507
itself and restarts the worker, with a backoff. Either way the front, not TorchServe,
decides when the app serves again:

1. A worker pid the management API listed stops running (checked in /proc every
   ``CHECK_S``), or leaves the list. The app is marked healing: predictions get 503 with
   ``Retry-After`` and the health route 503. On the async path every prediction the front
   is relaying to that app is answered at once with a 507 that says to retry.
2. The front waits for TorchServe's own retry of the worker (see ``_until_retried``). On the
   async path it then scales the workers to 0 and back up through the management API
   (which builds a fresh worker thread and aggregator); on the dynamic path the retried
   worker is kept (and scaled only if it never answers). Either way the app serves again
   once a worker is READY and answers a one-token prediction.
3. If that does not happen within ``heal_timeout_s``, TorchServe itself is restarted.

Each heal is logged with its cause and duration and counted in ``llm_front_heals_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol

import httpx2

from gateway import health
from gateway.metrics import FrontMetrics
from gateway.torchserve import pid_alive

log = logging.getLogger(__name__)

CHECK_S = 0.2
DESCRIBE_S = 1.0
# TorchServe retries a dead worker after a backoff of 1 s, growing with each failure in a row.
RETRY_WAIT_S = 10.0
# A one-token answer; the first probe after a restart can also be lost (see _until_retried).
PROBE_TIMEOUT_S = 30.0
PROBE = json.dumps({"instances": ["Hello"], "parameters": {"max_new_tokens": 1, "temperature": 0}}).encode()


class HealFailed(RuntimeError):
    """The management API could not bring the app back in time."""


@dataclass(eq=False)
class Held:
    """One prediction being relayed; ``cut`` is set when the worker it was on died."""

    cut: asyncio.Event = field(default_factory=asyncio.Event)
    released: bool = False


@dataclass(eq=False)
class AppState:
    name: str
    # TorchServe's async mode (asyncCommunication): a dead worker's requests are never answered.
    async_mode: bool
    ready: bool = False
    healing: bool = False
    detail: str = "starting"
    pids: frozenset[int] = frozenset()
    workers: tuple[str, ...] = ()
    held: set[Held] = field(default_factory=set)

    def readiness(self) -> health.Readiness:
        if self.ready:
            return health.Readiness(True, "ready", self.name, self.workers)
        return health.Readiness(False, "healing" if self.healing else "starting", self.name, self.workers, self.detail)


class Upstream(Protocol):
    """Where TorchServe answers now; a restart gives it new ports, so this is read per call."""

    inference_url: str
    management_url: str
    metrics_url: str


class Healer:
    def __init__(
        self,
        apps: dict[str, bool],
        upstream: Upstream,
        metrics: FrontMetrics,
        restart: Callable[[str], Awaitable[None]],
        heal_timeout_s: float,
        startup_timeout_s: float,
    ) -> None:
        self.apps = {name: AppState(name, async_mode) for name, async_mode in apps.items()}
        self.upstream = upstream
        self.metrics = metrics
        self.restart = restart
        self.heal_timeout_s = heal_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.client = httpx2.AsyncClient(timeout=httpx2.Timeout(10.0, read=120.0))
        self._restarting: asyncio.Future | None = None
        # Set, with the reason, when even a restart of TorchServe did not bring the apps back.
        self.gave_up = asyncio.Event()
        self.failure = ""
        self._tasks: set[asyncio.Task] = set()

    # --- what the front asks --------------------------------------------------------

    def state(self, app: str) -> AppState | None:
        return self.apps.get(app)

    def hold(self, app: str) -> Held:
        held = Held()
        self.apps[app].held.add(held)
        return held

    def release(self, app: str, held: Held) -> None:
        self.apps[app].held.discard(held)

    async def describe(self, app: str) -> tuple[int, bytes]:
        response = await self.client.get(f"{self.upstream.management_url}/models/{app}", timeout=5.0)
        return response.status_code, response.content

    # --- start and watch ------------------------------------------------------------

    async def wait_started(self) -> None:
        """Every app READY and answering, within the startup timeout; HealFailed if not."""
        await asyncio.gather(*(self._until_answers(state, self.startup_timeout_s) for state in self.apps.values()))
        for state in self.apps.values():
            state.ready, state.detail = True, ""
            await self._refresh(state)
            log.info("%s is ready: workers %s", state.name, sorted(state.pids))

    async def watch(self) -> None:
        """Forever: /proc for the known worker pids, the management API for the lists."""
        last_describe = 0.0
        while True:
            await asyncio.sleep(CHECK_S)
            for state in self.apps.values():
                if state.ready and state.pids and not all(pid_alive(pid) for pid in state.pids):
                    gone = sorted(pid for pid in state.pids if not pid_alive(pid))
                    self._start_heal(state, f"worker {','.join(map(str, gone))} died")
            if time.monotonic() - last_describe >= DESCRIBE_S:
                last_describe = time.monotonic()
                for state in self.apps.values():
                    if state.ready:
                        before = state.pids
                        await self._refresh(state)
                        if state.ready and before and not before <= state.pids:
                            self._start_heal(state, f"worker {','.join(map(str, sorted(before - state.pids)))} left")

    async def _refresh(self, state: AppState) -> None:
        try:
            status, body = await self.describe(state.name)
            workers = health.workers_of(body) if status == 200 else None
        except (httpx2.HTTPError, ValueError):
            return
        if workers is not None:
            state.pids = health.worker_pids(workers)
            state.workers = tuple(str(w.get("status", "UNKNOWN")) for w in workers)

    # --- healing --------------------------------------------------------------------

    def _start_heal(self, state: AppState, cause: str) -> None:
        if state.healing:
            return
        state.ready, state.healing, state.detail = False, True, cause
        self.metrics.healing.labels(state.name).set(1)
        log.warning("%s: %s; healing", state.name, cause)
        self.fail_held(state)
        task = asyncio.get_running_loop().create_task(self._heal(state, cause, time.monotonic()))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def fail_held(self, state: AppState) -> None:
        """On the async path nobody else will ever answer what the dead worker held."""
        if not state.async_mode:
            return
        if state.held:
            log.warning("%s: answering %d prediction(s) the dead worker held", state.name, len(state.held))
        for held in list(state.held):
            held.cut.set()
        state.held.clear()

    async def _heal(self, state: AppState, cause: str, started: float) -> None:
        dead = state.pids
        deadline = started + self.heal_timeout_s
        method = "retry"
        try:
            await self._until_retried(state, dead, min(deadline, started + RETRY_WAIT_S))
            if state.async_mode:
                method = "scale"
                await self._scale_back(state, deadline)
            else:
                try:
                    await self._until_answers(state, deadline - time.monotonic())
                except HealFailed:
                    method = "scale"
                    await self._scale_back(state, time.monotonic() + self.heal_timeout_s)
            await self._refresh(state)
        except (HealFailed, httpx2.HTTPError) as exc:
            log.warning("%s: no worker that answers %.0f s after the crash (%s): restarting TorchServe",
                        state.name, time.monotonic() - started, exc)
            method = "restart"
            if not await self._restart_or_give_up(f"{state.name}: {cause}"):
                return
        took = time.monotonic() - started
        self._healed(state)
        self.metrics.heals.labels(state.name, _cause_kind(cause), method).inc()
        self.metrics.heal_seconds.labels(state.name, method).observe(took)
        log.warning("%s healed in %.1f s by %s (cause: %s)", state.name, took, method, cause)

    async def _until_retried(self, state: AppState, dead: frozenset[int], deadline: float) -> None:
        """Wait for TorchServe's own restart of the worker (after a backoff of a second or more).

        Scaling to 0 before it happens does not stop it: the worker thread sleeps through its
        backoff, then starts again though it was scaled down, and takes one job from the
        model's queue before it fails with "Received more than 1 control command" (seen in
        TorchServe 0.12's log). Once it has started again, scaling to 0 stops it for good.
        """
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx2.HTTPError, ValueError):
                status, body = await self.describe(state.name)
                if status == 200 and health.worker_pids(health.workers_of(body)) - dead:
                    return
            await asyncio.sleep(0.2)

    def _healed(self, state: AppState) -> None:
        state.ready, state.healing, state.detail = True, False, ""
        self.metrics.healing.labels(state.name).set(0)

    async def _scale_back(self, state: AppState, deadline: float) -> None:
        """Workers to 0 and back: a fresh worker thread and aggregator, then READY and answering."""
        status, body = await self.describe(state.name)
        low, high = health.worker_counts(body) if status == 200 else (1, 1)
        await self._scale(state.name, 0, 0, deadline)
        await self._scale(state.name, low, high, deadline)
        await self._until_answers(state, deadline - time.monotonic())

    async def _scale(self, app: str, low: int, high: int, deadline: float) -> None:
        url = f"{self.upstream.management_url}/models/{app}"
        params = {"min_worker": low, "max_worker": high, "synchronous": "true"}
        left = max(1.0, deadline - time.monotonic())
        response = await self.client.put(url, params=params, timeout=httpx2.Timeout(left))
        if response.status_code >= 300:
            raise HealFailed(f"scaling {app} to {low} answered {response.status_code}: {response.text[:200]}")

    async def _until_answers(self, state: AppState, timeout_s: float) -> None:
        """A READY worker and a one-token prediction answered 200, within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                status, body = await self.describe(state.name)
                if health.readiness_from_description(state.name, status, body).ready and await self._probe(state.name):
                    return
            except httpx2.HTTPError:
                pass
            await asyncio.sleep(0.5)
        raise HealFailed(f"{state.name} had no READY worker that answers within {timeout_s:.0f} s")

    async def _probe(self, app: str) -> bool:
        try:
            response = await self.client.post(
                f"{self.upstream.inference_url}/predictions/{app}", content=PROBE,
                headers={"Content-Type": "application/json"}, timeout=PROBE_TIMEOUT_S,
            )
        except httpx2.TimeoutException:
            return False
        return response.status_code == 200

    async def restart_torchserve(self, cause: str) -> None:
        """Restart TorchServe once for everyone who asks at the same time; every app heals with it."""
        if self._restarting is not None:
            await asyncio.shield(self._restarting)
            return
        self._restarting = asyncio.get_running_loop().create_future()
        try:
            for state in self.apps.values():
                if not state.healing:
                    state.ready, state.healing, state.detail = False, True, cause
                    self.metrics.healing.labels(state.name).set(1)
                self.fail_held_all(state)
            await self.restart(cause)
            await self.wait_started()
            self._restarting.set_result(None)
        except BaseException as exc:
            self._restarting.set_exception(exc)
            raise
        finally:
            self._restarting = None

    async def _restart_or_give_up(self, cause: str) -> bool:
        try:
            await self.restart_torchserve(cause)
        except Exception as exc:  # noqa: BLE001 - any failure here ends the server, with its reason
            self.failure = f"restarting TorchServe ({cause}) failed: {exc}"
            log.error("%s", self.failure)
            self.gave_up.set()
            return False
        return True

    def fail_held_all(self, state: AppState) -> None:
        """TorchServe itself goes away: every prediction in flight is lost, on both paths."""
        for held in list(state.held):
            held.cut.set()
        state.held.clear()

    async def torchserve_exited(self, code: int) -> None:
        """TorchServe died by itself: restart it, and count a heal for each app it served."""
        started = time.monotonic()
        cause = f"TorchServe exited with status {code}"
        log.error("%s: restarting it", cause)
        if not await self._restart_or_give_up(cause):
            return
        took = time.monotonic() - started
        for state in self.apps.values():
            self._healed(state)
            self.metrics.heals.labels(state.name, "torchserve-exited", "restart").inc()
            self.metrics.heal_seconds.labels(state.name, "restart").observe(took)
        log.warning("TorchServe restarted in %.1f s (cause: %s)", took, cause)

    @property
    def restarting(self) -> bool:
        """A restart of TorchServe is under way: the old process exiting is expected."""
        return self._restarting is not None

    def cancel(self) -> None:
        """Stop healing (the server is stopping)."""
        for task in list(self._tasks):
            task.cancel()

    async def aclose(self) -> None:
        self.cancel()
        await self.client.aclose()


def _cause_kind(cause: str) -> str:
    return "worker-died" if " died" in cause or " left" in cause else "other"
