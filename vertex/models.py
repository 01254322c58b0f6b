"""Model registry step: upload the serving container as a Model (or a new version)."""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

from vertex.container import ServingContainer
from vertex.errors import VertexConfigError

if TYPE_CHECKING:
    from google.cloud.aiplatform import Model

log = logging.getLogger(__name__)


def display_name_filter(display_name: str) -> str:
    """A list filter matching one display name exactly."""
    if '"' in display_name or "\\" in display_name:
        raise VertexConfigError(f"invalid display name {display_name!r}")
    return f'display_name="{display_name}"'


def label_value(text: str) -> str:
    """Labels allow only lowercase letters, digits, ``_`` and ``-``, 63 at most."""
    return re.sub(r"[^a-z0-9_-]", "-", text.lower())[:63]


def find_model(display_name: str) -> Model | None:
    """The newest Model with this display name, if any.

    Display names are not unique in Vertex; picking the newest keeps earlier
    accidental duplicates from hiding the model we keep versioning.
    """
    from google.cloud import aiplatform

    models = aiplatform.Model.list(filter=display_name_filter(display_name), order_by="create_time desc")
    return models[0] if models else None


def upload_model(container: ServingContainer, display_name: str) -> Model:
    """Register the container; an existing display name gets a new version, not a twin."""
    from google.cloud import aiplatform

    parent = find_model(display_name)
    parent_name = parent.resource_name if parent is not None else None
    log.info(
        "uploading %s as %s (%s)",
        container.image_uri,
        display_name,
        f"new version of {parent_name}" if parent_name else "new model",
    )
    return aiplatform.Model.upload(
        display_name=display_name,
        parent_model=parent_name,
        is_default_version=True,
        serving_container_image_uri=container.image_uri,
        serving_container_ports=[container.port],
        serving_container_predict_route=container.predict_route,
        serving_container_health_route=container.health_route,
        serving_container_invoke_route_prefix=container.invoke_route_prefix,
        serving_container_environment_variables=container.env(),
        serving_container_shared_memory_size_mb=container.shared_memory_mb,
        serving_container_deployment_timeout=container.deployment_timeout_s,
        artifact_uri=container.artifact_uri,
        labels={"app": label_value(container.app)},
        sync=True,
    )
