"""Deploy, predict and teardown through the real SDK against the stand-in."""

from __future__ import annotations

import json

import pytest
from google.cloud import aiplatform_v1

from tests.vertex_fixtures import (  # noqa: F401 - fixtures
    fake_container,
    offline_google,
    standin,
    vertex_settings,
)
from tests.vertex_standin import NEVER_READY, StandIn
from vertex import (
    DeployError,
    Deployment,
    ServingContainer,
    deploy_app,
    predict,
    resolve_machine,
    teardown,
)
from vertex.cli import main

IMAGE = "us-docker.pkg.dev/test-project/llm/torchserve-llm-gpu:1.0"
Accel = aiplatform_v1.AcceleratorType
DUTY_CYCLE = "aiplatform.googleapis.com/prediction/online/accelerator/duty_cycle"


def deploy_requests(standin: StandIn) -> list:
    return [aiplatform_v1.DeployModelRequest.from_json(json.dumps(call.body)) for call in standin.calls("deploy_model")]


def model_env(standin: StandIn, index: int = 0) -> dict:
    body = standin.calls("upload_model")[index].body
    request = aiplatform_v1.UploadModelRequest.from_json(json.dumps(body))
    return {e.name: e.value for e in request.model.container_spec.env}


def cli(standin: StandIn, *args: str) -> list:
    return [*args, "--project", "test-project", "--region", "us-central1", "--api-endpoint", standin.url]


@pytest.mark.parametrize(
    ("preset", "machine_type", "accelerator", "dtype"),
    [
        ("t4", "n1-standard-8", Accel.NVIDIA_TESLA_T4, "float16"),
        ("l4", "g2-standard-8", Accel.NVIDIA_L4, "bfloat16"),
        ("a100", "a2-highgpu-1g", Accel.NVIDIA_TESLA_A100, "bfloat16"),
        ("h100", "a3-highgpu-1g", Accel.NVIDIA_H100_80GB, "bfloat16"),
    ],
)
def test_preset_sets_machine_accelerator_and_dtype(vertex_settings, standin, capsys, preset, machine_type, accelerator, dtype):
    code = main(cli(standin, "deploy", "--image", IMAGE, "--machine", preset))
    assert code == 0, capsys.readouterr().err

    [request] = deploy_requests(standin)
    resources = request.deployed_model.dedicated_resources
    assert resources.machine_spec.machine_type == machine_type
    assert resources.machine_spec.accelerator_type == accelerator
    assert resources.machine_spec.accelerator_count == 1
    assert (resources.min_replica_count, resources.max_replica_count) == (1, 1)
    assert request.traffic_split == {"0": 100}
    assert model_env(standin)["LLM_DTYPE"] == dtype
    assert json.loads(capsys.readouterr().out)["endpoint"] == next(iter(standin.endpoints))


def test_explicit_machine_replicas_autoscaling_spot_and_account(vertex_settings, standin):
    container = ServingContainer(image_uri=IMAGE, app="smollm2", dtype="bfloat16")
    deployment = Deployment(
        machine=resolve_machine(machine_type="g2-standard-24", accelerator_type="NVIDIA_L4"),
        min_replicas=1,
        max_replicas=3,
        duty_cycle_target=60,
        spot=True,
        service_account="llm-serving@test-project.iam.gserviceaccount.com",
    )
    deploy_app(container, deployment, "smollm2", "smollm2")

    [request] = deploy_requests(standin)
    deployed = request.deployed_model
    resources = deployed.dedicated_resources
    assert resources.machine_spec.machine_type == "g2-standard-24"
    assert resources.machine_spec.accelerator_type == Accel.NVIDIA_L4
    assert resources.machine_spec.accelerator_count == 2
    assert (resources.min_replica_count, resources.max_replica_count) == (1, 3)
    assert [(m.metric_name, m.target) for m in resources.autoscaling_metric_specs] == [(DUTY_CYCLE, 60)]
    assert resources.spot is True
    assert deployed.service_account == "llm-serving@test-project.iam.gserviceaccount.com"


@pytest.mark.parametrize(
    ("machine_flags", "hint"),
    [
        (["--machine-type", "n1-standard-8", "--accelerator-type", "NVIDIA_L4"], "NVIDIA_TESLA_T4"),
        (["--machine-type", "g2-standard-8", "--accelerator-type", "NVIDIA_TESLA_T4"], "NVIDIA_L4"),
        (["--machine-type", "a2-highgpu-1g", "--accelerator-type", "NVIDIA_A100_80GB"], "NVIDIA_TESLA_A100"),
        (["--machine-type", "a2-ultragpu-1g", "--accelerator-type", "NVIDIA_TESLA_A100"], "NVIDIA_A100_80GB"),
        (["--machine-type", "a3-highgpu-1g", "--accelerator-type", "NVIDIA_TESLA_T4"], "NVIDIA_H100_80GB"),
        (
            ["--machine-type", "a2-highgpu-2g", "--accelerator-type", "NVIDIA_TESLA_A100", "--accelerator-count", "4"],
            "takes 1, 2 x NVIDIA_TESLA_A100, not 4",
        ),
        (["--machine-type", "g2-standard-8"], "--accelerator-type NVIDIA_L4"),
        (["--machine", "t4", "--machine-type", "n1-standard-8"], "not both"),
    ],
)
def test_bad_machine_is_rejected_before_any_request(vertex_settings, standin, caplog, machine_flags, hint):
    code = main(cli(standin, "deploy", "--image", IMAGE, *machine_flags))
    assert code == 2
    assert standin.requests == []
    assert hint in caplog.text


