"""Prediction step: send instances and parameters to a deployed endpoint."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from vertex.endpoints import find_endpoints
from vertex.errors import VertexConfigError

# Public Vertex endpoints cut a request at about 60 s; waiting longer is pointless.
DEFAULT_TIMEOUT_S = 60.0


def predict(
    endpoint_name: str,
    instances: List[Any],
    parameters: Optional[Dict[str, Any]] = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> List[Any]:
    """The ``predictions`` list, one item per instance."""
    if not instances:
        raise VertexConfigError("no instances to predict")
    endpoints = find_endpoints(endpoint_name)
    if not endpoints:
        raise VertexConfigError(f"no endpoint named {endpoint_name!r}: run `make deploy` first")
    response = endpoints[0].predict(
        instances=instances, parameters=parameters, timeout=timeout_s
    )
    return list(response.predictions)
