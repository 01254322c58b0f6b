"""The routes Vertex carries any body on (OpenAI's included): the SDK against the stand-in.

``Endpoint.raw_predict``, ``stream_raw_predict`` and ``invoke`` post to fixed
HTTPS hosts through ``Endpoint.authorized_session``; ``route_to`` mounts a
transport adapter on that session that sends them to the stand-in (the SDK's
code is untouched). Behind the stand-in is the fake container, which echoes.
The same paths with a real TorchServe: tests/e2e/test_vertex_raw_e2e.py.
"""

from __future__ import annotations

import json
import threading

import pytest
import requests
from google.cloud import aiplatform, aiplatform_v1

from tests.vertex_fixtures import (  # noqa: F401 - fixtures
    fake_container,
    offline_google,
    standin,
    vertex_settings,
)
from tests.vertex_standin import DEPLOYED_MODEL_HEADER, SHARED_HOST_REFUSED
from vertex import (
    Deployment,
    ServingContainer,
    VertexConfigError,
    deploy_app,
    predict,
    validate_machine,
)
from vertex.cli import main
from vertex.transport import route_to

APP = "smollm2"
IMAGE = "us-docker.pkg.dev/test-project/llm/torchserve-llm-cpu:1.0"
SHARED_HOST = "us-central1-aiplatform.googleapis.com"
JSON = {"Content-Type": "application/json"}
NATIVE = b'{"instances": ["Hello"], "parameters": {"max_new_tokens": 8, "temperature": 0}}'
CHAT = {"model": APP, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8}
# Vertex's Anthropic body: the API version in the body, the model in Vertex's URL.
MESSAGES = {"anthropic_version": "vertex-2023-10-16", "messages": CHAT["messages"], "max_tokens": 8}
COUNT = {"anthropic_version": "vertex-2023-10-16", "messages": CHAT["messages"]}
RESPONSES = {"model": APP, "input": "Hello there", "max_output_tokens": 8}


@pytest.fixture
def deploy(vertex_settings, standin):
    """Deploys the app through the SDK; returns the endpoint, its session routed to the stand-in."""

    def deploy(dedicated: bool = False, invoke: bool = False) -> aiplatform.Endpoint:
        container = ServingContainer(image_uri=IMAGE, app=APP, dtype="float32", invoke_route_prefix="/*" if invoke else None)
        deployment = Deployment(machine=validate_machine("n1-standard-8"), dedicated_endpoint=dedicated)
        _, endpoint = deploy_app(container, deployment, APP, APP)
        endpoint = aiplatform.Endpoint(endpoint.resource_name)
        route_to(endpoint, standin.url)
        return endpoint

    return deploy


def test_raw_predict_sends_the_body_and_content_type_unchanged(deploy, standin, fake_container):
    endpoint = deploy()
    response = endpoint.raw_predict(body=NATIVE, headers=JSON)

    assert response.status_code == 200, response.text
    assert response.json() == {"predictions": [{"generated_text": "echo: Hello"}]}
    # Unlike :predict, nothing went through protobuf Values: 8 is still 8, the bytes are the client's.
    assert fake_container.raw_received[-1] == ("/predictions/smollm2", "application/json", NATIVE)
    assert response.headers[DEPLOYED_MODEL_HEADER] == endpoint.gca_resource.deployed_models[0].id
    [call] = standin.calls("raw_predict")
    assert call.host == SHARED_HOST
    assert call.path == f"/v1/{endpoint.resource_name}:rawPredict"


def test_raw_predict_keeps_a_non_json_content_type(deploy, fake_container):
    response = deploy().raw_predict(body=b"The sky is", headers={"Content-Type": "text/plain"})
    assert response.status_code == 200
    assert fake_container.raw_received[-1] == ("/predictions/smollm2", "text/plain", b"The sky is")


def test_raw_predict_relays_the_container_error(deploy):
    response = deploy().raw_predict(body=b'{"neither": 1}', headers=JSON)
    assert response.status_code == 400
    assert response.json() == {"error": "the body has neither instances nor messages"}


