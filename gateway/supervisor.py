"""The container's main process: TorchServe and the gateway live and die together.

``torchserve --foreground`` runs in its own process group so that one signal
reaches the Python launcher, the Java frontend and the model workers at once
(the launcher does not forward signals to Java). The gateway serves from
threads of this process. When TorchServe exits, for any reason, the gateway
stops and this process exits with a failure status, so the container stops
instead of answering 503 forever. On SIGTERM/SIGINT the gateway stops taking
requests, lets those in flight finish, then TorchServe gets SIGTERM and, when
``stop_grace_s`` is spent, SIGKILL: the whole stop fits inside the 10 s that
``docker stop`` and Kubernetes give by default.

Run it under an init (tini in the image, or ``--init``) so that orphans of the
workers are reaped.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from typing import Sequence

from gateway.server import GatewayServer, make_server
from gateway.settings import SupervisorSettings

log = logging.getLogger(__name__)

# Of the stop grace, what TorchServe keeps for itself after the gateway drained.
TORCHSERVE_SHARE_S = 3.0


def group_alive(pgid: int, proc: str = "/proc") -> bool:
    """Whether a process of group ``pgid`` still runs; zombies do not count.

    Orphaned workers are reaped by the init (tini), not by us, so a plain
    ``killpg(pgid, 0)`` would see their zombies as alive until then.
    """
    try:
        entries = os.listdir(proc)
    except OSError:
        entries = None
    if entries is None:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"{proc}/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone while we looked
        state, group = fields[0], int(fields[2])
        if group == pgid and state not in (b"Z", b"X"):
            return True
    return False


def torchserve_command(settings: SupervisorSettings) -> list[str]:
    """The TorchServe command line: config, store, and the image's one model under ``$APP``."""
    return [
        "torchserve",
        "--foreground",
        "--ts-config",
        str(settings.ts_config),
        "--model-store",
        str(settings.model_store),
        "--models",
        f"{settings.gateway.app}={settings.model_archive}",
        "--disable-token-auth",
        "--ncs",
    ]


class Supervisor:
    """Owns the TorchServe process group and the gateway server."""

    def __init__(self, settings: SupervisorSettings, command: Sequence[str] | None = None) -> None:
        self.settings = settings
        self.command = list(command) if command is not None else torchserve_command(settings)
        self._stop_requested = threading.Event()
        self._wake = threading.Event()
        self._process: subprocess.Popen | None = None
        self.server: GatewayServer | None = None

    def request_stop(self, signum: int = signal.SIGTERM, _frame=None) -> None:
        """Signal handler: only wakes the main loop, which does the stopping."""
        self._stop_requested.set()
        self._wake.set()

    def run(self) -> int:
        """Start both, wait until one ends or a stop is asked, stop the other; return the exit status.

        0 for a stop that was asked for and went cleanly (137 if TorchServe had
        to be killed); TorchServe's status (never 0) when it died by itself; 1
        when the gateway died; 2 when the port cannot be bound.
        """
        gateway = self.settings.gateway
        try:
            self.server = make_server(gateway)  # bind first: a busy port fails before TorchServe starts
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", gateway.bind_host, gateway.port, exc)
            return 2
        log.info(
            "gateway on %s:%d (predict %s, health %s) in front of TorchServe model %s",
            gateway.bind_host,
            self.server.server_address[1],
            gateway.predict_route,
            gateway.health_route,
            gateway.app,
        )
        self._process = subprocess.Popen(self.command, env=dict(self.settings.torchserve_env), start_new_session=True)
        threading.Thread(target=self._watch_process, name="torchserve-watch", daemon=True).start()
        threading.Thread(target=self._serve, name="gateway", daemon=True).start()
        self._wake.wait()
        started = time.monotonic()
        self.server.shutdown()
        try:
            if self._stop_requested.is_set():
                log.info("stop requested: draining %d request(s) in flight", self.server.active_requests)
                self.server.drain(max(0.0, self.settings.stop_grace_s - TORCHSERVE_SHARE_S))
                grace = max(1.0, self.settings.stop_grace_s - (time.monotonic() - started))
                return self._stop_torchserve(grace)
            code = self._process.poll()
            if code is not None:
                log.error("TorchServe exited with status %s: stopping the container", code)
                self._stop_torchserve(1.0)  # leftovers of its group, if any
                return code if code > 0 else 1
            log.error("the gateway stopped serving: stopping TorchServe")
            self._stop_torchserve(self.settings.stop_grace_s)
            return 1
        finally:
            self.server.server_close()

    def _serve(self) -> None:
        try:
            self.server.serve_forever(poll_interval=0.5)
        finally:
            self._wake.set()

    def _watch_process(self) -> None:
        self._process.wait()
        self._wake.set()

    def _stop_torchserve(self, grace_s: float) -> int:
        """SIGTERM the group, wait for all of it to go, SIGKILL what is left at the deadline.

        Returns 0 when everything left within the grace, 137 when something had to be killed.
        """
        deadline = time.monotonic() + grace_s
        self._signal_group(signal.SIGTERM)
        while time.monotonic() < deadline:
            if self._process.poll() is not None and not self._group_alive():
                log.info("TorchServe stopped")
                return 0
            time.sleep(0.05)
        log.warning("TorchServe still running after %.1f s: killing it", grace_s)
        self._signal_group(signal.SIGKILL)
        self._process.wait()
        return 137

    def _group_alive(self) -> bool:
        return group_alive(self._process.pid)

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self._process.pid, signum)
        except ProcessLookupError:
            pass
