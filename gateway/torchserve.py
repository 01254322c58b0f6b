"""TorchServe as a child: free loopback ports, its own temp folder, its own process group.

Every start picks every port TorchServe opens (inference, management, metrics, both gRPC
ports, the worker and distribution base ports) free on 127.0.0.1, writes a config that
names them, and gives TorchServe a temp folder of its own. TorchServe derives its worker
socket paths from ``java.io.tmpdir`` and the worker port, and ``torchserve --stop`` finds
its server through one pid file in the temp folder: with both private, two servers on one
host (``make serve`` beside ``make run --network host``, or two checkouts) never meet.

``torchserve --foreground`` runs in a new session, so one signal reaches the Python
launcher, the Java frontend and the model workers at once (the launcher does not forward
signals to Java).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Mapping

import yaml

from gateway.contract import DTYPE_REPORTS

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# TS_* variables that would override our addresses (config.properties sets enable_envvars_config).
OURS = ("ADDRESS", "PORT")


@dataclass(frozen=True)
class Ports:
    inference: int
    management: int
    metrics: int
    grpc_inference: int
    grpc_management: int
    worker: int
    distribution: int


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """``count`` distinct ports free on ``host`` now (held open together, so no repeats)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port(host: str = LOOPBACK) -> int:
    return free_ports(1, host)[0]


def pick_ports(management: int | None = None) -> Ports:
    found = free_ports(7)
    return Ports(
        inference=found[0],
        management=management or found[1],
        metrics=found[2],
        grpc_inference=found[3],
        grpc_management=found[4],
        worker=found[5],
        distribution=found[6],
    )


def find_torchserve(env: Mapping[str, str]) -> str:
    """``torchserve`` from PATH, else the one installed beside this Python (a venv run without activating it)."""
    path = os.pathsep.join(filter(None, [env.get("PATH", ""), str(Path(sys.executable).parent)]))
    return shutil.which("torchserve", path=path) or "torchserve"


def archive_config(store: Path, archive: str) -> dict:
    """The ``model-config.yaml`` packed in an archive (a ``.mar`` zip or a no-archive folder); {} if none."""
    path = store / archive
    try:
        if path.is_dir():
            manifest = json.loads((path / "MAR-INF" / "MANIFEST.json").read_text())
            name = manifest.get("model", {}).get("configFile")
            return yaml.safe_load((path / name).read_text()) or {} if name else {}
        with zipfile.ZipFile(path) as mar:
            manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
            name = manifest.get("model", {}).get("configFile")
            return yaml.safe_load(mar.read(name)) or {} if name else {}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, yaml.YAMLError) as exc:
        log.warning("cannot read the model config of %s: %s", path, exc)
        return {}


def group_alive(pgid: int, proc: str = "/proc") -> bool:
    """Whether a process of group ``pgid`` still runs; zombies do not count.

    Orphaned workers are reaped by the init (tini), not by us, so a plain
    ``killpg(pgid, 0)`` would see their zombies as alive until then.
    """
    return bool(group_members(pgid, proc))