def test_stream_raw_predict_relays_each_chunk_as_it_arrives(deploy, standin, fake_container):
    endpoint = deploy(dedicated=True)
    fake_container.gate = threading.Event()
    body = json.dumps({"instances": ["Hello", "Bye"], "parameters": {"stream": True}}).encode()
    lines = endpoint.stream_raw_predict(body=body, headers=JSON)

    # The fake container holds the rest of its stream until the gate opens: the
    # first line can only be here if the stand-in passed it on before the end.
    first = next(lines)
    fake_container.gate.set()
    rest = list(lines)

    assert fake_container.gate_opened == [True]
    assert [json.loads(line) for line in [first, *rest]] == [
        {"index": 0, "text": "echo: Hello"},
        {"index": 1, "text": "echo: Bye"},
        {"predictions": [{"generated_text": "echo: Hello"}, {"generated_text": "echo: Bye"}]},
    ]
    [call] = standin.calls("stream_raw_predict")
    assert call.host == endpoint.dedicated_endpoint_dns
    assert call.host.endswith(".us-central1-123456789012.prediction.vertexai.goog")


def test_stream_raw_predict_needs_a_dedicated_endpoint(deploy):
    lines = list(deploy().stream_raw_predict(body=NATIVE, headers=JSON))
    assert "only supported on dedicated endpoints" in json.loads(b"".join(lines))["error"]["message"]


