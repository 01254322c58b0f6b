"""The whole rollout as one call: upload (or version) the Model, then deploy it.

Kept apart from the CLI so that notebooks and tests get the same typed entry
point, returning both resources so the caller can clean up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vertex.container import ServingContainer
from vertex.endpoints import Deployment, deploy_model, get_or_create_endpoint
from vertex.errors import VertexConfigError
from vertex.machines import NO_BF16
from vertex.models import upload_model

if TYPE_CHECKING:
    from google.cloud.aiplatform import Endpoint, Model


def deploy_app(
    container: ServingContainer,
    deployment: Deployment,
    model_name: str,
    endpoint_name: str,
) -> tuple[Model, Endpoint]:
    """Upload then deploy; refuse what Vertex would refuse late, before anything is created.

    GPUs before Ampere have no bfloat16 units, so that pairing fails (or crawls) only
    once the replica is up and billing; Vertex refuses an invoke-prefix Model on
    a shared endpoint only at deploy time, after the upload.
    """
    if container.dtype == "bfloat16" and deployment.machine.accelerator_type in NO_BF16:
        raise VertexConfigError(f"{deployment.machine.describe()} has no bfloat16 support: use float16")
    if container.invoke_route_prefix and not deployment.dedicated_endpoint:
        raise VertexConfigError(
            "a Model with --invoke-route-prefix can only be deployed to a dedicated endpoint: add --dedicated-endpoint"
        )
    model = upload_model(container, model_name)
    endpoint = get_or_create_endpoint(endpoint_name, deployment.dedicated_endpoint)
    deploy_model(model, endpoint, deployment)
    return model, endpoint
