"""The product's process tree (the front, its healer and a real TorchServe), with archives built for it.

The benchmark and the tests start it here and reach TorchServe through the front, as users
do. The front's ports are picked free here; TorchServe's by the front itself
(``gateway.torchserve``: free loopback ports, its own TEMP and TMPDIR), so two suites (or a
suite and a `make serve`) on one host never meet.
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
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import psutil
import yaml

from gateway.contract import JSON, PROBE_BODY
from gateway.torchserve import free_ports

ROOT = Path(__file__).resolve().parents[1]


def build_archive(app: str, name: str, store: Path, model_config: dict[str, Any] | None = None) -> Path:
    """A no-archive copy of the app (fast to build, nothing to unzip), its config optionally changed."""
    config_path = ROOT / "apps" / app / "model-config.yaml"
    if model_config is not None:
        config_path = store / f"{name}-model-config.yaml"
        config_path.write_text(yaml.safe_dump(model_config))
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "archive.py"),
            app,
            "--name",
            name,
            "--model-config",
            str(config_path),
            "--format",
            "no-archive",
            "--export",
            str(store),
        ],
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
    """The product's own process tree (``python -m gateway``: the front, its healer, TorchServe).

    The test owns its lifetime. ``url`` is the front, as a user sees it; ``management``
    is TorchServe's management API on its internal loopback port (``ports.json`` in the run
    folder, rewritten when the front restarts TorchServe); ``metrics`` is the front's metrics
    port, which also carries TorchServe's own metrics.
    """

    workdir: Path
    models: dict[str, Path]
    properties: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    port: int = 0
    metrics_port: int = 0
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def management_port(self) -> int:
        return self.internal_ports()["management"]

    @property
    def management(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    @property
    def metrics(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    @property
    def run_dir(self) -> Path:
        return self.workdir / "run"

    def internal_ports(self) -> dict[str, int]:
        return json.loads((self.run_dir / "ports.json").read_text())

    def start(self, timeout: float = 600) -> TorchServe:
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        store = self.workdir / "store"
        store.mkdir(exist_ok=True)
        for name, path in self.models.items():
            if path.parent != store and not (store / name).exists():
                (store / name).symlink_to(path)
        self.port, self.metrics_port = free_ports(2)
        properties = (ROOT / "config.properties").read_text()
        properties += "\n".join(
            [f"metrics_config={ROOT / 'metrics.yaml'}", *(f"{key}={value}" for key, value in self.properties.items())]
        )
        config = self.workdir / "config.properties"
        config.write_text(properties + "\n")
        first = next(iter(self.models))
        environment = {
            **os.environ,
            "APP": first,
            "LLM_MODELS": ",".join(f"{name}={name}" for name in self.models),
            "AIP_HTTP_PORT": str(self.port),
            "LLM_METRICS_PORT": str(self.metrics_port),
            "LLM_GATEWAY_BIND": "127.0.0.1",
            "LLM_MODEL_STORE": str(store),
            "LLM_RUN_DIR": str(self.run_dir),
            "TS_CONFIG_FILE": str(config),
            "LOG_LOCATION": str(logs),
            "METRICS_LOCATION": str(logs),
            "PYTHONPATH": str(ROOT),
            **self.env,
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway"],
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
                raise RuntimeError(f"the server exited early:\n{self.log_tail()}")
            if self.healthy() and self.post(name, PROBE_BODY)[0] == 200:
                return
            time.sleep(1)
        raise TimeoutError(f"{name} not ready in {timeout} s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        """The front's /health: every app READY, answering, not healing."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=10) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def worker_ready(self, name: str) -> bool:
        return "READY" in self.worker_statuses(name)

    def worker_statuses(self, name: str) -> list[str]:
        try:
            with urllib.request.urlopen(f"{self.management}/models/{name}", timeout=5) as response:
                return [w["status"] for model in json.load(response) for w in model.get("workers", [])]
        except (urllib.error.URLError, OSError, ValueError):
            return []

    def post(
        self, name: str, body: Any, timeout: float = 300, raw: bytes | None = None, content_type: str = JSON
    ) -> tuple[int, Any]:
        """POST to the front's /predictions/name; returns the status and the decoded JSON (or text) body."""
        return post(f"{self.url}/predictions/{name}", body, timeout, raw, content_type, self.auth_headers())

    def auth_headers(self) -> dict[str, str]:
        """The front's API key as a client sends it, when this tree was started with one (``LLM_API_KEY``)."""
        key = self.env.get("LLM_API_KEY")
        return {"Authorization": f"Bearer {key}"} if key else {}

    def batches_received(self) -> int:
        """How many batches the workers have taken so far: each logs one line per batch."""
        log = self.workdir / "logs" / "model_log.log"
        return log.read_text(errors="replace").count("Backend received inference at")

    def processes(self) -> dict[str, list[int]]:
        """The tree under the front, by kind: the torchserve launcher, Java, the model workers."""
        return process_tree(self.process.pid)

    def log_tail(self, lines: int = 60) -> str:
        logs = self.workdir / "logs"
        text = ""
        for name in ("model_log.log", "ts_log.log", "stdout.log"):
            path = logs / name
            if path.exists():
                text += f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text

    def stop(self) -> None:
        """SIGTERM, as `make stop` and `docker stop` do: the front drains, then stops TorchServe."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            for child in psutil.Process(self.process.pid).children(recursive=True):
                with suppress(psutil.Error):
                    child.kill()
            self.process.kill()
            self.process.wait()


def process_tree(root: int) -> dict[str, list[int]]:
    """The TorchServe processes under `root` (the front), by kind: launcher, Java, model workers."""
    kinds: dict[str, list[int]] = {"launcher": [], "java": [], "workers": []}
    for child in psutil.Process(root).children(recursive=True):
        try:
            command = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "model_service_worker" in command:
            kinds["workers"].append(child.pid)
        elif command.split(" ", 1)[0].endswith("java"):
            kinds["java"].append(child.pid)
        elif "torchserve" in command:
            kinds["launcher"].append(child.pid)
    return kinds


def post(
    url: str,
    body: Any,
    timeout: float = 300,
    raw: bytes | None = None,
    content_type: str = JSON,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """POST `body` as JSON (or `raw` bytes); the status and the decoded JSON (or text) body, 0 if unreachable."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type, **(headers or {})})
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


def start_app(
    workdir: Path,
    name: str,
    model_config: dict[str, Any] | None = None,
    app: str = "smollm2",
    properties: dict[str, str] | None = None,
) -> TorchServe:
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
    `batch_size` requests per generate) and `APP-continuous`; yields their `LABEL=URL`s.

    The shipped path starts alone first, once, so that its `dtype: auto` is timed as at a user's
    `make serve`, where no other worker probes beside it; the decision is kept in the run folder,
    which the server of both paths then reads back."""
    shutil.rmtree(workdir, ignore_errors=True)
    store = workdir / "store"
    store.mkdir(parents=True)
    configs = {"dynamic": dynamic_model_config(app, batch_size=batch_size), "continuous": continuous_model_config(app)}
    models = {f"{app}-{label}": build_archive(app, f"{app}-{label}", store, config) for label, config in configs.items()}
    shipped = f"{app}-continuous"
    TorchServe(workdir, {shipped: models[shipped]}).start().stop()
    server = TorchServe(workdir, models)
    try:
        server.start()
        yield [f"{label}={server.url}/predictions/{app}-{label}" for label in configs]
    finally:
        server.stop()
