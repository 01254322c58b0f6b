"""Route the SDK's own HTTPS calls to an ``http://`` API endpoint (a local stand-in).

``Endpoint.raw_predict``, ``stream_raw_predict``, ``invoke`` and a dedicated
endpoint's ``predict`` do not go through the API client that ``api_endpoint``
redirects: they post ``https://`` URLs on fixed hosts (the regional API host and
the endpoint's dedicated DNS name) through ``Endpoint.authorized_session``. A
transport adapter mounted on that session for those hosts sends them to the
``http://`` endpoint instead, and keeps the host they were meant for in
``Host``, so the receiver can tell a dedicated endpoint's traffic from shared.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from requests.adapters import HTTPAdapter

if TYPE_CHECKING:
    from google.cloud.aiplatform import Endpoint


class ForwardTo(HTTPAdapter):
    """Sends each request to ``base_url`` with the same path and query."""

    def __init__(self, base_url: str) -> None:
        super().__init__()
        self.base_url = base_url.rstrip("/")

    def send(self, request: Any, **kwargs: Any) -> Any:
        parts = urlsplit(request.url)
        request.headers["Host"] = parts.netloc
        request.url = self.base_url + parts.path + (f"?{parts.query}" if parts.query else "")
        return super().send(request, **kwargs)


def sdk_hosts(endpoint: Endpoint) -> list[str]:
    """The hosts the SDK builds URLs on for this endpoint."""
    from google.cloud.aiplatform.constants import base

    hosts = [f"{endpoint.location}-{base.API_BASE_PATH}"]
    if endpoint.dedicated_endpoint_enabled and endpoint.dedicated_endpoint_dns:
        hosts.append(endpoint.dedicated_endpoint_dns)
    return hosts


def route_to(endpoint: Endpoint, base_url: str) -> None:
    """Mount ``ForwardTo(base_url)`` on the endpoint's session for each of its SDK hosts.

    A host prefix is longer than the ``https://`` one the SDK mounts its own
    keep-alive adapter on, so requests keeps choosing this one.
    """
    from google.auth.transport.requests import AuthorizedSession

    session: Any = endpoint.authorized_session or AuthorizedSession(endpoint.credentials)
    endpoint.authorized_session = session
    adapter = ForwardTo(base_url)
    for host in sdk_hosts(endpoint):
        session.mount(f"https://{host}/", adapter)
