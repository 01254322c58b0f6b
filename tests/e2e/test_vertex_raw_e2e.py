"""Vertex's raw routes end to end: SDK raw_predict / stream_raw_predict / invoke -> stand-in -> the front -> real TorchServe.

The SDK posts these to fixed HTTPS hosts through ``Endpoint.authorized_session``;
``route_to`` mounts a transport adapter on that session that sends them to the
stand-in, which forwards the body unchanged to the container (the front in
front of a real TorchServe serving SmolLM2, ``container_url``).

Every test runs on four wires (``Wire``: what goes in, which container path
invoke targets, how the text is read back): the native API, the OpenAI
chat API (a bare chat body on the predict route, ``/v1/chat/completions`` by
invoke, SSE deltas when streamed), OpenAI's Responses API (``{"model", "input"}``
on the predict route, ``/v1/responses`` by invoke, ``response.output_text.delta``
events when streamed) and Anthropic's Messages API (Vertex's
Anthropic body, with ``anthropic_version``, on the predict route;
``/v1/messages`` by invoke; ``text_delta`` events when streamed). The reference is the same request through
plain ``:predict``, greedy. Token counts go through invoke ``/v1/messages/count_tokens``;
rawPredict reads a count's body as a Messages body, as docs/api.md says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

import pytest
from google.cloud import aiplatform

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
    Settings,
    connect,
    deploy_app,
    predict,
    resolve_settings,
    teardown,
    validate_machine,
)
from vertex.transport import route_to

APP = "smollm2"
IMAGE = "us-docker.pkg.dev/test-project/llm/torchserve-llm-cpu:e2e"
PROMPT = "The capital of France is"
GREEDY = {"max_new_tokens": 12, "temperature": 0}
JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Wire:
    """One request protocol, everything the tests need to know of it.

    ``instance`` is what plain ``:predict`` gets for the same request (the
    reference text); ``body`` the raw body; ``path`` the container path invoke
    targets; ``text`` and ``streamed`` read the answer back (``streamed``: the
    pieces, and the final text); ``bad`` a body with a bad field, and that field.
    """

    instance: Any
    path: str
    body: Callable[[bool], dict[str, Any]]
    text: Callable[[dict[str, Any]], str]
    streamed: Callable[[list[bytes]], tuple[list[str], str]]
    bad: tuple[dict[str, Any], str]


def _native_streamed(lines: list[bytes]) -> tuple[list[str], str]:
    """JSON lines ``{"index", "text"}``, then the final body."""
    *chunks, final = [json.loads(line) for line in lines if line]
    return [chunk["text"] for chunk in chunks], final["predictions"][0]["generated_text"]


NATIVE = Wire(
    instance=PROMPT,
    path=f"/predictions/{APP}",
    body=lambda stream: {"instances": [PROMPT], "parameters": {**GREEDY, **({"stream": True} if stream else {})}},
    text=lambda answer: answer["predictions"][0]["generated_text"],
    streamed=_native_streamed,
    bad=({"instances": [PROMPT], "parameters": {**GREEDY, "max_new_tokens": -1}}, "max_new_tokens"),
)
CHAT = [{"role": "user", "content": PROMPT}]


def _openai_streamed(lines: list[bytes]) -> tuple[list[str], str]:
    """SSE ``data:`` lines of chat.completion.chunk (the first one with the role), then ``[DONE]``."""
    lines = [line for line in lines if line.strip()]
    assert lines[-1] == b"data: [DONE]", lines[-3:]
    events = [json.loads(line.removeprefix(b"data: ")) for line in lines[:-1]]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(event["object"] == "chat.completion.chunk" for event in events)
    pieces = [event["choices"][0]["delta"].get("content") or "" for event in events if event["choices"]]
    return [piece for piece in pieces if piece], "".join(pieces)


OPENAI = Wire(
    instance={"messages": CHAT},
    path="/v1/chat/completions",
    body=lambda stream: {
        "model": APP,
        "messages": CHAT,
        "max_tokens": GREEDY["max_new_tokens"],
        "temperature": 0,
        **({"stream": True} if stream else {}),
    },
    text=lambda answer: answer["choices"][0]["message"]["content"],
    streamed=_openai_streamed,
    bad=({"model": APP, "messages": CHAT, "max_tokens": -1}, "max_tokens"),
)


def _responses_streamed(lines: list[bytes]) -> tuple[list[str], str]:
    """SSE ``event:``/``data:`` lines of the Responses API's typed events, ``response.completed`` last
    (``response.incomplete`` when ``max_output_tokens`` cut the text)."""
    events = [json.loads(line.removeprefix(b"data: ")) for line in lines if line.startswith(b"data: ")]
    last = events[-1]["type"]
    assert events[0]["type"] == "response.created" and last in ("response.completed", "response.incomplete"), events[-3:]
    pieces = [event["delta"] for event in events if event["type"] == "response.output_text.delta"]
    return pieces, events[-1]["response"]["output_text"]


RESPONSES = Wire(
    instance={"messages": CHAT},
    path="/v1/responses",
    body=lambda stream: {
        "model": APP,
        "input": PROMPT,
        "max_output_tokens": GREEDY["max_new_tokens"],
        "temperature": 0,
        **({"stream": True} if stream else {}),
    },
    text=lambda answer: answer["output_text"],
    streamed=_responses_streamed,
    bad=({"model": APP, "input": PROMPT, "max_output_tokens": -1}, "max_output_tokens"),
)


def _anthropic_streamed(lines: list[bytes]) -> tuple[list[str], str]:
    """SSE ``event:``/``data:`` lines of Anthropic's stream, ``message_start`` first and ``message_stop`` last."""
    events = [json.loads(line.removeprefix(b"data: ")) for line in lines if line.startswith(b"data: ")]
    assert events[0]["type"] == "message_start" and events[-1]["type"] == "message_stop", events[-3:]
    pieces = [event["delta"]["text"] for event in events if event["type"] == "content_block_delta"]
    return pieces, "".join(pieces)