def group_members(pgid: int, proc: str = "/proc") -> list[int]:
    """The live (not zombie) pids of process group ``pgid``."""
    members = []
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        try:
            with open(f"{proc}/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone while we looked
        state, group = fields[0], int(fields[2])
        if group == pgid and state not in (b"Z", b"X"):
            members.append(int(entry))
    return members


def pid_alive(pid: int, proc: str = "/proc") -> bool:
    """A process that runs (a zombie is dead: its parent just has not reaped it yet)."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def _overrides_ours(name: str) -> bool:
    """TS_* variables that TorchServe would prefer to the config we write."""
    return name == "TS_CONFIG_FILE" or (name.startswith("TS_") and name.rsplit("_", 1)[-1] in OURS)


class TorchServeProcess:
    """One TorchServe, started and stopped by us; every start gets fresh ports (``RUN_DIR/ports.json``)."""

    def __init__(
        self,
        ts_config: Path,
        model_store: Path,
        models: Mapping[str, str],
        env: Mapping[str, str],
        run_dir: Path,
        executable: str | None = None,
        exposed_management_port: int | None = None,
        properties: Mapping[str, str] | None = None,
        output: IO[bytes] | None = None,
    ) -> None:
        self.ts_config = ts_config
        self.model_store = model_store.resolve()
        self.models = dict(models)
        self.env = env
        self.run_dir = run_dir
        self.executable = executable or find_torchserve(env)
        self.exposed_management_port = exposed_management_port
        self.properties = dict(properties or {})
        self.output = output
        self.ports: Ports | None = None
        self.process: subprocess.Popen | None = None

    @property
    def inference_url(self) -> str:
        return f"http://{LOOPBACK}:{self._ports().inference}"

    @property
    def management_url(self) -> str:
        return f"http://{LOOPBACK}:{self._ports().management}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self._ports().metrics}"

    def _ports(self) -> Ports:
        if self.ports is None:
            raise RuntimeError("TorchServe has not been started: it has no ports yet")
        return self.ports

    def running(self) -> subprocess.Popen:
        """The process of the latest start."""
        if self.process is None:
            raise RuntimeError("TorchServe has not been started")
        return self.process

    def config_text(self, ports: Ports, tmp: Path) -> str:
        """The base config with our addresses, ports and store appended (later keys win)."""
        management_host = "0.0.0.0" if self.exposed_management_port else LOOPBACK
        ours = {
            "inference_address": f"http://{LOOPBACK}:{ports.inference}",
            "management_address": f"http://{management_host}:{ports.management}",
            "metrics_address": f"http://{LOOPBACK}:{ports.metrics}",
            "grpc_inference_address": LOOPBACK,
            "grpc_management_address": LOOPBACK,
            "grpc_inference_port": str(ports.grpc_inference),
            "grpc_management_port": str(ports.grpc_management),
            "initial_worker_port": str(ports.worker),
            "initial_distribution_port": str(ports.distribution),
            "model_store": str(self.model_store),
            # GPU metrics through NVML instead of TorchServe's nvgpu (gateway.system_metrics);
            # TorchServe runs its own python with these arguments, split on spaces.
            "system_metrics_cmd": "-m gateway.system_metrics",
            **self.properties,
        }
        base = self.ts_config.read_text()
        return base.rstrip("\n") + "\n# set by gateway.torchserve at start\n" + "".join(f"{k}={v}\n" for k, v in ours.items())

    def start(self) -> None:
        self.ports = pick_ports(self.exposed_management_port)
        tmp = self.run_dir / "tmp"
        # TorchServe unpacks archives there under a name that does not change with their
        # content, and would reuse an older unpacked copy: every start begins empty.
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        # Each worker reports its dtype decision once it has loaded; none from an earlier run is shown meanwhile.
        shutil.rmtree(self.run_dir / DTYPE_REPORTS, ignore_errors=True)
        config = self.run_dir / "config.properties"
        config.write_text(self.config_text(self.ports, tmp))
        env = {k: v for k, v in self.env.items() if not _overrides_ours(k)}
        # TEMP becomes -Djava.io.tmpdir (worker sockets), TMPDIR the launcher's pid file folder.
        # LLM_TORCHSERVE_TMP tells the workers that folder lives as long as this TorchServe: a
        # worker started again within it (a heal) skips the warm-up (handler.service).
        env.update(TEMP=str(tmp), TMPDIR=str(tmp), LLM_TORCHSERVE_TMP=str(tmp))
        # The run folder outlives TorchServe's restarts: the workers keep `dtype: auto`'s decision
        # there (handler.settings), so a heal does not time the candidates again.
        env.setdefault("LLM_RUN_DIR", str(self.run_dir))
        # So does inductor's cache: a worker that compiles (handler.schedulers.compiled_decode) finds
        # what an earlier start compiled, not an empty TEMP.
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(self.run_dir / "inductor"))
        command = [
            self.executable,
            "--foreground",
            "--ncs",
            "--disable-token-auth",
            "--ts-config",
            str(config),
            "--model-store",
            str(self.model_store),
            "--models",
            *(f"{name}={archive}" for name, archive in self.models.items()),
        ]
        (self.run_dir / "ports.json").write_text(json.dumps(asdict(self.ports)) + "\n")
        log.info(
            "starting TorchServe: inference %d, management %d, metrics %d (loopback), temp %s",
            self.ports.inference,
            self.ports.management,
            self.ports.metrics,
            tmp,
        )
        self.process = subprocess.Popen(
            command, env=env, start_new_session=True, stdout=self.output, stderr=subprocess.STDOUT if self.output else None
        )

    def poll(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def members(self) -> list[int]:
        """Every live process of its group: the launcher, Java, the workers."""
        return [] if self.process is None else group_members(self.process.pid)

    def stop(self, grace_s: float) -> int:
        """SIGTERM the group, wait for all of it to go, SIGKILL what is left at the deadline.

        Returns 0 when everything left within the grace, 137 when something had to be killed.
        """
        process = self.process
        if process is None:
            return 0
        deadline = time.monotonic() + grace_s
        _signal_group(process, signal.SIGTERM)
        while time.monotonic() < deadline:
            if process.poll() is not None and not group_alive(process.pid):
                log.info("TorchServe stopped")
                return 0
            time.sleep(0.05)
        log.warning("TorchServe still running after %.1f s: killing it", grace_s)
        _signal_group(process, signal.SIGKILL)
        process.wait()
        return 137


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass
