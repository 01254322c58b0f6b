"""The heal policy: when an app is unwell, and how it is brought back.

TorchServe 0.12's async mode (the continuous batching path) never answers the requests a
worker held when it died, and its restarted worker thread can fail forever with "Received
more than 1 control command" (docs/reliability.md). The dynamic path answers them 507
itself and restarts the worker, with a backoff. Either way the front, not TorchServe,
decides when the app serves again:

1. A worker pid the management API listed stops running (checked in /proc every
   ``CHECK_S``), or leaves the list. The app is marked healing: new predictions wait in the
   front until it serves again (``gateway.relay``; 503 with ``Retry-After`` past the wait's
   bounds) and the health route says 503. On the async path every prediction the front is
   relaying to that app is cut at once, and the relay sends it again once the app serves
   (or ends its stream, if one had begun).
2. The front waits for TorchServe's own retry of the worker (see ``_until_retried``). On the
   async path it then scales the workers to 0 and back up through the management API
   (which builds a fresh worker thread and aggregator); on the dynamic path the retried
   worker is kept (and scaled only if it never answers). Either way the app serves again
   once a worker is READY and answers a one-token prediction.
3. If that does not happen within ``heal_timeout_s``, TorchServe itself is restarted.

Each heal is logged with its cause, its duration and where the seconds went (``Phases``: the
retry, each scaling, the worker READY, the first answer; the worker's own start is in its log),
and counted in ``llm_front_heals_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Awaitable, Callable

import httpx2

from gateway import health
from gateway.apps import AppRegistry, AppState
from gateway.management import HealFailed, ManagementClient
from gateway.metrics import FrontMetrics
from gateway.torchserve import pid_alive

log = logging.getLogger(__name__)

CHECK_S = 0.2
DESCRIBE_S = 1.0
# TorchServe retries a dead worker after a backoff of 1 s, growing with each failure in a row.
RETRY_WAIT_S = 10.0
# How often a heal asks whether the new worker is READY and answers; a start, which takes
# minutes, asks less often.
ANSWER_POLL_S = 0.1
STARTUP_POLL_S = 0.5


class Phases:
    """Where a heal's seconds went, phase by phase, for its log line (docs/reliability.md)."""

    def __init__(self, started: float) -> None:
        self.mark = started
        self.spent: list[tuple[str, float]] = []

    def end(self, phase: str) -> None:
        now = time.monotonic()
        self.spent.append((phase, now - self.mark))
        self.mark = now

    def __str__(self) -> str:
        return ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in self.spent) or "no phases"