# Vertex's Anthropic bodies carry the API version in the body and no model (it is in Vertex's URL),
# which is how the predict route tells them from OpenAI's.
VERTEX_ANTHROPIC = "vertex-2023-10-16"
ANTHROPIC = Wire(
    instance={"messages": CHAT},
    path="/v1/messages",
    body=lambda stream: {
        "anthropic_version": VERTEX_ANTHROPIC,
        "messages": CHAT,
        "max_tokens": GREEDY["max_new_tokens"],
        "temperature": 0,
        **({"stream": True} if stream else {}),
    },
    text=lambda answer: answer["content"][0]["text"],
    streamed=_anthropic_streamed,
    bad=({"anthropic_version": VERTEX_ANTHROPIC, "messages": CHAT, "max_tokens": -1}, "max_tokens"),
)


@pytest.fixture(params=[NATIVE, OPENAI, RESPONSES, ANTHROPIC], ids=["native", "openai", "responses", "anthropic"])
def wire(request) -> Wire:
    return request.param


def encoded(wire: Wire, stream: bool) -> bytes:
    return json.dumps(wire.body(stream)).encode()


@pytest.fixture
def standin(offline_google, container_url: str) -> Iterator[StandIn]:
    server = StandIn(container_url=container_url, health_timeout_s=120).start()
    yield server
    server.stop()


@pytest.fixture
def settings(standin: StandIn) -> Iterator[Settings]:
    """The SDK pointed at this test's stand-in; what the test deployed is torn down after it."""
    settings = resolve_settings(PROJECT, REGION, standin.url, environ={})
    connect(settings)
    yield settings
    for name in ("raw", "invoke"):
        teardown(name, delete_models=True)


def deployed(standin: StandIn, container_url: str, name: str, invoke: bool) -> aiplatform.Endpoint:
    """The app on a dedicated endpoint (streaming and invoke need one), its session routed to the stand-in."""
    container = ServingContainer(
        image_uri=IMAGE, app=APP, dtype="float32", port=urlsplit(container_url).port, invoke_route_prefix="/*" if invoke else None
    )
    deployment = Deployment(machine=validate_machine("n1-standard-8"), dedicated_endpoint=True)
    _, endpoint = deploy_app(container, deployment, name, name)
    endpoint = aiplatform.Endpoint(endpoint.resource_name)
    route_to(endpoint, standin.url)
    return endpoint


