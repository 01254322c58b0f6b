"""Model.upload through the real SDK: the container contract as Vertex receives it."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from google.cloud import aiplatform_v1

from tests.vertex_fixtures import (  # noqa: F401 - fixtures
    fake_container,
    offline_google,
    standin,
    vertex_settings,
)
from tests.vertex_standin import StandIn
from vertex import ServingContainer, upload_model
from vertex.cli import main

IMAGE = "us-docker.pkg.dev/test-project/llm/torchserve-llm-gpu:1.0"


def upload_requests(standin: StandIn) -> list:
    return [aiplatform_v1.UploadModelRequest.from_json(json.dumps(call.body)) for call in standin.calls("upload_model")]


def test_upload_sends_image_port_routes_and_env(vertex_settings, standin):
    container = ServingContainer(image_uri=IMAGE, app="smollm2", dtype="bfloat16", extra_env={"LLM_MAX_NEW_TOKENS": "512"})
    model = upload_model(container, "smollm2")

    [request] = upload_requests(standin)
    spec = request.model.container_spec
    assert request.model.display_name == "smollm2"
    assert request.parent_model == ""
    assert spec.image_uri == IMAGE
    assert [p.container_port for p in spec.ports] == [7080]
    assert spec.predict_route == "/predictions/smollm2"
    assert spec.health_route == "/health"
    assert {e.name: e.value for e in spec.env} == {"APP": "smollm2", "LLM_DTYPE": "bfloat16", "LLM_MAX_NEW_TOKENS": "512"}
    assert spec.shared_memory_size_mb == 8 * 1024
    assert spec.deployment_timeout == timedelta(minutes=30)
    assert model.version_id == "1"


def test_reupload_is_a_new_version_of_the_same_model(vertex_settings, standin):
    container = ServingContainer(image_uri=IMAGE, app="smollm2", dtype="float16")
    first = upload_model(container, "smollm2")
    second = upload_model(container, "smollm2")

    first_request, second_request = upload_requests(standin)
    assert first_request.parent_model == ""
    assert second_request.parent_model == first.resource_name
    assert second.resource_name == first.resource_name
    assert (first.version_id, second.version_id) == ("1", "2")
    assert len(standin.models) == 1


def test_other_display_name_is_a_new_model(vertex_settings, standin):
    container = ServingContainer(image_uri=IMAGE, app="smollm2", dtype="float16")
    first = upload_model(container, "smollm2")
    other = upload_model(container, "smollm2-canary")
    assert other.resource_name != first.resource_name
    assert upload_requests(standin)[1].parent_model == ""


@pytest.mark.parametrize("key", ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY", "DB_PASSWORD"])
def test_secret_env_is_refused_before_any_request(vertex_settings, standin, caplog, key):
    code = main(
        ["upload", "--image", IMAGE, "--env", f"{key}=hf_abc", "--project", "test-project", "--api-endpoint", standin.url]
    )
    assert code == 2
    assert standin.requests == []
    assert f"refusing to put {key}" in caplog.text
    assert "Secret Manager" in caplog.text
    assert "hf_abc" not in caplog.text


def test_setting_names_that_merely_contain_token_are_allowed(vertex_settings, standin):
    container = ServingContainer(
        image_uri=IMAGE, app="smollm2", dtype="float16", extra_env={"LLM_MAX_NEW_TOKENS": "64", "TOKENIZERS_PARALLELISM": "false"}
    )
    upload_model(container, "smollm2")
    env = {e.name for e in upload_requests(standin)[0].model.container_spec.env}
    assert {"LLM_MAX_NEW_TOKENS", "TOKENIZERS_PARALLELISM"} <= env


def test_vertex_owned_env_is_refused(vertex_settings, standin, caplog):
    code = main(
        ["upload", "--image", IMAGE, "--env", "AIP_HTTP_PORT=8080", "--project", "test-project", "--api-endpoint", standin.url]
    )
    assert code == 2
    assert standin.requests == []
    assert "set by Vertex itself" in caplog.text