class Healer:
    """Watches the apps of ``apps`` through ``management`` and heals them; ``restart`` is the last resort."""

    def __init__(
        self,
        apps: AppRegistry,
        management: ManagementClient,
        metrics: FrontMetrics,
        restart: Callable[[str], Awaitable[None]],
        heal_timeout_s: float,
        startup_timeout_s: float,
    ) -> None:
        self.apps = apps
        self.management = management
        self.metrics = metrics
        self.restart = restart
        self.heal_timeout_s = heal_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self._restarting: asyncio.Future | None = None
        # Set, with the reason, when even a restart of TorchServe did not bring the apps back.
        self.gave_up = asyncio.Event()
        self.failure = ""
        self._tasks: set[asyncio.Task] = set()

    # --- start and watch ------------------------------------------------------------

    async def wait_started(self) -> None:
        """Every app READY and answering, within the startup timeout; HealFailed if not."""
        await asyncio.gather(*(self._until_answers(state, self.startup_timeout_s) for state in self.apps))
        for state in self.apps:
            self.apps.mark_started(state)
            await self._refresh(state)
            log.info("%s is ready: workers %s", state.name, sorted(state.pids))

    async def watch(self) -> None:
        """Forever: /proc for the known worker pids, the management API for the lists."""
        last_describe = 0.0
        while True:
            await asyncio.sleep(CHECK_S)
            for state in self.apps:
                if state.ready and state.pids and not all(pid_alive(pid) for pid in state.pids):
                    gone = sorted(pid for pid in state.pids if not pid_alive(pid))
                    self._start_heal(state, f"worker {','.join(map(str, gone))} died")
            if time.monotonic() - last_describe >= DESCRIBE_S:
                last_describe = time.monotonic()
                for state in self.apps:
                    if state.ready:
                        before = state.pids
                        await self._refresh(state)
                        if state.ready and before and not before <= state.pids:
                            self._start_heal(state, f"worker {','.join(map(str, sorted(before - state.pids)))} left")

    async def _refresh(self, state: AppState) -> None:
        try:
            status, body = await self.management.describe(state.name)
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
        self.apps.mark_healing(state, cause)
        log.warning("%s: %s; healing", state.name, cause)
        self._fail_held(state)
        task = asyncio.get_running_loop().create_task(self._heal(state, cause, time.monotonic()))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fail_held(self, state: AppState) -> None:
        """On the async path nobody else will ever answer what the dead worker held."""
        if not state.async_mode:
            return
        if state.held:
            log.warning("%s: answering %d prediction(s) the dead worker held", state.name, len(state.held))
        self.apps.cut_held(state)

    async def _heal(self, state: AppState, cause: str, started: float) -> None:
        dead = state.pids
        deadline = started + self.heal_timeout_s
        method = "retry"
        phases = Phases(started)
        try:
            await self._until_retried(state, dead, min(deadline, started + RETRY_WAIT_S))
            phases.end("TorchServe's retry")
            if state.async_mode:
                method = "scale"
                await self._scale_back(state, deadline, phases)
            else:
                try:
                    await self._until_answers(state, deadline - time.monotonic(), phases)
                except HealFailed:
                    method = "scale"
                    await self._scale_back(state, time.monotonic() + self.heal_timeout_s, phases)
            await self._refresh(state)
        except (HealFailed, httpx2.HTTPError) as exc:
            log.warning(
                "%s: no worker that answers %.0f s after the crash (%s): restarting TorchServe",
                state.name,
                time.monotonic() - started,
                exc,
            )
            method = "restart"
            if not await self._restart_or_give_up(f"{state.name}: {cause}"):
                return
            phases.end("TorchServe's restart")
        took = time.monotonic() - started
        self.apps.mark_ready(state)
        self.metrics.heals.labels(state.name, _cause_kind(cause), method).inc()
        self.metrics.heal_seconds.labels(state.name, method).observe(took)
        log.warning("%s healed in %.1f s by %s (cause: %s): %s", state.name, took, method, cause, phases)

    async def _until_retried(self, state: AppState, dead: frozenset[int], deadline: float) -> None:
        """Wait for TorchServe's own restart of the worker (after a backoff of a second or more).

        Scaling to 0 before it happens does not stop it: the worker thread sleeps through its
        backoff, then starts again though it was scaled down, and takes one job from the
        model's queue before it fails with "Received more than 1 control command" (seen in
        TorchServe 0.12's log). Once it has started again, scaling to 0 stops it for good.
        """
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx2.HTTPError, ValueError):
                status, body = await self.management.describe(state.name)
                if status == 200 and health.worker_pids(health.workers_of(body)) - dead:
                    return
            await asyncio.sleep(0.2)

    async def _scale_back(self, state: AppState, deadline: float, phases: Phases | None = None) -> None:
        """Workers to 0 and back: a fresh worker thread and aggregator, then READY and answering."""
        phases = phases or Phases(time.monotonic())
        status, body = await self.management.describe(state.name)
        low, high = health.worker_counts(body) if status == 200 else (1, 1)
        await self.management.scale(state.name, 0, 0, deadline)
        phases.end("scale to 0")
        await self.management.scale(state.name, low, high, deadline)
        phases.end(f"scale to {low}")
        await self._until_answers(state, deadline - time.monotonic(), phases)

    async def _until_answers(self, state: AppState, timeout_s: float, phases: Phases | None = None) -> None:
        """A READY worker and a one-token prediction answered 200, within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        poll_s = ANSWER_POLL_S if phases is not None else STARTUP_POLL_S
        ready = False
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx2.HTTPError):
                status, body = await self.management.describe(state.name)
                if health.readiness_from_description(state.name, status, body).ready:
                    if not ready and phases is not None:
                        phases.end("worker READY")
                    ready = True
                    if await self.management.probe(state.name):
                        if phases is not None:
                            phases.end("first answer")
                        return
            await asyncio.sleep(poll_s)
        raise HealFailed(f"{state.name} had no READY worker that answers within {timeout_s:.0f} s")

    async def restart_torchserve(self, cause: str) -> None:
        """Restart TorchServe once for everyone who asks at the same time; every app heals with it."""
        if self._restarting is not None:
            await asyncio.shield(self._restarting)
            return
        self._restarting = asyncio.get_running_loop().create_future()
        try:
            for state in self.apps:
                if not state.healing:
                    self.apps.mark_healing(state, cause)
                # TorchServe itself goes away: every prediction in flight is lost, on both paths.
                self.apps.cut_held(state)
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

    async def torchserve_exited(self, code: int) -> None:
        """TorchServe died by itself: restart it, and count a heal for each app it served."""
        started = time.monotonic()
        cause = f"TorchServe exited with status {code}"
        log.error("%s: restarting it", cause)
        if not await self._restart_or_give_up(cause):
            return
        took = time.monotonic() - started
        for state in self.apps:
            self.apps.mark_ready(state)
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


def _cause_kind(cause: str) -> str:
    return "worker-died" if " died" in cause or " left" in cause else "other"