def test_bfloat16_on_t4_is_rejected_before_any_request(vertex_settings, standin, caplog):
    code = main(cli(standin, "deploy", "--image", IMAGE, "--machine", "t4", "--dtype", "bfloat16"))
    assert code == 2
    assert standin.requests == []
    assert "no bfloat16 support" in caplog.text


def test_unhealthy_container_fails_the_deploy_clearly(vertex_settings, standin, fake_container):
    fake_container.healthy = False
    container = ServingContainer(image_uri=IMAGE, app="smollm2", dtype="float16")
    with pytest.raises(DeployError) as failure:
        deploy_app(container, Deployment(machine=resolve_machine("t4")), "smollm2", "smollm2")

    message = str(failure.value)
    assert NEVER_READY in message
    assert "/health" in message and "port 7080" in message and "1800 s" in message
    assert "n1-standard-8 + 1 x NVIDIA_TESLA_T4" in message
    assert "make undeploy" in message
    [endpoint] = standin.endpoints.values()
    assert endpoint["deployedModels"] == []


def test_unhealthy_deploy_exits_nonzero_from_the_cli(vertex_settings, standin, fake_container, caplog):
    fake_container.healthy = False
    code = main(cli(standin, "deploy", "--image", IMAGE, "--machine", "l4"))
    assert code == 1
    assert NEVER_READY in caplog.text


def test_redeploy_reuses_the_endpoint_and_versions_the_model(vertex_settings, standin):
    container = ServingContainer(image_uri=IMAGE, app="smollm2", dtype="bfloat16")
    deployment = Deployment(machine=resolve_machine("l4"))
    model_1, endpoint_1 = deploy_app(container, deployment, "smollm2", "smollm2")
    model_2, endpoint_2 = deploy_app(container, deployment, "smollm2", "smollm2")

    assert endpoint_1.resource_name == endpoint_2.resource_name
    assert len(standin.calls("create_endpoint")) == 1
    assert model_2.resource_name == model_1.resource_name
    assert model_2.version_id == "2"
    assert [r.deployed_model.model for r in deploy_requests(standin)] == [
        f"{model_1.resource_name}@1",
        f"{model_1.resource_name}@2",
    ]


def test_predict_sends_instances_and_parameters(vertex_settings, standin, fake_container):
    container = ServingContainer(image_uri=IMAGE, app="smollm2", dtype="float16")
    deploy_app(container, Deployment(machine=resolve_machine("t4")), "smollm2", "smollm2")

    predictions = predict("smollm2", ["How to prepare a spanish omelette:", "Hi"], {"max_new_tokens": 16, "temperature": 0.0})

    assert [p["generated_text"] for p in predictions] == ["echo: How to prepare a spanish omelette:", "echo: Hi"]
    [forwarded] = fake_container.received
    assert forwarded["instances"] == ["How to prepare a spanish omelette:", "Hi"]
    # Vertex carries numbers as protobuf Values: the container sees 16.0, not 16.
    assert forwarded["parameters"] == {"max_new_tokens": 16.0, "temperature": 0.0}


def test_teardown_undeploys_deletes_endpoint_and_optionally_the_model(vertex_settings, standin):
    container = ServingContainer(image_uri=IMAGE, app="smollm2", dtype="float16")
    model, endpoint = deploy_app(container, Deployment(machine=resolve_machine("t4")), "smollm2", "smollm2")

    report = teardown("smollm2", delete_models=True)

    assert report.endpoints == [endpoint.resource_name]
    assert report.models == [model.resource_name]
    assert len(standin.calls("undeploy_model")) == 1
    assert standin.endpoints == {} and standin.models == {}
    assert teardown("smollm2").endpoints == []


def test_teardown_keeps_the_model_by_default(vertex_settings, standin):
    container = ServingContainer(image_uri=IMAGE, app="smollm2", dtype="float16")
    model, _ = deploy_app(container, Deployment(machine=resolve_machine("t4")), "smollm2", "smollm2")
    teardown("smollm2")
    assert standin.endpoints == {}
    assert list(standin.models) == [model.resource_name]
    assert standin.calls("delete_model") == []
