"""Where Vertex calls go: project, region, API endpoint.

Every environment read of the package happens here, once, so that flags can
override env in one obvious place and tests can pass a mapping instead of
patching ``os.environ`` all over.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from vertex.errors import VertexConfigError

ENV_PROJECT = "GCP_PROJECT"
ENV_REGION = "GCP_REGION"
ENV_API_ENDPOINT = "VERTEX_API_ENDPOINT"
DEFAULT_REGION = "us-central1"


@dataclass(frozen=True)
class Settings:
    """Resolved connection settings; flags win over env, env over defaults."""

    project: str
    region: str
    api_endpoint: str | None = None

    @property
    def is_loopback_rest(self) -> bool:
        """An ``http://`` endpoint can only be a local stand-in or a plain-HTTP proxy.

        The SDK would otherwise use gRPC over TLS with Application Default
        Credentials; neither exists there.
        """
        return (self.api_endpoint or "").startswith("http://")

    @property
    def parent(self) -> str:
        return f"projects/{self.project}/locations/{self.region}"


def resolve_settings(
    project: str | None = None,
    region: str | None = None,
    api_endpoint: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merge flags over env; fail early when no project is known."""
    env = os.environ if environ is None else environ
    resolved_project = project or env.get(ENV_PROJECT, "")
    if not resolved_project:
        raise VertexConfigError(f"no GCP project: pass --project or set {ENV_PROJECT}")
    resolved_region = region or env.get(ENV_REGION) or DEFAULT_REGION
    resolved_endpoint = api_endpoint or env.get(ENV_API_ENDPOINT) or None
    return Settings(resolved_project, resolved_region, resolved_endpoint)


def connect(settings: Settings, staging_bucket: str | None = None) -> None:
    """Initialise the SDK's global config for these settings.

    ``aiplatform.init`` is process-global; calling it again with other settings
    simply replaces them, which is what tests rely on.
    """
    from google.cloud import aiplatform

    kwargs: dict[str, object] = {
        "project": settings.project,
        "location": settings.region,
        "staging_bucket": staging_bucket,
    }
    if settings.api_endpoint:
        kwargs["api_endpoint"] = settings.api_endpoint
    if settings.is_loopback_rest:
        from google.auth.credentials import AnonymousCredentials

        kwargs["api_transport"] = "rest"
        kwargs["credentials"] = AnonymousCredentials()
    aiplatform.init(**kwargs)
