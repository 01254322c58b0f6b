"""Cancel on disconnect: which requests' clients went away, and the side channel the front says so on.

TorchServe 0.12 has no cancel: when a client goes, its frontend drops the channel and the job
runs on. So the front gives every prediction it relays an id (`REQUEST_ID_HEADER`) and, when
the client disconnects, sends `cancel <id>` as one datagram to every worker of the app: each
worker binds a Unix datagram socket at `socket_path(run_dir, app, pid)` and a thread of its
own (`CancelListener`) reads it. A thread, not the worker's request loop, because on the
dynamic path TorchServe's synchronous worker is inside `generate` and reads no message until
the batch ends.

The listener marks the id in the worker's `CancelRegistry`. A request being served holds a
`CancelSignal` (`watch`); setting it runs its callbacks on the listener's thread, and the
schedulers stop the request's rows within one decode step: the dynamic scheduler's stopping
criteria read `is_set()` at every step, the continuous one cancels its manager requests from
a callback that hops onto its event loop. An id that arrives before its request does (the
client left while the request queued in TorchServe) is remembered, a bounded number of them,
so that request is answered at once without generating.

gateway/contract.py holds the front's copy of the header, the layout and the message;
tests/unit/test_cancellation.py checks that the two copies agree.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-LLM-Request-Id"
CANCEL_DIR = "cancel"
CANCEL_VERB = b"cancel "
# Ids cancelled before their request reached this worker, kept until it does (oldest dropped first).
REMEMBERED = 4096
MAX_ID_BYTES = 128
# sun_path's size on Linux, its terminating NUL included.
MAX_SOCKET_PATH = 107


def socket_dir(run_dir: Path, app: str) -> Path:
    """Where the workers of `app` bind their cancel sockets, one per worker process."""
    return Path(run_dir) / CANCEL_DIR / app


def socket_path(run_dir: Path, app: str, pid: int) -> Path:
    return socket_dir(run_dir, app) / f"{pid}.sock"


def parse_message(data: bytes) -> str | None:
    """The request id of a `cancel <id>` datagram, or None for anything else."""
    if not data.startswith(CANCEL_VERB):
        return None
    request_id = data[len(CANCEL_VERB) :].strip()
    if not request_id or len(request_id) > MAX_ID_BYTES:
        return None
    try:
        return request_id.decode("ascii")
    except UnicodeDecodeError:
        return None


class CancelSignal:
    """One request's cancel, set at most once, from any thread; its callbacks run on the setter's thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._set = False
        self._callbacks: list[Callable[[], None]] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        with self._lock:
            if self._set:
                return
            self._set = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # one scheduler's failed hook must not keep the others from hearing it
                logger.exception("a cancel callback failed")

    def on_set(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Runs `callback` once the signal is set (now, if it is); returns what removes it again."""
        with self._lock:
            if not self._set:
                self._callbacks.append(callback)
                return lambda: self._remove(callback)
        callback()
        return lambda: None

    def _remove(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if callback in self._callbacks:
                self._callbacks.remove(callback)


class CancelRegistry:
    """The signals of the requests this worker serves now, by the front's request id."""

    def __init__(self, remembered: int = REMEMBERED, on_cancel: Callable[[], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._watched: dict[str, CancelSignal] = {}
        self._early: OrderedDict[str, None] = OrderedDict()
        self._remembered = remembered
        # Hears each request being served that is cancelled (the worker's counter), on the setter's thread.
        self._on_cancel = on_cancel

    def watch(self, request_id: str | None) -> CancelSignal | None:
        """The signal of a request that starts being served; already set if its cancel came first."""
        if not request_id:
            return None
        with self._lock:
            signal = self._watched.setdefault(request_id, CancelSignal())
            early = request_id in self._early
            self._early.pop(request_id, None)
        if early:
            self._stop(signal)
        return signal

    def forget(self, request_id: str | None) -> None:
        """The request was answered: a later cancel for it is for nothing here."""
        if request_id:
            with self._lock:
                self._watched.pop(request_id, None)

    def cancel(self, request_id: str) -> bool:
        """Sets the request's signal; True when this worker serves it, else the id is remembered."""
        with self._lock:
            signal = self._watched.get(request_id)
            if signal is None:
                self._early[request_id] = None
                while len(self._early) > self._remembered:
                    self._early.popitem(last=False)
                return False
        self._stop(signal)
        return True

    def _stop(self, signal: CancelSignal) -> None:
        if signal.is_set():
            return
        signal.set()
        if self._on_cancel is not None:
            self._on_cancel()

    @property
    def watched(self) -> int:
        with self._lock:
            return len(self._watched)


class CancelListener:
    """This worker's cancel socket, read by a daemon thread that hands each id to the registry."""

    def __init__(self, registry: CancelRegistry, path: Path) -> None:
        self.registry = registry
        self.path = Path(path)
        self._stop = threading.Event()
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def start_for(cls, registry: CancelRegistry, run_dir: str | None, app: str) -> CancelListener | None:
        """A started listener for this worker, or None (logged) where it cannot bind: then a client
        that leaves costs its generation until its own end, as before."""
        if not run_dir:
            logger.info("no LLM_RUN_DIR: generations are not cancelled when their client leaves")
            return None
        listener = cls(registry, socket_path(Path(run_dir), app, os.getpid()))
        try:
            listener.start()
        except OSError as error:
            logger.warning("no cancel socket at %s (%s): generations run on after their client left", listener.path, error)
            return None
        return listener

    def start(self) -> None:
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH:
            raise OSError(f"the socket path is longer than {MAX_SOCKET_PATH} bytes")
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path.unlink(missing_ok=True)  # a dead worker's, whose pid this one now has
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(str(self.path))
        except OSError:
            sock.close()
            raise
        sock.settimeout(0.5)
        self._socket = sock
        self._thread = threading.Thread(target=self._run, name="cancel-listener", daemon=True)
        self._thread.start()
        logger.info("listening for cancels at %s", self.path)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._socket is not None:
            self._socket.close()
        self.path.unlink(missing_ok=True)

    def _run(self) -> None:
        assert self._socket is not None
        while not self._stop.is_set():
            try:
                data = self._socket.recv(MAX_ID_BYTES + len(CANCEL_VERB) + 1)
            except TimeoutError:
                continue
            except OSError:
                if not self._stop.is_set():
                    logger.exception("the cancel socket failed; cancels are off in this worker")
                return
            request_id = parse_message(data)
            if request_id is None:
                logger.warning("ignored a message on the cancel socket that is no cancel")
                continue
            served = self.registry.cancel(request_id)
            logger.info("cancel for request %s: %s", request_id, "stopping it" if served else "not here (yet)")
