"""One process tree, everywhere: the front, its healer, and the TorchServe they own.

``make serve`` and the container's ``serve`` both run this (``python -m gateway``). The
front binds first (a busy port fails before TorchServe starts), TorchServe starts on free
loopback ports in a run folder of its own, and the front answers 503 until every app has a
READY worker that answered a one-token prediction.

TorchServe exiting before it was ever ready ends the process with TorchServe's status (a
config that cannot work should stop the container, not loop). Exiting later is healed:
TorchServe is started again, and only if that fails too does this process exit (1).

On SIGTERM/SIGINT the front stops taking connections and lets those in flight finish
(uvicorn's graceful shutdown), then TorchServe gets SIGTERM and, when ``stop_grace_s`` is
spent, SIGKILL: the whole stop fits inside the 10 s that ``docker stop`` and Kubernetes
give by default. Run it under an init (tini in the image) so orphaned workers are reaped.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import IO

from gateway.apps import AppRegistry
from gateway.cancel import Canceller
from gateway.healer import Healer
from gateway.management import HealFailed, ManagementClient
from gateway.metrics import FrontMetrics
from gateway.server import Front, bind, servers, stop
from gateway.settings import SupervisorSettings
from gateway.torchserve import TorchServeProcess, archive_config

log = logging.getLogger(__name__)

# Of the stop grace, what TorchServe keeps for itself after the front drained.
TORCHSERVE_SHARE_S = 3.0


class Supervisor:
    def __init__(self, settings: SupervisorSettings, executable: str | None = None, output: IO[bytes] | None = None) -> None:
        self.settings = settings
        self.executable = executable
        self.output = output
        self._stop = asyncio.Event()
        self.torchserve: TorchServeProcess | None = None
        self.front: Front | None = None
        self.ports: dict[str, int] = {}

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        """Serve until a stop is asked or the server cannot go on; the exit status.

        0 for a stop that went cleanly (137 if TorchServe had to be killed); TorchServe's
        status when it died before it was ever ready; 1 when it could not be brought back;
        2 when a port cannot be bound.
        """
        s = self.settings
        try:
            public_sock = bind(s.front.bind_host, s.front.port)
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", s.front.bind_host, s.front.port, exc)
            return 2
        try:
            metrics_sock = bind(s.front.metrics_host, s.front.metrics_port)
        except OSError as exc:
            public_sock.close()
            log.error("cannot listen on %s:%d (metrics): %s", s.front.metrics_host, s.front.metrics_port, exc)
            return 2
        self.ports = {"front": public_sock.getsockname()[1], "metrics": metrics_sock.getsockname()[1]}
        own_run_dir = s.run_dir is None
        run_dir = s.run_dir or Path(tempfile.mkdtemp(prefix="torchserve-llm-"))
        run_dir.mkdir(parents=True, exist_ok=True)
        self.torchserve = TorchServeProcess(
            s.ts_config,
            s.model_store,
            s.models,
            s.torchserve_env,
            run_dir,
            self.executable,
            s.exposed_management_port,
            s.properties,
            self.output,
        )
        async_modes = {
            name: bool(archive_config(s.model_store, archive).get("asyncCommunication")) for name, archive in s.models.items()
        }
        metrics = FrontMetrics()
        apps = AppRegistry(async_modes, metrics)
        management = ManagementClient(self.torchserve)
        healer = Healer(apps, management, metrics, self._restart, s.heal_timeout_s, s.startup_timeout_s)
        self.front = Front(s.front, apps, management, self.torchserve, metrics, Canceller(run_dir, metrics.cancels))
        drain_s = max(1.0, s.stop_grace_s - TORCHSERVE_SHARE_S)
        public, metrics_server = servers(self.front, drain_s)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop)
        tasks: list[asyncio.Task] = []
        try:
            public_task = asyncio.create_task(public.serve(sockets=[public_sock]))
            metrics_task = asyncio.create_task(metrics_server.serve(sockets=[metrics_sock]))
            log.info(
                "front on %s:%d (predict %s, health %s), metrics on %s:%d, apps %s",
                s.front.bind_host,
                self.ports["front"],
                s.front.predict_route,
                s.front.health_route,
                s.front.metrics_host,
                self.ports["metrics"],
                apps.names(),
            )
            self.torchserve.start()
            code = await self._serve(healer, public_task, tasks)
            for task in tasks:
                task.cancel()  # no healing while the tree stops: its workers are meant to go
            healer.cancel()
            stopping = time.monotonic()
            await stop(public, public_task, drain_s)
            grace = max(1.0, s.stop_grace_s - (time.monotonic() - stopping))
            stopped = await asyncio.to_thread(self.torchserve.stop, grace)
            await stop(metrics_server, metrics_task, 1.0)
            return stopped if code == 0 else code
        finally:
            for task in tasks:
                task.cancel()
            if self.torchserve.poll() is None:
                await asyncio.to_thread(self.torchserve.stop, 1.0)
            healer.cancel()
            await self.front.aclose()
            await management.aclose()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            if own_run_dir:
                shutil.rmtree(run_dir, ignore_errors=True)

    async def _serve(self, healer: Healer, public_task: asyncio.Task, tasks: list[asyncio.Task]) -> int:
        """Start, then watch until a stop, a dead front, or a TorchServe that cannot come back."""
        starting = asyncio.create_task(healer.wait_started())
        exited = asyncio.create_task(self._torchserve_exit())
        stopping = asyncio.create_task(self._stop.wait())
        tasks += [starting, exited, stopping]
        done, _ = await asyncio.wait({starting, exited, stopping, public_task}, return_when=asyncio.FIRST_COMPLETED)
        code = _stopped_or_front_gone(done, stopping, public_task, "stop requested before the apps were ready")
        if code is not None:
            return code
        if exited in done:
            _, code = exited.result()
            log.error("TorchServe exited with status %s before it was ready: stopping", code)
            return code if code > 0 else 1
        try:
            starting.result()
        except HealFailed as exc:
            log.error("%s: stopping", exc)
            return 1
        exited.cancel()
        watching = asyncio.create_task(healer.watch())
        gave_up = asyncio.create_task(healer.gave_up.wait())
        tasks += [watching, gave_up]
        handled: set[int] = set()
        while True:
            exited = asyncio.create_task(self._torchserve_exit())
            tasks.append(exited)
            done, _ = await asyncio.wait({exited, stopping, public_task, gave_up, watching}, return_when=asyncio.FIRST_COMPLETED)
            code = _stopped_or_front_gone(done, stopping, public_task, "stop requested: draining the requests in flight")
            if code is not None:
                return code
            if gave_up in done:
                log.error("%s: stopping", healer.failure)
                return 1
            if watching in done:
                watching.result()  # the watch never ends by itself: re-raise what ended it
                return 1
            pid, code = exited.result()
            if pid not in handled and not healer.restarting:
                handled.add(pid)
                tasks.append(asyncio.create_task(healer.torchserve_exited(code)))
            await asyncio.sleep(0.5)  # our own restart replaces the process: let it

    async def _torchserve_exit(self) -> tuple[int, int]:
        """The pid and status of the TorchServe process that runs now, once it exits."""
        process = self._torchserve().running()
        while process.poll() is None:
            await asyncio.sleep(0.2)
        return process.pid, process.returncode

    async def _restart(self, cause: str) -> None:
        """The healer's last resort: the whole TorchServe again, on fresh ports."""
        log.warning("restarting TorchServe (%s)", cause)
        torchserve = self._torchserve()
        await asyncio.to_thread(torchserve.stop, self.settings.stop_grace_s)
        torchserve.start()

    def _torchserve(self) -> TorchServeProcess:
        if self.torchserve is None:
            raise RuntimeError("the supervisor has not started TorchServe")
        return self.torchserve


def _stopped_or_front_gone(
    done: set[asyncio.Task], stopping: asyncio.Task, public_task: asyncio.Task, stop_message: str
) -> int | None:
    """The exit status when a stop was asked (0) or the front stopped serving (1), in either phase; None to go on."""
    if stopping in done:
        log.info("%s", stop_message)
        return 0
    if public_task in done:
        log.error("the front stopped serving: stopping TorchServe")
        return 1
    return None
