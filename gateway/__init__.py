"""Readiness-aware HTTP front for the serving container.

TorchServe's own ``/ping`` says Healthy while the model is still loading, so a
platform that routes traffic on it (Vertex AI) sends requests that hang. The
gateway owns the public port (``$AIP_HTTP_PORT``), answers the health route
from TorchServe's management API, maps the Vertex predict route onto
``/predictions/<APP>`` and streams everything else through unchanged.

Modules: ``settings`` (env contract, read once), ``health`` (is a worker
READY?), ``proxy`` (the request handler), ``server`` (the HTTP server),
``supervisor`` (TorchServe + gateway as one container process).
"""
