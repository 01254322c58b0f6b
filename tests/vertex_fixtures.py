"""Pytest fixtures for the Vertex tests: the stand-in API, a fake or real container, GCS.

Test modules import the fixtures they use from here (``from tests.vertex_fixtures
import ...``), so the Vertex tests need nothing from the shared conftest files.
"""

from __future__ import annotations

import os

# google.auth reads GCE_METADATA_HOST when it is imported, so this has to
# happen at import time, before any fixture (and before the SDK) runs; it only
# ever points the metadata lookup at a closed loopback port.
os.environ.setdefault("NO_GCE_CHECK", "true")
os.environ.setdefault("GCE_METADATA_HOST", "127.0.0.1:9")
os.environ.setdefault("GCE_METADATA_IP", "127.0.0.1:9")

from typing import Iterator  # noqa: E402

import pytest  # noqa: E402

from tests.support.torchserve import TorchServe  # noqa: E402
from tests.vertex_standin import FakeContainer, StandIn  # noqa: E402
from vertex.settings import Settings, connect, resolve_settings  # noqa: E402

PROJECT = "test-project"
REGION = "us-central1"
BUCKET = "llm-weights"


@pytest.fixture
def offline_google(monkeypatch: pytest.MonkeyPatch) -> None:
    """No metadata server, no ambient project or emulator from the developer's shell."""
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    for key in (
        "GCP_PROJECT",
        "GCP_REGION",
        "VERTEX_API_ENDPOINT",
        "GOOGLE_CLOUD_PROJECT",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "STORAGE_EMULATOR_HOST",
    ):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def fake_container() -> Iterator[FakeContainer]:
    container = FakeContainer().start()
    yield container
    container.stop()


@pytest.fixture
def container_url(smollm2_server: TorchServe) -> str:
    """Where a real "replica" answers /health and the predict route: the front of a real TorchServe."""
    return smollm2_server.url


@pytest.fixture
def standin(fake_container: FakeContainer) -> Iterator[StandIn]:
    """The stand-in API; its "replicas" are the fake container."""
    server = StandIn(container_url=fake_container.url, health_timeout_s=1.0).start()
    yield server
    server.stop()


@pytest.fixture
def vertex_settings(offline_google: None, standin: StandIn) -> Settings:
    """The SDK initialised against this test's stand-in (``aiplatform.init`` is global)."""
    settings = resolve_settings(PROJECT, REGION, standin.url, environ={})
    connect(settings)
    return settings


@pytest.fixture
def gcs_emulator(offline_google: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An in-memory gcp-storage-emulator with one bucket; yields its URL."""
    from gcp_storage_emulator.server import create_server

    server = create_server("127.0.0.1", 0, in_memory=True, default_bucket=BUCKET)
    server.start()
    host, port = server._api._httpd.server_address[:2]  # port 0: ask the socket
    url = f"http://{host}:{port}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    yield url
    server.stop()
