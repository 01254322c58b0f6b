"""Cancel on disconnect, the front's side: tell the app's workers that a client went away.

TorchServe 0.12 carries no cancel, and a worker on the dynamic path is inside ``generate``
without reading TorchServe's messages, so the front speaks to the workers beside TorchServe:
each worker binds a Unix datagram socket under the run folder
(``contract.cancel_socket_dir``), and ``cancel`` sends ``cancel <id>`` to every one of the
app's, without waiting (a datagram either lands in the worker's buffer or is dropped, logged).
The id is the one the relay sent in ``REQUEST_ID_HEADER``. The worker that serves the request
stops it within a decode step (``handler.cancellation`` tells how); the others remember the
id a while, in case the request still queues in TorchServe for them. A socket nobody reads any
more (its worker died) refuses the datagram and is removed.
"""

from __future__ import annotations

import errno
import logging
import socket
import stat
import uuid
from pathlib import Path

from prometheus_client import Counter

from gateway.contract import CANCEL_MESSAGE, cancel_socket_dir

log = logging.getLogger(__name__)


def new_request_id() -> str:
    return uuid.uuid4().hex


class Canceller:
    """Sends the cancels of one front; without a run folder (no workers to reach) it only counts them."""

    def __init__(self, run_dir: Path | None, sent: Counter | None = None) -> None:
        self.run_dir = run_dir
        self.sent = sent
        self._socket: socket.socket | None = None

    def cancel(self, app: str, request_id: str) -> int:
        """Tells every worker of ``app`` that ``request_id``'s client went away; how many sockets took it."""
        if self.run_dir is None:
            return 0
        folder = cancel_socket_dir(self.run_dir, app)
        try:
            paths = [path for path in folder.iterdir() if path.suffix == ".sock"]
        except FileNotFoundError:
            return 0
        taken = 0
        message = CANCEL_MESSAGE + request_id.encode("ascii")
        for path in paths:
            try:
                self._sock().sendto(message, str(path))
                taken += 1
            except (ConnectionRefusedError, FileNotFoundError):
                _remove_dead(path)
            except BlockingIOError:
                log.warning("the worker at %s is not reading its cancels: %s's generation runs on", path, request_id)
            except OSError as exc:
                if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                    log.warning("could not send a cancel to %s: %s", path, exc)
        if self.sent is not None and taken:
            self.sent.labels(app).inc()
        log.info("a client of %s left: cancel of %s sent to %d worker(s)", app, request_id, taken)
        return taken

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _sock(self) -> socket.socket:
        if self._socket is None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.setblocking(False)
        return self._socket


def _remove_dead(path: Path) -> None:
    """A dead worker's socket (nobody bound to it) goes, so later cancels skip it."""
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
    except OSError:
        pass
