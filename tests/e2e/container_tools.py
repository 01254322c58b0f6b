"""Build and run the project's images with buildah/podman, no Docker engine needed.

Flags and storage come from .ci/container-base/env.sh (the one place that says
what this kind of machine needs), so the tests and a person at a shell build
the same way. Every image, layer and container state lives under CONTAINER_WORK
(default .work/containers of this clone). Containers and image tags carry
SESSION, new for each test run, so two suites on one machine never touch each
other's; each is removed by name.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASE_DIR = ROOT / ".ci" / "container-base"
TOOLS = ("buildah", "podman", "runc", "slirp4netns", "debootstrap")
SESSION = secrets.token_hex(4)


def session_name(kind: str) -> str:
    """A container name no other test run on this machine uses."""
    return f"tsllm-e2e-{SESSION}-{kind}"


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def container_env() -> dict[str, str]:
    """os.environ plus what env.sh exports (storage, TMPDIR, build and run flags)."""
    out = subprocess.run(
        ["bash", "-c", f"source {shlex.quote(str(BASE_DIR / 'env.sh'))} && env -0"],
        check=True,
        capture_output=True,
        cwd=ROOT,
    ).stdout
    return dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)


@dataclass
class Podman:
    """Runs buildah/podman with the project's storage; logs each build under CONTAINER_WORK/logs."""

    env: dict[str, str] = field(default_factory=container_env)

    @property
    def work(self) -> Path:
        return Path(self.env["CONTAINER_WORK"])

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def base_image(self) -> str:
        """CI's equivalent of the default base (Debian bookworm, Python 3.11), cached by recipe hash."""
        log = self._log("base")
        with log.open("w") as sink:
            result = subprocess.run(
                ["bash", str(BASE_DIR / "build.sh")],
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=sink,
                text=True,
                timeout=1800,
            )
        if result.returncode:
            raise AssertionError(f"base build failed, see {log}:\n{_tail(log)}")
        return result.stdout.strip().splitlines()[-1]

    def make_build(self, target: str, base: str, *variables: str) -> None:
        """`make TARGET` (build-dev, build-slim) with buildah as the client, as a user would run it."""
        log = self._log(f"{target}-{SESSION}")
        command = [
            "make",
            "--no-print-directory",
            target,
            "DOCKER=buildah",
            f"BASE_IMAGE={base}",
            # The CPU wheel index is out of reach here; /opt/wheels (mounted) has torch.
            "TORCH_INDEX_URL=",
            f"DOCKER_BUILD_FLAGS={self.env['BUILDAH_BUILD_OPTS']} --layers",
            *variables,
        ]
        with log.open("w") as sink:
            result = subprocess.run(command, cwd=ROOT, env=self.env, stdout=sink, stderr=subprocess.STDOUT, timeout=3600)
        if result.returncode:
            raise AssertionError(f"make {target} failed, see {log}:\n{_tail(log)}")

    def remove_image(self, image: str) -> None:
        """Untag; the cached layers stay for the next run's build."""
        self.run("podman", "rmi", image, check=False)

    def run_once(self, image: str, *command: str) -> str:
        """stdout of COMMAND in a new container of IMAGE, through the image's entrypoint."""
        name = session_name("once")
        try:
            return self.run(
                "podman",
                "run",
                "--rm",
                "--name",
                name,
                *shlex.split(self.env["PODMAN_RUN_OPTS"]),
                "--network",
                "none",
                image,
                *command,
            ).stdout
        finally:
            self.remove(name)

    def image_size(self, image: str) -> int:
        return int(self.run("podman", "image", "inspect", "--format", "{{.Size}}", image).stdout.strip())

    def start(self, name: str, image: str, port: int, *options: str, env: dict[str, str] | None = None) -> Container:
        """Start detached in its own network namespace; only 127.0.0.1:port reaches it."""
        self.remove(name)
        env_args = [arg for key, value in (env or {}).items() for arg in ("-e", f"{key}={value}")]
        container_port = (env or {}).get("AIP_HTTP_PORT", "7080")
        self.run(
            "podman",
            "run",
            "-d",
            "--name",
            name,
            *shlex.split(self.env["PODMAN_RUN_OPTS"]),
            "--network",
            "slirp4netns",
            "-p",
            f"127.0.0.1:{port}:{container_port}",
            *env_args,
            *options,
            image,
        )
        return Container(self, name, port)

    def remove(self, name: str) -> None:
        self.run("podman", "rm", "-f", "-t", "0", name, check=False)

    def _log(self, name: str) -> Path:
        logs = self.work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        return logs / f"{name}.log"


@dataclass
class Container:
    podman: Podman
    name: str
    port: int

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 120):
        """(status, headers, body) or (0, {}, b"") when nothing answers yet."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=payload, headers={"Content-Type": "application/json"} if payload else {})
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
        except (OSError, http.client.HTTPException):
            return 0, {}, b""
        finally:
            conn.close()

    def running(self) -> bool:
        """False only once podman says so: a failed inspect on a loaded machine is not an exit."""
        state = self.podman.run("podman", "inspect", "-f", "{{.State.Running}}", self.name, check=False)
        return state.stdout.strip() != "false"

    def exit_code(self) -> int:
        return int(self.podman.run("podman", "inspect", "-f", "{{.State.ExitCode}}", self.name).stdout.strip())

    def logs(self, tail: int = 60) -> str:
        """The last lines of the container's log, without TorchServe's per-request access lines."""
        result = self.podman.run("podman", "logs", self.name, check=False)
        lines = [line for line in (result.stdout + result.stderr).splitlines() if "ACCESS_LOG" not in line]
        return "\n".join(lines[-tail:])

    def exec(self, *command: str) -> subprocess.CompletedProcess:
        return self.podman.run("podman", "exec", self.name, *command)

    def wait_exit(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running():
                return True
            time.sleep(0.2)
        return False

    def remove(self) -> None:
        self.podman.remove(self.name)


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def running_as_root() -> bool:
    return os.geteuid() == 0
