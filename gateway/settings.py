"""The container's env contract, read once into frozen objects.

Every ``AIP_*``/``TS_*``/``LLM_*`` variable the gateway and supervisor honour is
read here and nowhere else, so the contract in docs/CONTRACT.md has one home.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

DEFAULT_HTTP_PORT = 7080
DEFAULT_INFERENCE_ADDRESS = "http://127.0.0.1:7085"
DEFAULT_MANAGEMENT_PORT = 7081
DEFAULT_METRICS_PORT = 7082
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})


class SettingsError(ValueError):
    """The container was started with an env that cannot work; message says which variable."""


@dataclass(frozen=True)
class Upstream:
    """Where the gateway connects to reach one TorchServe API."""

    host: str
    port: int

    @classmethod
    def from_address(cls, name: str, address: str) -> "Upstream":
        """Parse a TorchServe binding address such as ``http://0.0.0.0:7081``.

        A wildcard bind is reached through loopback: the gateway runs beside
        TorchServe in the same network namespace.
        """
        parts = urlsplit(address)
        if parts.scheme != "http" or not parts.hostname or parts.port is None:
            raise SettingsError(f"{name}={address!r}: expected http://HOST:PORT")
        host = parts.hostname
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        return cls(host=host, port=parts.port)


@dataclass(frozen=True)
class GatewaySettings:
    """What the HTTP front needs: its port, its two Vertex routes and its upstreams."""

    app: str
    port: int
    predict_route: str
    health_route: str
    inference: Upstream
    management: Upstream
    bind_host: str = "0.0.0.0"
    # Generations can be long; this bounds one silent gap on the upstream
    # socket, not the whole response, so streams of any length still work.
    upstream_timeout_s: float = 600.0
    health_timeout_s: float = 2.0

    @property
    def upstream_predict_path(self) -> str:
        return f"/predictions/{self.app}"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "GatewaySettings":
        app = env.get("APP", "").strip()
        if not app:
            raise SettingsError("APP is not set: it names the model registered in TorchServe")
        port = _port(env, "AIP_HTTP_PORT", DEFAULT_HTTP_PORT)
        predict_route = _route(env, "AIP_PREDICT_ROUTE", f"/predictions/{app}")
        health_route = _route(env, "AIP_HEALTH_ROUTE", "/health")
        if predict_route == health_route:
            raise SettingsError(f"AIP_PREDICT_ROUTE and AIP_HEALTH_ROUTE are both {predict_route!r}")
        addresses = torchserve_addresses(env)
        inference = Upstream.from_address("TS_INFERENCE_ADDRESS", addresses["TS_INFERENCE_ADDRESS"])
        management = Upstream.from_address("TS_MANAGEMENT_ADDRESS", addresses["TS_MANAGEMENT_ADDRESS"])
        taken = {inference.port, management.port, Upstream.from_address("TS_METRICS_ADDRESS", addresses["TS_METRICS_ADDRESS"]).port}
        if port in taken:
            raise SettingsError(f"AIP_HTTP_PORT={port} collides with a TorchServe port ({sorted(taken)})")
        return cls(
            app=app,
            port=port,
            predict_route=predict_route,
            health_route=health_route,
            inference=inference,
            management=management,
            bind_host=env.get("LLM_GATEWAY_BIND", "0.0.0.0"),
            upstream_timeout_s=_positive_float(env, "LLM_GATEWAY_TIMEOUT_S", 600.0),
        )


def torchserve_addresses(env: Mapping[str, str]) -> dict[str, str]:
    """TorchServe's three binding addresses as ``TS_*`` env values.

    Inference stays on loopback: the gateway is its only public face. The
    management and metrics APIs stay on loopback too unless ``LLM_EXPOSE_ADMIN``
    is true (then they bind 0.0.0.0); an explicit ``TS_*`` value always wins.
    TorchServe reads these because the container's config.properties sets
    ``enable_envvars_config=true``.
    """
    admin_host = "0.0.0.0" if env.get("LLM_EXPOSE_ADMIN", "").strip().lower() in TRUE_WORDS else "127.0.0.1"
    return {
        "TS_INFERENCE_ADDRESS": env.get("TS_INFERENCE_ADDRESS", DEFAULT_INFERENCE_ADDRESS),
        "TS_MANAGEMENT_ADDRESS": env.get("TS_MANAGEMENT_ADDRESS", f"http://{admin_host}:{DEFAULT_MANAGEMENT_PORT}"),
        "TS_METRICS_ADDRESS": env.get("TS_METRICS_ADDRESS", f"http://{admin_host}:{DEFAULT_METRICS_PORT}"),
    }


@dataclass(frozen=True)
class SupervisorSettings:
    """How to start TorchServe in the container and what it must be given."""

    gateway: GatewaySettings
    ts_config: Path
    model_store: Path
    model_archive: str
    torchserve_env: Mapping[str, str]
    # podman/docker stop wait 10 s before SIGKILL; stay well inside that.
    stop_grace_s: float = 8.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "SupervisorSettings":
        gateway = GatewaySettings.from_env(env)
        home = Path(env.get("HOME", "/home/model-server"))
        ts_config = Path(env.get("TS_CONFIG_FILE", str(home / "config.properties")))
        model_store = Path(env.get("LLM_MODEL_STORE", str(home / "model-store")))
        archive = env.get("LLM_MODEL_ARCHIVE", "").strip() or _only_archive(model_store)
        _check_weight_source(env)
        ts_env = dict(env)
        ts_env.update(torchserve_addresses(env))
        return cls(
            gateway=gateway,
            ts_config=ts_config,
            model_store=model_store,
            model_archive=archive,
            torchserve_env=ts_env,
            stop_grace_s=_positive_float(env, "LLM_STOP_GRACE_S", 8.0),
        )


def _only_archive(model_store: Path) -> str:
    """The image's one model (``APP.mar`` or a no-archive folder), so the env need not name it."""
    try:
        entries = sorted(p.name for p in model_store.iterdir() if not p.name.startswith("."))
    except OSError as exc:
        raise SettingsError(f"model store {model_store} cannot be read: {exc}") from None
    if len(entries) != 1:
        raise SettingsError(f"model store {model_store} holds {entries}: set LLM_MODEL_ARCHIVE to the one to serve")
    return entries[0]


