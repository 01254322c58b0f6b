"""The serving container as Vertex will run it: image, port, routes and env.

The env built here is the whole contract between the Model resource and the
image (see docs/architecture.md); it is assembled in one dict so that a reviewer
sees in one place everything a replica will be started with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

from gateway.contract import DEFAULT_HTTP_PORT, HEALTH_ROUTE, predict_route
from handler.settings import DTYPES
from vertex.errors import SecretInEnvError, VertexConfigError

# PyTorch (and NCCL on multi-GPU machines) put tensors in /dev/shm, and a
# container's default (64 MiB, like Docker's) is far too small. Vertex reserves
# this much of the VM's memory, so stay well under n1-standard-8's 30 GB, which
# must also hold the weights while they load.
DEFAULT_SHARED_MEMORY_MB = 8 * 1024
# Loading several GiB of weights from Cloud Storage can take many minutes.
DEFAULT_DEPLOYMENT_TIMEOUT_S = 30 * 60
MAX_DEPLOYMENT_TIMEOUT_S = 2 * 60 * 60  # Vertex's limit
# Vertex's only invoke prefix: every non-root container path, through .../invoke/<path>.
INVOKE_ROUTE_PREFIXES = ("/*",)

# Matched on whole ``_``-separated words so that MAX_NEW_TOKENS or TOKENIZER_DIR
# stay allowed while HF_TOKEN or OPENAI_API_KEY are refused.
_SECRET_WORDS = frozenset(
    {"TOKEN", "SECRET", "SECRETS", "PASSWORD", "PASSWD", "APIKEY", "CREDENTIAL", "CREDENTIALS", "AUTH", "PAT"}
)
_SECRET_PAIRS = frozenset({("API", "KEY"), ("ACCESS", "KEY"), ("PRIVATE", "KEY"), ("SECRET", "KEY")})
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def looks_like_secret(key: str) -> bool:
    """Whether an env key names a credential rather than a setting."""
    words = key.upper().split("_")
    if _SECRET_WORDS.intersection(words):
        return True
    return any(pair in _SECRET_PAIRS for pair in zip(words, words[1:]))


def check_env_keys(env: Mapping[str, str]) -> None:
    """Refuse keys that look like secrets or that Vertex owns.

    A Model's env is readable by anyone with ``aiplatform.models.get`` and shows
    up in the console; a token there is a leaked token.
    """
    for key in env:
        if not _ENV_KEY.match(key):
            raise VertexConfigError(f"invalid env key {key!r}")
        if looks_like_secret(key):
            raise SecretInEnvError(
                f"refusing to put {key} in the Model's env: Vertex stores container env "
                "in plain text, visible to anyone who can read the Model. Keep the value "
                "in Secret Manager (gcloud secrets create ...), grant the endpoint's "
                "service account roles/secretmanager.secretAccessor, pass "
                "--service-account, and have the container read the secret at start-up; "
                "or copy gated weights to Cloud Storage once and use --artifact-uri."
            )
        if key.startswith("AIP_"):
            raise VertexConfigError(
                f"{key} is set by Vertex itself from the Model's port, routes and "
                "artifact_uri; use --port, --artifact-uri instead"
            )


@dataclass(frozen=True)
class ServingContainer:
    """Everything Model.upload needs to describe the container."""

    image_uri: str
    app: str
    dtype: str
    port: int = DEFAULT_HTTP_PORT
    artifact_uri: str | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict)
    shared_memory_mb: int = DEFAULT_SHARED_MEMORY_MB
    deployment_timeout_s: int = DEFAULT_DEPLOYMENT_TIMEOUT_S
    invoke_route_prefix: str | None = None

    def __post_init__(self) -> None:
        if not self.image_uri:
            raise VertexConfigError("no serving image: pass --image")
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", self.app):
            raise VertexConfigError(f"invalid app name {self.app!r}")
        if self.dtype not in DTYPES:
            raise VertexConfigError(f"invalid dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if not 0 < self.port < 65536:
            raise VertexConfigError(f"invalid port {self.port}")
        if self.artifact_uri is not None and not self.artifact_uri.startswith("gs://"):
            raise VertexConfigError(f"--artifact-uri must be a gs:// folder, not {self.artifact_uri!r}")
        if not 0 < self.deployment_timeout_s <= MAX_DEPLOYMENT_TIMEOUT_S:
            raise VertexConfigError(
                f"--deployment-timeout must be 1-{MAX_DEPLOYMENT_TIMEOUT_S} s (Vertex's limit), not {self.deployment_timeout_s}"
            )
        if self.shared_memory_mb < 64:
            raise VertexConfigError(f"--shared-memory-mb {self.shared_memory_mb} is below 64")
        if self.invoke_route_prefix is not None and self.invoke_route_prefix not in INVOKE_ROUTE_PREFIXES:
            raise VertexConfigError(
                f"--invoke-route-prefix {self.invoke_route_prefix!r} is not one Vertex accepts: "
                f"only {', '.join(INVOKE_ROUTE_PREFIXES)}"
            )
        check_env_keys(self.extra_env)
        reserved = {"APP", "LLM_DTYPE"} & set(self.extra_env)
        if reserved:
            raise VertexConfigError(f"{', '.join(sorted(reserved))} come from --app and the machine; do not pass them with --env")

    @property
    def predict_route(self) -> str | None:
        """None with an invoke prefix: Vertex takes one or the other, and the prefix reaches every path."""
        return None if self.invoke_route_prefix else predict_route(self.app)

    @property
    def health_route(self) -> str:
        return HEALTH_ROUTE

    def env(self) -> dict[str, str]:
        """The container env: the contract keys first, then the user's extras."""
        env = {"APP": self.app, "LLM_DTYPE": self.dtype}
        env.update(self.extra_env)
        return env
