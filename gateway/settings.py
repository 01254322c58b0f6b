"""The front's env contract, read once into frozen objects.

Every ``AIP_*``/``LLM_*`` variable the front and its supervisor honour is read
here and nowhere else, so the contract (docs/docker.md, docs/architecture.md) has one home.
TorchServe's own ports are not part of it: the supervisor picks them free on
loopback at every start (``gateway.torchserve``), so nothing can collide.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

from gateway.contract import DEFAULT_HTTP_PORT, HEALTH_ROUTE, predict_route

# With LLM_EXPOSE_ADMIN, TorchServe's management API gets this fixed port on 0.0.0.0.
EXPOSED_MANAGEMENT_PORT = 7081
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
MIB = 1024 * 1024
# The front's own secrets: TorchServe and its workers never need them, so they never get them.
FRONT_SECRETS = frozenset({"LLM_API_KEY"})


class SettingsError(ValueError):
    """The server was started with an env that cannot work; message says which variable."""


@dataclass(frozen=True)
class FrontSettings:
    """What the HTTP front needs: where it listens, its routes, its limits."""

    apps: tuple[str, ...]
    port: int
    predict_route: str
    health_route: str
    metrics_port: int
    bind_host: str = "0.0.0.0"
    metrics_host: str = "127.0.0.1"
    # TorchServe's own max_request_size in config.properties is the same 1 MiB.
    max_request_bytes: int = MIB
    # A connection must finish its request headers within this, and each piece of a body
    # must arrive within body_timeout_s: slow clients cannot pin connections.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    # Bounds one silent gap on the upstream socket, not the whole response, so streams
    # of any length still work.
    upstream_timeout_s: float = 600.0
    # Connections the front accepts at once; beyond, uvicorn answers 503.
    max_connections: int = 512
    retry_after_s: int = 5
    # While an app heals, predictions wait in the front for it, up to this long and this many
    # at once; past either bound they get 503 with Retry-After. Sized so a normal heal (under
    # 30 s on a loaded CPU host) never refuses; a replay waits under the same time bound.
    heal_wait_s: float = 120.0
    heal_wait_requests: int = 256
    # LLM_API_KEY: when set, every route but the health routes wants it (gateway.auth). Never in a repr.
    api_key: str | None = field(default=None, repr=False)

    @property
    def app(self) -> str:
        """The app Vertex's predict route maps onto: the first one served."""
        return self.apps[0]

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> FrontSettings:
        app = env.get("APP", "").strip()
        if not app:
            raise SettingsError("APP is not set: it names the model registered in TorchServe")
        port = _port(env, "AIP_HTTP_PORT", DEFAULT_HTTP_PORT)
        predict = _route(env, "AIP_PREDICT_ROUTE", predict_route(app))
        health_route = _route(env, "AIP_HEALTH_ROUTE", HEALTH_ROUTE)
        if predict == health_route:
            raise SettingsError(f"AIP_PREDICT_ROUTE and AIP_HEALTH_ROUTE are both {predict!r}")
        metrics_port = _port(env, "LLM_METRICS_PORT", port + 2 if port + 2 < 65536 else 0, allow_zero=True)
        if metrics_port == port:
            raise SettingsError(f"LLM_METRICS_PORT={metrics_port} is the front's own port (AIP_HTTP_PORT)")
        return cls(
            apps=(app,),
            port=port,
            predict_route=predict,
            health_route=health_route,
            metrics_port=metrics_port,
            bind_host=env.get("LLM_GATEWAY_BIND", "0.0.0.0"),
            metrics_host="0.0.0.0" if admin_exposed(env) else "127.0.0.1",
            max_request_bytes=int(_positive_float(env, "LLM_MAX_REQUEST_BYTES", MIB)),
            upstream_timeout_s=_positive_float(env, "LLM_GATEWAY_TIMEOUT_S", 600.0),
            max_connections=int(_positive_float(env, "LLM_MAX_CONNECTIONS", 512)),
            header_timeout_s=_positive_float(env, "LLM_HEADER_TIMEOUT_S", 10.0),
            heal_wait_s=_positive_float(env, "LLM_HEAL_WAIT_S", 120.0),
            heal_wait_requests=int(_positive_float(env, "LLM_HEAL_WAIT_REQUESTS", 256)),
            api_key=env.get("LLM_API_KEY", "").strip() or None,
        )

    @property
    def open_routes(self) -> tuple[str, ...]:
        """The routes a probe reaches without the API key: health and liveness."""
        return tuple(dict.fromkeys((self.health_route, HEALTH_ROUTE, "/ping")))


