"""The CLI the Makefile calls: deploy, predict, undeploy, env and flag precedence."""

from __future__ import annotations

import json

from google.cloud import aiplatform_v1

from tests.vertex_fixtures import (  # noqa: F401 - fixtures
    fake_container,
    offline_google,
    standin,
    vertex_settings,
)
from vertex.cli import main

IMAGE = "us-docker.pkg.dev/test-project/llm/torchserve-llm-gpu:1.0"


def run_cli(capsys, *argv: str) -> dict:
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_deploy_predict_undeploy_with_project_and_region_from_env(offline_google, standin, fake_container, monkeypatch, capsys):
    monkeypatch.setenv("GCP_PROJECT", "env-project")
    monkeypatch.setenv("GCP_REGION", "europe-west4")
    monkeypatch.setenv("VERTEX_API_ENDPOINT", standin.url)

    deployed = run_cli(capsys, "deploy", "--image", IMAGE, "--machine", "l4", "--max-replicas", "2", "--duty-cycle-target", "70")
    assert deployed["endpoint"].startswith("projects/env-project/locations/europe-west4/")

    answer = run_cli(capsys, "predict", "--instance", "Hello", "--parameters", '{"max_new_tokens": 8}')
    assert answer == {"predictions": [{"generated_text": "echo: Hello"}]}
    assert fake_container.received[-1]["parameters"] == {"max_new_tokens": 8.0}

    removed = run_cli(capsys, "undeploy", "--delete-model")
    assert removed["endpoints"] == [deployed["endpoint"]]
    assert removed["models"] == [deployed["model"]]
    assert standin.endpoints == {} and standin.models == {}


def test_flags_override_env(offline_google, standin, monkeypatch, capsys):
    monkeypatch.setenv("GCP_PROJECT", "env-project")
    monkeypatch.setenv("GCP_REGION", "europe-west4")
    uploaded = run_cli(
        capsys,
        "upload",
        "--image",
        IMAGE,
        "--machine",
        "t4",
        "--project",
        "flag-project",
        "--region",
        "us-east4",
        "--api-endpoint",
        standin.url,
    )
    assert uploaded["model"].startswith("projects/flag-project/locations/us-east4/models/")
    body = standin.calls("upload_model")[0].body
    env = aiplatform_v1.UploadModelRequest.from_json(json.dumps(body)).model.container_spec.env
    assert {e.name: e.value for e in env}["LLM_DTYPE"] == "float16"


def test_missing_project_is_a_config_error(offline_google, standin, caplog):
    code = main(["predict", "--instance", "Hi", "--api-endpoint", standin.url])
    assert code == 2
    assert "GCP_PROJECT" in caplog.text
    assert standin.requests == []


def test_predict_on_a_missing_endpoint_says_deploy_first(vertex_settings, standin, caplog):
    code = main(
        ["predict", "--instance", "Hi", "--endpoint", "nowhere", "--project", "test-project", "--api-endpoint", standin.url]
    )
    assert code == 2
    assert "make deploy" in caplog.text