def _check_weight_source(env: Mapping[str, str]) -> None:
    """Fail at start, not after a hanging load, when a slim image has no weights.

    TorchServe answers a model whose ``initialize`` keeps failing by letting
    requests hang, so the missing folder must be caught before it starts.
    """
    model_dir = env.get("LLM_MODEL_DIR", "").strip()
    if model_dir:
        _check_readable_folder(model_dir)
    image_has_weights = env.get("LLM_IMAGE_WEIGHTS", "baked") != "none"
    if not image_has_weights and not model_dir and not env.get("AIP_STORAGE_URI", "").strip():
        raise SettingsError(
            "this image carries no weights: set AIP_STORAGE_URI (gs://…) or mount a checkpoint and set LLM_MODEL_DIR"
        )


def _check_readable_folder(model_dir: str) -> None:
    """A mounted checkpoint must be readable by the server's user, not only by its owner.

    Files written by root with mode 0600 (``save_pretrained`` does that) would
    otherwise fail inside the worker as a misleading "No such file", in a loop.
    """
    folder = Path(model_dir)
    if not folder.is_dir():
        raise SettingsError(f"LLM_MODEL_DIR={model_dir!r} is not a folder (is the volume mounted?)")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise SettingsError(f"LLM_MODEL_DIR={model_dir!r}: the folder is not readable by uid {os.getuid()} (chmod -R a+rX it)")
    unreadable = sorted(p.name for p in folder.iterdir() if p.is_file() and not os.access(p, os.R_OK))
    if unreadable:
        raise SettingsError(
            f"LLM_MODEL_DIR={model_dir!r}: {unreadable or 'the folder'} not readable by uid {os.getuid()}"
            " (chmod -R a+rX the checkpoint)"
        )
    if not (folder / "config.json").is_file():
        raise SettingsError(f"LLM_MODEL_DIR={model_dir!r} holds no config.json: not a Hugging Face checkpoint")


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise SettingsError(f"{name}={raw!r} is not a TCP port")
    return int(raw)


def _route(env: Mapping[str, str], name: str, default: str) -> str:
    route = env.get(name, "").strip() or default
    if not route.startswith("/"):
        raise SettingsError(f"{name}={route!r} must start with '/'")
    return route


def _positive_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if value <= 0:
        raise SettingsError(f"{name}={raw!r} must be positive")
    return value
