"""The Vertex path end to end: SDK -> Vertex stand-in -> the front -> real TorchServe.

``container_url`` (tests/vertex_fixtures.py) is ``smollm2_server``'s front: the
product's process tree, as in the image (``python -m gateway`` with a real TorchServe
serving the offline SmolLM2 model behind it). Vertex checks the Model's health route and forwards
``:predict`` to its predict route.
"""

from __future__ import annotations

from typing import Iterator
from urllib.parse import urlsplit

import pytest
from google.api_core import exceptions

from tests.vertex_fixtures import (  # noqa: F401 - fixtures
    PROJECT,
    REGION,
    container_url,
    offline_google,
)
from tests.vertex_standin import StandIn
from vertex import (
    Deployment,
    ServingContainer,
    connect,
    deploy_app,
    predict,
    resolve_settings,
    teardown,
    validate_machine,
)

APP = "smollm2"
IMAGE = "us-docker.pkg.dev/test-project/llm/torchserve-llm-cpu:e2e"
PROMPTS = ["How to prepare a spanish omelette:", "The capital of France is"]


@pytest.fixture
def deployed(offline_google, container_url: str) -> Iterator[StandIn]:
    """SmolLM2 uploaded and deployed through the SDK onto the stand-in."""
    standin = StandIn(container_url=container_url, health_timeout_s=120).start()
    connect(resolve_settings(PROJECT, REGION, standin.url, environ={}))
    container = ServingContainer(image_uri=IMAGE, app=APP, dtype="float32", port=urlsplit(container_url).port)
    deploy_app(container, Deployment(machine=validate_machine("n1-standard-8")), APP, APP)
    yield standin
    teardown(APP, delete_models=True)
    standin.stop()


def test_endpoint_predict_reaches_torchserve(deployed):
    predictions = predict(APP, PROMPTS, {"max_new_tokens": 8, "temperature": 0})

    assert len(predictions) == len(PROMPTS)
    for prediction in predictions:
        assert isinstance(prediction["generated_text"], str)
        assert prediction["generated_text"].strip()
    assert deployed.calls("predict")[0].body["parameters"] == {"max_new_tokens": 8, "temperature": 0}


def test_invalid_parameters_come_back_as_a_client_error(deployed):
    with pytest.raises(exceptions.ClientError) as failure:
        predict(APP, PROMPTS[:1], {"max_new_tokens": -1})
    assert "max_new_tokens" in str(failure.value)
