"""`python -m gateway` (the container's main process) around a stand-in `torchserve`.

The stand-in is a script put first on PATH: it serves TorchServe's management and
inference APIs on the addresses of the config file the supervisor writes for it
(``--ts-config``), spawns a long-lived child (like TorchServe's Java frontend) and behaves
as FAKE_TS_MODE says. A real TorchServe cannot be told to ignore SIGTERM or to crash on
cue; these tests check the lifecycle promises that need that: health only once ready, a
clean and quick stop on SIGTERM that takes the whole process group, the container's exit
when TorchServe dies before it was ever ready, SIGKILL when TorchServe ignores SIGTERM,
and a fast failure for an env that cannot work. tests/integration/test_worker_crash.py and
test_front.py check the rest against a real TorchServe.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.torchserve import free_port

ROOT = Path(__file__).resolve().parents[2]

FAKE_TORCHSERVE = r"""
import json, os, signal, subprocess, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

mode = os.environ.get("FAKE_TS_MODE", "ok")
config = {}
for line in open(sys.argv[sys.argv.index("--ts-config") + 1]).read().splitlines():
    if "=" in line and not line.startswith("#"):
        key, value = line.split("=", 1)
        config[key] = value
ready_at = time.monotonic() + float(os.environ.get("FAKE_TS_READY_AFTER", "1"))
state = os.environ["FAKE_TS_STATE"]
frontend = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
# The state file appears whole (renamed into place) and only once the fake is set up, signals included.
with open(state + ".tmp", "w") as f:
    json.dump({"argv": sys.argv[1:], "pid": os.getpid(), "frontend_pid": frontend.pid, "config": config,
               "env": {k: v for k, v in os.environ.items() if k.startswith("TS_") or k in ("TEMP", "TMPDIR")}}, f)
