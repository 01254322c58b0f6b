"""A real TorchServe on free ports and its own temp folders, with archives built for it.

Every instance picks free TCP ports and gets its own TEMP and TMPDIR: TorchServe puts its
worker sockets under Java's temp folder (named by port) and its pid file under Python's, so
two test suites (or a suite and a `make serve`) on one host never touch each other.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from tests.support.ports import free_ports

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
PROBE = {"instances": ["Hello"], "parameters": {"max_new_tokens": 1, "temperature": 0}}


def build_archive(app: str, name: str, store: Path, model_config: dict[str, Any] | None = None) -> Path:
    """A no-archive copy of the app (fast to build, nothing to unzip), its config optionally changed."""
    config_path = ROOT / "apps" / app / "model-config.yaml"
    if model_config is not None:
        config_path = store / f"{name}-model-config.yaml"
        config_path.write_text(yaml.safe_dump(model_config))
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "archive.py"), app, "--name", name,
         "--model-config", str(config_path), "--format", "no-archive", "--export", str(store)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return store / name


def app_model_config(app: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "apps" / app / "model-config.yaml").read_text())


def dynamic_model_config(app: str, batch_size: int = 8, max_batch_delay: int = 50) -> dict[str, Any]:
    """The app's config on the classic path: TorchServe's dynamic batching, one generate per batch."""
    config = app_model_config(app)
    config.pop("asyncCommunication", None)
    config.update(batchSize=batch_size, maxBatchDelay=max_batch_delay)
    config["handler"] = {**config.get("handler", {}), "batching": "dynamic"}
    return config


def continuous_model_config(app: str) -> dict[str, Any]:
    """The app's config on the continuous path: TorchServe's async mode, the manager batches."""
    config = app_model_config(app)
    config.pop("maxBatchDelay", None)
    config.update(asyncCommunication=True, batchSize=1)
    config["handler"] = {**config.get("handler", {}), "batching": "continuous"}
    return config


@dataclass
class TorchServe:
    """One TorchServe process in the foreground, so the test owns its lifetime."""

    workdir: Path
    models: dict[str, Path]
    properties: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    port: int = 0
    management_port: int = 0
    metrics_port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def management(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    @property
    def metrics(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def start(self, timeout: float = 600) -> "TorchServe":
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        store = self.workdir / "store"
        store.mkdir(exist_ok=True)
        for name, path in self.models.items():
            if path.parent != store and not (store / name).exists():
                (store / name).symlink_to(path)
        self.port, self.management_port, self.metrics_port, grpc_inference, grpc_management = free_ports(5)
        properties = (ROOT / "config.properties").read_text()
        properties += "\n".join(
            [
                f"inference_address=http://127.0.0.1:{self.port}",
                f"management_address=http://127.0.0.1:{self.management_port}",
                f"metrics_address=http://127.0.0.1:{self.metrics_port}",
                f"metrics_config={ROOT / 'metrics.yaml'}",
                f"model_store={store}",
                f"grpc_inference_port={grpc_inference}",
                f"grpc_management_port={grpc_management}",
                *(f"{key}={value}" for key, value in self.properties.items()),
            ]
        )
        config = self.workdir / "config.properties"
        config.write_text(properties + "\n")
        tmp = self.workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        environment = {
            **os.environ,
            "LOG_LOCATION": str(logs),
            "METRICS_LOCATION": str(logs),
            "TEMP": str(tmp),  # Java's temp folder: the worker sockets
            "TMPDIR": str(tmp),  # Python's: the pid file
        }
        self.process = subprocess.Popen(
            [str(VENV_BIN / "torchserve"), "--foreground", "--ncs", "--ts-config", str(config),
             "--model-store", str(store), "--models", *(f"{name}={name}" for name in self.models)],
            cwd=self.workdir,
            env=environment,
            stdout=(logs / "stdout.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for name in self.models:
            self.wait_ready(name, timeout)
        return self

    def wait_ready(self, name: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"TorchServe exited early:\n{self.log_tail()}")
            if self.worker_ready(name) and self.post(name, PROBE)[0] == 200:
                return
            time.sleep(1)
        raise TimeoutError(f"{name} not ready in {timeout} s:\n{self.log_tail()}")

    def worker_ready(self, name: str) -> bool:
        return "READY" in self.worker_statuses(name)

    def worker_statuses(self, name: str) -> list[str]:
        try:
            with urllib.request.urlopen(f"{self.management}/models/{name}", timeout=5) as response:
                return [w["status"] for model in json.load(response) for w in model.get("workers", [])]
        except (urllib.error.URLError, OSError, ValueError):
            return []

    def post(self, name: str, body: Any, timeout: float = 300, raw: bytes | None = None,
             content_type: str = "application/json") -> tuple[int, Any]:
        """POST to /predictions/name; returns the status and the decoded JSON (or text) body."""
        return post(f"{self.url}/predictions/{name}", body, timeout, raw, content_type)

    def batches_received(self) -> int:
        """How many batches the workers have taken so far: each logs one line per batch."""
        log = self.workdir / "logs" / "model_log.log"
        return log.read_text(errors="replace").count("Backend received inference at")

    def log_tail(self, lines: int = 60) -> str:
        logs = self.workdir / "logs"
        text = ""
        for name in ("model_log.log", "ts_log.log", "stdout.log"):
            path = logs / name
            if path.exists():
                text += f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def post(url: str, body: Any, timeout: float = 300, raw: bytes | None = None,
         content_type: str = "application/json") -> tuple[int, Any]:
    """POST `body` as JSON (or `raw` bytes); the status and the decoded JSON (or text) body, 0 if unreachable."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, _decode(response.read())
    except urllib.error.HTTPError as error:
        return error.code, _decode(error.read())
    except (urllib.error.URLError, OSError) as error:
        return 0, str(error)


def _decode(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return body.decode(errors="replace")


def start_app(workdir: Path, name: str, model_config: dict[str, Any] | None = None,
              app: str = "smollm2", properties: dict[str, str] | None = None) -> TorchServe:
    """A started TorchServe serving `app` as `name` from its own archive; stopped again if the start fails."""
    store = workdir / "store"
    store.mkdir(parents=True)
    server = TorchServe(workdir, {name: build_archive(app, name, store, model_config)}, properties or {})
    try:
        server.start()
    except Exception:
        server.stop()
        raise
    return server


@contextmanager
def serving_both_paths(app: str, workdir: Path, batch_size: int = 16) -> Iterator[list[str]]:
    """One TorchServe serving `app` twice, as `APP-dynamic` (TorchServe's dynamic batching,
    `batch_size` requests per generate) and `APP-continuous`; yields their `LABEL=URL`s."""
    shutil.rmtree(workdir, ignore_errors=True)
    store = workdir / "store"
    store.mkdir(parents=True)
    configs = {"dynamic": dynamic_model_config(app, batch_size=batch_size), "continuous": continuous_model_config(app)}
    models = {f"{app}-{label}": build_archive(app, f"{app}-{label}", store, config) for label, config in configs.items()}
    server = TorchServe(workdir, models)
    try:
        server.start()
        yield [f"{label}={server.url}/predictions/{app}-{label}" for label in configs]
    finally:
        server.stop()