def test_a_dedicated_endpoint_refuses_the_shared_host(deploy, standin):
    endpoint = deploy(dedicated=True)
    url = f"{standin.url}/v1/{endpoint.resource_name}:rawPredict"
    response = requests.post(url, data=NATIVE, headers={**JSON, "Host": SHARED_HOST}, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == SHARED_HOST_REFUSED.format(dns=endpoint.dedicated_endpoint_dns)


def test_predict_on_a_dedicated_endpoint_goes_to_its_dns(deploy, vertex_settings, standin):
    endpoint = deploy(dedicated=True)
    assert predict(APP, ["Hi"], {"max_new_tokens": 4}, settings=vertex_settings) == [{"generated_text": "echo: Hi"}]
    assert standin.calls("predict")[-1].host == endpoint.dedicated_endpoint_dns


def test_upload_with_the_invoke_prefix_has_no_predict_route(deploy, standin):
    deploy(dedicated=True, invoke=True)
    [call] = standin.calls("upload_model")
    spec = aiplatform_v1.UploadModelRequest.from_json(json.dumps(call.body)).model.container_spec
    assert spec.invoke_route_prefix == "/*"
    assert spec.predict_route == ""
    assert spec.health_route == "/health"
    assert standin.calls("create_endpoint")[0].body["dedicatedEndpointEnabled"] is True


def test_raw_predict_carries_an_anthropic_body_unchanged(deploy, fake_container):
    body = json.dumps(MESSAGES).encode()
    response = deploy().raw_predict(body=body, headers=JSON)
    assert response.status_code == 200, response.text
    assert response.json()["content"] == [{"type": "text", "text": "echo: Hello there"}]
    assert fake_container.raw_received[-1] == ("/predictions/smollm2", "application/json", body)


def test_raw_predict_carries_a_count_tokens_body_to_the_predict_route(deploy, fake_container):
    """rawPredict has one container path, the predict route: nothing routes a body by its shape on the way
    (the container reads it as a Messages body; docs/api.md: counting goes through invoke)."""
    body = json.dumps(COUNT).encode()
    deploy().raw_predict(body=body, headers=JSON)
    assert fake_container.raw_received[-1] == ("/predictions/smollm2", "application/json", body)


@pytest.mark.parametrize(
    "path", ["/v1/chat/completions", "/v1/responses", "/v1/messages", "/v1/messages/count_tokens", "/predictions/smollm2"]
)
def test_invoke_passes_the_path_through(deploy, standin, fake_container, path):
    endpoint = deploy(dedicated=True, invoke=True)
    deployed_id = endpoint.gca_resource.deployed_models[0].id
    bodies = {
        "/v1/chat/completions": CHAT,
        "/v1/responses": RESPONSES,
        "/v1/messages": MESSAGES,
        "/v1/messages/count_tokens": COUNT,
    }
    body = json.dumps(bodies[path]).encode() if path in bodies else NATIVE
    response = endpoint.invoke(request_path=path, body=body, headers=JSON, deployed_model_id=deployed_id)

    assert response.status_code == 200, response.text
    assert fake_container.raw_received[-1] == (path, "application/json", body)
    [call] = standin.calls("invoke")
    assert call.path == f"/v1/{endpoint.resource_name}/deployedModels/{deployed_id}/invoke{path}"
    assert call.host == endpoint.dedicated_endpoint_dns


def test_invoke_streams_sse(deploy, fake_container):
    endpoint = deploy(dedicated=True, invoke=True)
    body = json.dumps({**CHAT, "stream": True}).encode()
    lines = [line for line in endpoint.invoke("/v1/chat/completions", body, JSON, stream=True) if line]
    assert lines[-1] == b"data: [DONE]"
    deltas = [json.loads(line[len(b"data: ") :])["choices"][0]["delta"] for line in lines[:-1]]
    assert deltas[0] == {"role": "assistant"}
    assert "".join(d.get("content", "") for d in deltas) == "echo: Hello there"


def test_invoke_needs_the_prefix_on_the_model(deploy):
    response = deploy(dedicated=True).invoke("/v1/chat/completions", json.dumps(CHAT).encode(), JSON)
    assert response.status_code == 400
    assert "without invoke_route_prefix" in response.json()["error"]["message"]


@pytest.mark.parametrize("version", ["v1", "v1beta1"])
def test_openai_compatible_chat_route_reaches_the_predict_route(deploy, standin, fake_container, version):
    endpoint = deploy()
    url = f"{standin.url}/{version}/{endpoint.resource_name}/chat/completions"
    response = requests.post(url, json=CHAT, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "echo: Hello there"
    assert fake_container.raw_received[-1][0] == "/predictions/smollm2"

    streamed = requests.post(url, json={**CHAT, "stream": True}, timeout=30, stream=True)
    assert streamed.headers["Content-Type"] == "text/event-stream"
    assert [line for line in streamed.iter_lines() if line][-1] == b"data: [DONE]"


def test_an_invoke_prefix_needs_a_dedicated_endpoint_before_any_request(vertex_settings, standin):
    container = ServingContainer(image_uri=IMAGE, app=APP, dtype="float32", invoke_route_prefix="/*")
    with pytest.raises(VertexConfigError, match="--dedicated-endpoint"):
        deploy_app(container, Deployment(machine=validate_machine("n1-standard-8")), APP, APP)
    assert standin.requests == []


def test_a_shared_endpoint_is_not_reused_as_dedicated(deploy, standin):
    deploy()
    with pytest.raises(VertexConfigError, match="exists as a shared endpoint"):
        deploy(dedicated=True)
    assert len(standin.calls("create_endpoint")) == 1


def chat_cli(capsys, standin, *argv: str) -> tuple[int, str, str]:
    code = main(
        [
            "chat",
            "--prompt",
            "Hello there",
            "--max-tokens",
            "8",
            "--project",
            "test-project",
            "--api-endpoint",
            standin.url,
            *argv,
        ]
    )
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("dedicated", "invoke", "stream", "route", "container_path"),
    [
        (False, False, False, "raw_predict", "/predictions/smollm2"),
        (True, False, True, "stream_raw_predict", "/predictions/smollm2"),
        (True, True, False, "invoke", "/v1/chat/completions"),
        (True, True, True, "invoke", "/v1/chat/completions"),
    ],
)
def test_chat_cli_prints_the_assistant_text(
    deploy, standin, fake_container, capsys, dedicated, invoke, stream, route, container_path
):
    deploy(dedicated=dedicated, invoke=invoke)
    code, out, err = chat_cli(capsys, standin, *(["--stream"] if stream else []))

    assert code == 0, err
    assert out == "echo: Hello there\n"
    assert standin.calls(route)
    path, _, raw = fake_container.raw_received[-1]
    assert path == container_path
    assert json.loads(raw) == {
        "model": APP,
        "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": 8,
        **({"stream": True} if stream else {}),
    }


def test_chat_cli_reports_a_refused_stream(deploy, standin, capsys, caplog):
    deploy()
    code, out, _ = chat_cli(capsys, standin, "--stream")
    assert code == 1
    assert "only supported on dedicated endpoints" in caplog.text


def test_chat_cli_refuses_bad_messages_before_any_request(offline_google, standin, capsys, caplog):
    code = main(
        [
            "chat",
            "--messages-json",
            '[{"role": "robot", "content": "hi"}]',
            "--project",
            "test-project",
            "--api-endpoint",
            standin.url,
        ]
    )
    assert code == 2
    assert "messages[0] needs a role" in caplog.text
    assert standin.requests == []