os.replace(state + ".tmp", state)

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass
    def do_GET(self):
        self.reply()
    def do_POST(self):
        self.reply()
    def reply(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.startswith("/models/"):
            status = "READY" if time.monotonic() >= ready_at else "STARTING"
            body = json.dumps([{"workers": [{"status": status}]}]).encode()
        else:
            body = json.dumps({"predictions": [{"generated_text": "ok", "path": self.path}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

for name in ("inference_address", "management_address"):
    address = urlsplit(config[name])
    server = ThreadingHTTPServer((address.hostname, address.port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
if mode == "crash":
    time.sleep(1.5)
    sys.exit(3)
while True:
    time.sleep(1)
"""


class Container:
    """One `python -m gateway` process with its own ports, store and fake TorchServe."""

    def __init__(self, tmp_path: Path, mode: str = "ok", **env: str) -> None:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        script = bin_dir / "torchserve"
        script.write_text(f"#!{sys.executable}\n{FAKE_TORCHSERVE}")
        script.chmod(0o755)
        store = tmp_path / "model-store"
        store.mkdir()
        (store / "m.mar").write_bytes(b"")
        self.state = tmp_path / "state.json"
        self.port = free_port()
        self.env = {
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "PYTHONPATH": str(ROOT),
            "HOME": str(tmp_path),
            "APP": "m",
            "AIP_HTTP_PORT": str(self.port),
            "AIP_PREDICT_ROUTE": "/v1/predict",
            "LLM_GATEWAY_BIND": "127.0.0.1",
            "LLM_MODEL_STORE": str(store),
            "LLM_STOP_GRACE_S": "4",
            "LLM_METRICS_PORT": str(free_port()),
            "TS_CONFIG_FILE": str(self._base_config(tmp_path)),
            # Would move TorchServe off our free loopback ports: the supervisor must drop it.
            "TS_INFERENCE_ADDRESS": "http://0.0.0.0:7080",
            "FAKE_TS_MODE": mode,
            "FAKE_TS_STATE": str(self.state),
            **env,
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway"], env=self.env, cwd=tmp_path, stderr=subprocess.PIPE, text=True
        )

    @staticmethod
    def _base_config(tmp_path: Path) -> Path:
        path = tmp_path / "base.properties"
        path.write_text("inference_address=http://0.0.0.0:7080\nmanagement_address=http://0.0.0.0:7081\n")
        return path

    def get(self, path: str, method: str = "GET") -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request(method, path, body=b"{}" if method == "POST" else None)
            response = conn.getresponse()
            response.read()
            return response.status
        except OSError:
            return 0
        finally:
            conn.close()

    def wait_state(self) -> dict:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.state.exists() and self.state.stat().st_size:
                return json.loads(self.state.read_text())
            time.sleep(0.05)
        raise AssertionError("the fake torchserve never started")

    def wait_exit(self, timeout_s: float) -> tuple[int, float, str]:
        started = time.monotonic()
        try:
            code = self.process.wait(timeout_s)
        finally:
            if self.process.poll() is None:
                self.process.kill()
        return code, time.monotonic() - started, self.process.stderr.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture()
def container(tmp_path, request):
    made = []

    def make(mode: str = "ok", **env: str) -> Container:
        made.append(Container(tmp_path, mode, **env))
        return made[-1]

    yield make
    for c in made:
        c.stop()
        state = c.state.exists() and json.loads(c.state.read_text())
        if state:  # a failed test may leave the stand-in behind its killed supervisor
            _kill_quietly(state["frontend_pid"])
            _kill_quietly(state["pid"])


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_health_waits_for_the_model_then_sigterm_stops_everything_quickly(container):
    c = container(FAKE_TS_READY_AFTER="1.5")
    state = c.wait_state()
    assert state["argv"][-2:] == ["--models", "m=m.mar"]
    assert "--disable-token-auth" in state["argv"]
    for key in ("inference_address", "management_address", "metrics_address"):
        assert state["config"][key].startswith("http://127.0.0.1:"), state["config"]
    assert "TS_INFERENCE_ADDRESS" not in state["env"]
    assert state["env"]["TEMP"] == state["env"]["TMPDIR"]  # a temp folder of its own, not /tmp
    seen = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (not seen or seen[-1] != 200):
        seen.append(c.get("/health"))
        time.sleep(0.1)
    assert seen[-1] == 200
    assert 503 in seen
    assert c.get("/v1/predict", "POST") == 200
    c.process.send_signal(signal.SIGTERM)
    code, took, log = c.wait_exit(10)
    assert code == 0, log
    assert took < 3
    assert not _alive(state["frontend_pid"]), "TorchServe's child survived the stop"
    assert "TorchServe stopped" in log


def test_the_container_exits_when_torchserve_dies_before_it_was_ready(container):
    c = container("crash", FAKE_TS_READY_AFTER="60")
    state = c.wait_state()
    code, took, log = c.wait_exit(10)
    assert code == 3, log
    assert "TorchServe exited with status 3" in log
    assert not _alive(state["frontend_pid"])


def test_torchserve_that_ignores_sigterm_is_killed_within_the_grace(container):
    c = container("stubborn", LLM_STOP_GRACE_S="1.5")
    state = c.wait_state()  # written once the fake ignores SIGTERM
    c.process.send_signal(signal.SIGTERM)
    code, took, log = c.wait_exit(10)
    assert code == 137, log
    assert took < 4
    assert not _alive(state["frontend_pid"])


def test_an_env_that_cannot_work_fails_before_torchserve_starts(container):
    c = container(LLM_IMAGE_WEIGHTS="none")
    code, _, log = c.wait_exit(10)
    assert code == 2
    assert "AIP_STORAGE_URI" in log and "LLM_MODEL_DIR" in log
    assert not c.state.exists()


def test_a_busy_port_fails_before_torchserve_starts(container):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        c = container(AIP_HTTP_PORT=str(busy.getsockname()[1]))
        code, _, log = c.wait_exit(10)
    assert code == 2
    assert "cannot listen" in log
    assert not c.state.exists()