@pytest.fixture
def raw_endpoint(standin: StandIn, settings: Settings, container_url: str) -> aiplatform.Endpoint:
    return deployed(standin, container_url, "raw", invoke=False)


@pytest.fixture
def invoke_endpoint(standin: StandIn, settings: Settings, container_url: str) -> aiplatform.Endpoint:
    return deployed(standin, container_url, "invoke", invoke=True)


@pytest.fixture
def greedy_text(settings: Settings, raw_endpoint: aiplatform.Endpoint, wire: Wire) -> str:
    """The greedy answer through plain :predict, the reference every raw route must match."""
    [prediction] = predict("raw", [wire.instance], GREEDY, settings=settings)
    assert prediction["generated_text"].strip()
    return prediction["generated_text"]


def test_raw_predict_gives_the_predict_text(raw_endpoint, greedy_text, standin, wire):
    response = raw_endpoint.raw_predict(body=encoded(wire, stream=False), headers=JSON)

    assert response.status_code == 200, response.text
    assert wire.text(response.json()) == greedy_text
    assert standin.calls("raw_predict")[0].raw == encoded(wire, stream=False)


def test_stream_raw_predict_streams_the_same_text(raw_endpoint, greedy_text, wire):
    lines = list(raw_endpoint.stream_raw_predict(body=encoded(wire, stream=True), headers=JSON))

    pieces, final = wire.streamed(lines)
    assert len(pieces) > 1
    assert "".join(pieces) == final == greedy_text


def test_invoke_reaches_the_container_path(invoke_endpoint, greedy_text, standin, wire):
    deployed_id = invoke_endpoint.gca_resource.deployed_models[0].id
    response = invoke_endpoint.invoke(
        request_path=wire.path, body=encoded(wire, stream=False), headers=JSON, deployed_model_id=deployed_id
    )

    assert response.status_code == 200, response.text
    assert wire.text(response.json()) == greedy_text
    assert standin.calls("invoke")[0].path.endswith(f"/deployedModels/{deployed_id}/invoke{wire.path}")


def test_invoke_streams_the_same_text(invoke_endpoint, greedy_text, wire):
    lines = list(invoke_endpoint.invoke(request_path=wire.path, body=encoded(wire, stream=True), headers=JSON, stream=True))

    pieces, final = wire.streamed(lines)
    assert len(pieces) > 1
    assert "".join(pieces) == final == greedy_text


def test_raw_predict_passes_a_client_error_through(raw_endpoint, wire):
    body, bad_field = wire.bad
    response = raw_endpoint.raw_predict(body=json.dumps(body).encode(), headers=JSON)

    assert 400 <= response.status_code < 500
    assert bad_field in response.text


COUNT = {"anthropic_version": VERTEX_ANTHROPIC, "messages": CHAT}


def test_invoke_counts_tokens_as_a_request_is_prompted(invoke_endpoint):
    deployed_id = invoke_endpoint.gca_resource.deployed_models[0].id

    def invoke(path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = invoke_endpoint.invoke(path, json.dumps(body).encode(), JSON, deployed_model_id=deployed_id)
        assert response.status_code == 200, response.text
        return response.json()

    counted = invoke("/v1/messages/count_tokens", COUNT)
    assert counted["input_tokens"] == invoke("/v1/messages", ANTHROPIC.body(False))["usage"]["input_tokens"]


def test_raw_predict_reads_a_count_tokens_body_as_a_messages_body(raw_endpoint):
    """rawPredict reaches the predict route only, where an Anthropic body is a Messages request: a count's
    body lacks its max_tokens. Counting goes through invoke (docs/api.md, docs/vertex.md)."""
    response = raw_endpoint.raw_predict(body=json.dumps(COUNT).encode(), headers=JSON)

    assert response.status_code == 400
    assert response.json()["type"] == "error" and response.json()["error"]["message"].startswith("max_tokens")