def admin_exposed(env: Mapping[str, str]) -> bool:
    """``LLM_EXPOSE_ADMIN`` is the one way to put metrics and management beyond loopback."""
    return env.get("LLM_EXPOSE_ADMIN", "").strip().lower() in TRUE_WORDS


@dataclass(frozen=True)
class SupervisorSettings:
    """How to start TorchServe, what to serve, and how to heal and stop it."""

    front: FrontSettings
    ts_config: Path
    model_store: Path
    # Model name -> archive (``APP.mar`` or a no-archive folder) in the store.
    models: Mapping[str, str]
    torchserve_env: Mapping[str, str]
    # The folder for TorchServe's config, temp folder and pid file; a fresh temp folder if None.
    run_dir: Path | None = None
    # A fixed port on 0.0.0.0 for TorchServe's management API; loopback and free if None.
    exposed_management_port: int | None = None
    # podman/docker stop wait 10 s before SIGKILL; stay well inside that.
    stop_grace_s: float = 8.0
    # Scaling a model back up must give a READY worker that answers within this, or
    # TorchServe is restarted.
    heal_timeout_s: float = 180.0
    startup_timeout_s: float = 900.0
    properties: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SupervisorSettings:
        front = FrontSettings.from_env(env)
        home = Path(env.get("HOME", "/home/model-server"))
        ts_config = Path(env.get("TS_CONFIG_FILE", str(home / "config.properties")))
        model_store = Path(env.get("LLM_MODEL_STORE", str(home / "model-store")))
        models = _models(env, front.app, model_store)
        front = replace(front, apps=tuple(models))
        _check_weight_source(env)
        run_dir = env.get("LLM_RUN_DIR", "").strip()
        return cls(
            front=front,
            ts_config=ts_config,
            model_store=model_store,
            models=models,
            torchserve_env={name: value for name, value in env.items() if name not in FRONT_SECRETS},
            run_dir=Path(run_dir) if run_dir else None,
            exposed_management_port=EXPOSED_MANAGEMENT_PORT if admin_exposed(env) else None,
            stop_grace_s=_positive_float(env, "LLM_STOP_GRACE_S", 8.0),
            heal_timeout_s=_positive_float(env, "LLM_HEAL_TIMEOUT_S", 180.0),
            startup_timeout_s=_positive_float(env, "LLM_STARTUP_TIMEOUT_S", 900.0),
        )


def _models(env: Mapping[str, str], app: str, model_store: Path) -> dict[str, str]:
    """APP and its archive, or ``LLM_MODELS=name=archive,...`` for several (APP's first)."""
    listed = env.get("LLM_MODELS", "").strip()
    if not listed:
        return {app: env.get("LLM_MODEL_ARCHIVE", "").strip() or _only_archive(model_store)}
    models = {}
    for item in listed.split(","):
        name, _, archive = item.strip().partition("=")
        if not name or not archive:
            raise SettingsError(f"LLM_MODELS item {item!r} is not NAME=ARCHIVE")
        models[name] = archive
    if app not in models:
        raise SettingsError(f"LLM_MODELS={listed!r} does not serve APP={app!r}")
    return {app: models.pop(app), **models}


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


def _port(env: Mapping[str, str], name: str, default: int, allow_zero: bool = False) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    lowest = 0 if allow_zero else 1
    if not raw.isdigit() or not lowest <= int(raw) < 65536:
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
    if not value > 0:
        raise SettingsError(f"{name}={raw!r} must be positive")
    return value
