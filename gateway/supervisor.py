"""The container's main process: TorchServe and the gateway live and die together.

``torchserve --foreground`` runs in its own process group so that one signal
reaches the Python launcher, the Java frontend and the model workers at once
(the launcher does not forward signals to Java). The gateway serves from a
thread of this process. When TorchServe exits, for any reason, the gateway
stops and this process exits with TorchServe's status, so the container
stops too instead of answering 503 forever. On SIGTERM/SIGINT TorchServe gets
SIGTERM, then SIGKILL after ``stop_grace_s``.

Run it under an init (tini in the image, or ``--init``) so that orphans of the
workers are reaped.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from typing import Sequence

from gateway.server import make_server
from gateway.settings import SupervisorSettings

log = logging.getLogger(__name__)


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

    def request_stop(self, signum: int = signal.SIGTERM, _frame=None) -> None:
        """Signal handler: ask the main loop to stop (it does the work, not the handler)."""
        log.info("received signal %s, stopping", signal.Signals(signum).name)
        self._stop_requested.set()
        self._wake.set()

    def run(self) -> int:
        """Start both, wait until one ends or a stop is asked, stop the other, return an exit status."""
        server = make_server(self.settings.gateway)  # bind first: a busy port fails before TorchServe starts
        log.info(
            "gateway on %s:%d (predict %s, health %s), TorchServe model %s",
            self.settings.gateway.bind_host,
            self.settings.gateway.port,
            self.settings.gateway.predict_route,
            self.settings.gateway.health_route,
            self.settings.gateway.app,
        )
        self._process = subprocess.Popen(self.command, env=dict(self.settings.torchserve_env), start_new_session=True)
        threading.Thread(target=self._watch_process, name="torchserve-watch", daemon=True).start()
        gateway_thread = threading.Thread(target=self._serve, args=(server,), name="gateway", daemon=True)
        gateway_thread.start()
        self._wake.wait()
        server.shutdown()
        server.server_close()
        code = self._process.poll()
        if code is not None and not self._stop_requested.is_set():
            log.error("TorchServe exited with status %s; stopping the container", code)
            return code if code != 0 else 1
        if code is None and not self._stop_requested.is_set():
            log.error("the gateway stopped; stopping TorchServe")
        return self._stop_torchserve(clean=self._stop_requested.is_set())

    def _serve(self, server) -> None:
        try:
            server.serve_forever(poll_interval=0.5)
        finally:
            self._wake.set()

    def _watch_process(self) -> None:
        self._process.wait()
        self._wake.set()

    def _stop_torchserve(self, clean: bool) -> int:
        """SIGTERM the whole group, wait, SIGKILL what is left; 0 only for a clean, asked-for stop."""
        process = self._process
        self._signal_group(signal.SIGTERM)
        try:
            code = process.wait(timeout=self.settings.stop_grace_s)
        except subprocess.TimeoutExpired:
            log.warning("TorchServe still running after %.0f s, killing it", self.settings.stop_grace_s)
            self._signal_group(signal.SIGKILL)
            process.wait()
            return 137
        # The launcher can exit before Java and the workers: end the rest of the group.
        self._signal_group(signal.SIGKILL)
        log.info("TorchServe stopped (status %s)", code)
        return 0 if clean else 1

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self._process.pid, signum)
        except ProcessLookupError:
            pass
