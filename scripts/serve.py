"""``make serve`` / ``make stop``: the front and its TorchServe in the background, owned by this checkout.

    python scripts/serve.py start APP ARCHIVE [--port 7080] [--timeout 900]
    python scripts/serve.py stop

``start`` runs ``python -m gateway`` (the container's own supervisor) detached, with its pid
in ``run/front.pid``, and returns once ``/health`` is 200 and a one-token prediction
answers; a second ``start`` while it serves says so and succeeds. ``stop`` stops exactly
that process tree: the pid must still be this checkout's supervisor (its working folder
and command line), never another checkout's server, and never through ``torchserve
--stop``, which finds its server through one global pid file.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, only scripts/ is on the path; the front's wire constants live in the checkout's gateway.
sys.path.insert(0, str(ROOT))
from gateway.contract import DEFAULT_HTTP_PORT, HEALTH_ROUTE, JSON, PROBE, predict_route  # noqa: E402

PID_FILE = ROOT / "run" / "front.pid"
LOG = ROOT / "logs" / "front.log"
# The supervisor's own stop takes at most its stop grace (8 s); this only guards against a hang.
STOP_WAIT_S = 30


def ours() -> int | None:
    """The pid in run/front.pid if it is this checkout's running supervisor, else None."""
    try:
        pid = int(PID_FILE.read_text())
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    if cwd != ROOT or b"gateway" not in command:
        return None
    return pid


def answers(port: int, app: str) -> bool:
    base = f"http://127.0.0.1:{port}"
    try:
        with urllib.request.urlopen(f"{base}{HEALTH_ROUTE}", timeout=5) as response:
            if response.status != 200:
                return False
        # The server inherits this environment, so its API key (LLM_API_KEY), when set, is the one to send.
        key = os.environ.get("LLM_API_KEY", "").strip()
        headers = {"Content-Type": JSON, **({"Authorization": f"Bearer {key}"} if key else {})}
        request = urllib.request.Request(f"{base}{predict_route(app)}", data=PROBE, headers=headers)
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start(app: str, archive: str, port: int, timeout: float) -> int:
    pid = ours()
    if pid is not None:
        if answers(port, app):
            sys.stdout.write(f"{app} is already serving on http://127.0.0.1:{port} (pid {pid})\n")
            return 0
        return wait(pid, app, port, timeout)
    LOG.parent.mkdir(exist_ok=True)
    PID_FILE.parent.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "APP": app,
        "AIP_HTTP_PORT": str(port),
        "LLM_GATEWAY_BIND": "127.0.0.1",
        "LLM_MODEL_STORE": str(ROOT / "model-store"),
        "LLM_MODEL_ARCHIVE": archive,
        "TS_CONFIG_FILE": str(ROOT / "config.properties"),
        "LLM_RUN_DIR": str(ROOT / "run" / "torchserve"),
        "LOG_LOCATION": str(ROOT / "logs"),
        "METRICS_LOCATION": str(ROOT / "logs"),
    }
    with LOG.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    PID_FILE.write_text(f"{process.pid}\n")
    return wait(process.pid, app, port, timeout)


def wait(pid: int, app: str, port: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ours() != pid:
            sys.stderr.write(f"the server exited before {app} was ready; the end of {LOG}:\n{tail(LOG)}")
            PID_FILE.unlink(missing_ok=True)
            return 1
        if answers(port, app):
            sys.stdout.write(f"{app} answers on http://127.0.0.1:{port}{predict_route(app)} (pid {pid}; make stop)\n")
            return 0
        time.sleep(1)
    sys.stderr.write(f"{app} did not answer within {timeout:.0f} s; it keeps starting in the background (make stop)\n")
    return 1


def stop() -> int:
    pid = ours()
    if pid is None:
        PID_FILE.unlink(missing_ok=True)
        sys.stdout.write("nothing of this checkout is serving\n")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT_S
    while time.monotonic() < deadline and ours() == pid:
        time.sleep(0.2)
    if ours() == pid:
        sys.stderr.write(f"pid {pid} did not stop in {STOP_WAIT_S} s: killing it and its descendants\n")
        process = psutil.Process(pid)
        for child in [*process.children(recursive=True), process]:
            with contextlib.suppress(psutil.Error):
                child.kill()
    PID_FILE.unlink(missing_ok=True)
    sys.stdout.write("stopped\n")
    return 0


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
    except OSError:
        return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    starting = commands.add_parser("start")
    starting.add_argument("app")
    starting.add_argument("archive")
    starting.add_argument("--port", type=int, default=DEFAULT_HTTP_PORT)
    starting.add_argument("--timeout", type=float, default=900)
    commands.add_parser("stop")
    args = parser.parse_args()
    if args.command == "start":
        return start(args.app, args.archive, args.port, args.timeout)
    return stop()


if __name__ == "__main__":
    sys.exit(main())
