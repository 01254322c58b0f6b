"""Prediction step: send instances and parameters to a deployed endpoint."""

from __future__ import annotations

from typing import Any

from vertex.endpoints import open_endpoint
from vertex.errors import VertexConfigError
from vertex.settings import Settings

# Public Vertex endpoints cut a request at about 60 s; waiting longer is pointless.
DEFAULT_TIMEOUT_S = 60.0


def predict(
    endpoint_name: str,
    instances: list[Any],
    parameters: dict[str, Any] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    settings: Settings | None = None,
) -> list[Any]:
    """The ``predictions`` list, one item per instance.

    ``settings`` matters only for an ``http://`` API endpoint: the SDK sends a
    dedicated endpoint's predict through its own session, routed there too.
    """
    if not instances:
        raise VertexConfigError("no instances to predict")
    endpoint = open_endpoint(endpoint_name, settings)
    response = endpoint.predict(instances=instances, parameters=parameters, timeout=timeout_s)
    return list(response.predictions)
