"""Anthropic's Messages API with the official `anthropic` SDK, against the product's own tree.

The tree (`keyed_server`) serves SmolLM2 as `smollm2-dynamic` and `smollm2-continuous` in
float32, behind the front's API key, which the SDK sends as `x-api-key`; the SDK's `model`
picks the batching path, so every check runs on both. Text is asserted only greedy. The API
key's own checks, on every route shape, are at the end.
"""

from __future__ import annotations

import http.client
import json
import urllib.request
from typing import Any

import anthropic
import jsonschema
import openai
import pytest
from transformers import AutoTokenizer

from tests.integration.conftest import API_KEY, KEYED_MODELS
from tests.support.torchserve import TorchServe

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
SYSTEM = "You answer in one short sentence."
GREEDY = {"temperature": 0}
EVENTS = ["message_start", "content_block_start", "ping"]
CLOSING = ["content_block_stop", "message_delta", "message_stop"]


@pytest.fixture(scope="module")
def client(keyed_server: TorchServe) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=keyed_server.url, api_key=API_KEY, max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(params=KEYED_MODELS)
def model(request) -> str:
    return request.param


def greedy(client: anthropic.Anthropic, model: str, **extra: Any) -> anthropic.types.Message:
    """Temperature 0 (the SDK no longer has the argument, the wire still has the field), else the app's sampling."""
    arguments = {"model": model, "max_tokens": 16, "system": SYSTEM, "messages": QUESTION, "extra_body": GREEDY, **extra}
    return client.messages.create(**arguments)


def test_create(client, model):
    reply = greedy(client, model)
    assert reply.type == "message" and reply.role == "assistant" and reply.model == model
    assert reply.id.startswith("msg_")
    [block] = reply.content
    assert block.type == "text" and "Paris" in block.text
    assert reply.stop_reason in ("end_turn", "max_tokens") and reply.stop_sequence is None
    assert reply.usage.output_tokens > 0


def test_system_as_blocks_is_the_system_string(client, model):
    blocks = [{"type": "text", "text": SYSTEM}]
    assert greedy(client, model, system=blocks).content[0].text == greedy(client, model).content[0].text


def test_a_stream_concatenates_to_the_greedy_text(client, model):
    whole = greedy(client, model)
    arguments = {"model": model, "max_tokens": 16, "system": SYSTEM, "messages": QUESTION, "extra_body": GREEDY}
    with client.messages.stream(**arguments) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == whole.content[0].text == final.content[0].text
    assert (final.stop_reason, final.usage.output_tokens) == (whole.stop_reason, whole.usage.output_tokens)
    assert final.usage.input_tokens == whole.usage.input_tokens and final.id.startswith("msg_")


def test_the_stream_is_anthropics_event_sequence(keyed_server, model):
    """What the SDK hides: the content type, `event:` lines, and the order of the events."""
    connection = http.client.HTTPConnection("127.0.0.1", keyed_server.port, timeout=600)
    body = {"model": model, "max_tokens": 4, "temperature": 0, "messages": QUESTION, "stream": True}
    headers = {"Content-Type": "application/json", "x-api-key": API_KEY, "anthropic-version": "2023-06-01"}
    try:
        connection.request("POST", "/v1/messages", body=json.dumps(body), headers=headers)
        response = connection.getresponse()
        text = response.read().decode()
    finally:
        connection.close()
    assert response.status == 200 and response.getheader("content-type") == "text/event-stream"
    events = [event.split("\n") for event in text.split("\n\n") if event]
    names = [lines[0].removeprefix("event: ") for lines in events]
    data = [json.loads(lines[1].removeprefix("data: ")) for lines in events]
    deltas = names.count("content_block_delta")
    assert deltas >= 1 and names == EVENTS + ["content_block_delta"] * deltas + CLOSING
    assert [d["type"] for d in data] == names
    assert data[-2]["delta"]["stop_reason"] == "max_tokens" and data[-2]["usage"]["output_tokens"] == 4


def test_stop_sequences(client, model):
    whole = greedy(client, model).content[0].text
    assert "Paris" in whole
    reply = greedy(client, model, stop_sequences=["Paris", "nowhere"])
    assert reply.content[0].text == whole[: whole.index("Paris")]
    assert (reply.stop_reason, reply.stop_sequence) == ("stop_sequence", "Paris")
    with client.messages.stream(
        model=model, max_tokens=16, system=SYSTEM, messages=QUESTION, extra_body=GREEDY, stop_sequences=["Paris"]
    ) as stream:
        assert "".join(stream.text_stream) == reply.content[0].text
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "Paris")


def test_max_tokens_is_the_stop_reason_at_the_limit(client, model):
    reply = greedy(client, model, max_tokens=3)
    assert (reply.stop_reason, reply.usage.output_tokens) == ("max_tokens", 3)


def test_count_tokens_is_the_prompt_the_model_gets(client, model, tokenizer):
    counted = client.messages.count_tokens(model=model, system=SYSTEM, messages=QUESTION)
    conversation = [{"role": "system", "content": SYSTEM}, *QUESTION]
    ids = tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert counted.input_tokens == len(ids["input_ids"]) == greedy(client, model).usage.input_tokens


def test_a_last_assistant_message_is_continued(client, model):
    """Anthropic's prefill: the answer goes on from the assistant's words, in the same turn."""
    messages = [*QUESTION, {"role": "assistant", "content": "The capital of France is"}]
    reply = client.messages.create(model=model, max_tokens=4, messages=messages, extra_body=GREEDY)
    assert "Paris" in reply.content[0].text


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"extra_body": {"temperature": 1.5}}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"extra_body": {"colour": "red"}}, "colour"),
    ],
)
def test_bad_input_is_the_sdks_bad_request_error_naming_the_field(client, model, extra, field):
    arguments = {"model": model, "max_tokens": 8, "messages": QUESTION, **extra}
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(**arguments)
    assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == "invalid_request_error"
    assert field in caught.value.body["error"]["message"]


# Tools: SmolLM2-135M's template knows none, so these run the fallback format (docs/tools.md).
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}}, "required": ["city"]}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 24}}, "required": ["zone"]}
TOOLS = [
    {"name": "get_weather", "description": "The current weather in a city", "input_schema": WEATHER},
    {"name": "get_time", "description": "The time in a timezone", "input_schema": TIME},
]
SCHEMAS = {tool["name"]: tool["input_schema"] for tool in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
FORCED = {"type": "tool", "name": "get_weather"}


def use(client: anthropic.Anthropic, model: str, **extra: Any) -> anthropic.types.Message:
    arguments = {"model": model, "max_tokens": 60, "messages": ASK, "tools": TOOLS, "extra_body": GREEDY, **extra}
    return client.messages.create(**arguments)


def test_a_forced_tool_is_called_with_input_valid_against_its_schema(client, model):
    reply = use(client, model, tool_choice=FORCED)
    [block] = reply.content
    assert block.type == "tool_use" and block.name == "get_weather" and block.id.startswith("toolu_")
    jsonschema.validate(block.input, WEATHER)
    assert reply.stop_reason == "tool_use" and reply.usage.output_tokens <= 60


def test_any_calls_one_of_the_tools_with_valid_input(client, model):
    reply = use(client, model, tool_choice={"type": "any", "disable_parallel_tool_use": True})
    [block] = reply.content
    assert block.type == "tool_use" and reply.stop_reason == "tool_use"
    jsonschema.validate(block.input, SCHEMAS[block.name])


def test_none_answers_in_text(client, model):
    reply = use(client, model, tool_choice={"type": "none"}, max_tokens=12)
    assert [block.type for block in reply.content] == ["text"] and reply.stop_reason in ("end_turn", "max_tokens")


def test_a_tool_result_round_trip_ends_in_text(client, model):
    first = use(client, model, tool_choice=FORCED)
    [call] = first.content
    result = {"type": "tool_result", "tool_use_id": call.id, "content": json.dumps({"temperature": 21, "sky": "clear"})}
    messages = [*ASK, {"role": "assistant", "content": first.content}, {"role": "user", "content": [result]}]
    final = use(client, model, messages=messages, tool_choice={"type": "none"}, max_tokens=24)
    [text] = final.content
    assert text.type == "text" and text.text and final.stop_reason in ("end_turn", "max_tokens")
    none = {"tools": TOOLS, "tool_choice": {"type": "none"}}  # the tools unshown, the history kept
    counted = client.messages.count_tokens(model=model, messages=messages, **none)
    assert counted.input_tokens == final.usage.input_tokens
    assert counted.input_tokens > client.messages.count_tokens(model=model, messages=ASK, **none).input_tokens


def test_a_streamed_call_gives_the_whole_answers_input(client, model):
    whole = use(client, model, tool_choice=FORCED)
    arguments = {"model": model, "max_tokens": 60, "messages": ASK, "tools": TOOLS, "extra_body": GREEDY}
    with client.messages.stream(**arguments, tool_choice=FORCED) as stream:
        events = list(stream)
        final = stream.get_final_message()
    partial = [event.partial_json for event in events if event.type == "input_json"]
    assert len(partial) > 1, "the input arrives in pieces"
    [block] = final.content
    assert (block.type, block.name, block.input) == ("tool_use", "get_weather", whole.content[0].input)
    assert json.loads("".join(partial)) == block.input and block.id.startswith("toolu_")
    assert (final.stop_reason, final.usage.output_tokens) == ("tool_use", whole.usage.output_tokens)


def test_count_tokens_counts_the_tools(client, model):
    bare = client.messages.count_tokens(model=model, messages=ASK)
    with_tools = client.messages.count_tokens(model=model, messages=ASK, tools=TOOLS)
    assert with_tools.input_tokens > bare.input_tokens


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"tool_choice": {"type": "tool", "name": "launch_rocket"}}, "tool_choice"),
        ({"tools": [{"name": "f", "input_schema": {"type": "string"}}]}, "tools[0].input_schema"),
        (
            {"tools": [{"name": "f", "input_schema": {"type": "object", "properties": {"a": {"not": {}}}}}]},
            "tools[0].input_schema",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "1"}]}]},
            "messages[0].content[0].tool_use_id",
        ),
    ],
)
def test_hostile_tool_input_is_a_bad_request_in_anthropics_shape(client, model, extra, field):
    with pytest.raises(anthropic.BadRequestError) as caught:
        use(client, model, **extra)
    body = caught.value.body
    assert set(body) == {"type", "error"} and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith(field)


def test_a_limit_is_an_invalid_request_with_its_status(client, model):
    with pytest.raises(anthropic.UnprocessableEntityError) as caught:
        client.messages.create(model=model, max_tokens=100_000, messages=QUESTION)
    assert caught.value.body["error"]["type"] == "invalid_request_error" and "max_tokens" in caught.value.message


def test_an_unknown_model_is_not_found(client):
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="claude-opus-4", max_tokens=8, messages=QUESTION)
    assert caught.value.body["error"]["type"] == "not_found_error" and "claude-opus-4" in caught.value.message


def raw(
    server: TorchServe,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    port: int | None = None,
) -> tuple[int, dict[str, str], Any]:
    connection = http.client.HTTPConnection("127.0.0.1", port or server.port, timeout=120)
    try:
        try:
            connection.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the front answered from the declared length and closed before the body was all sent
        response = connection.getresponse()
        text = response.read()
    finally:
        connection.close()
    try:
        decoded = json.loads(text)
    except ValueError:
        decoded = text.decode(errors="replace")
    return response.status, dict(response.getheaders()), decoded


KEY = {"x-api-key": API_KEY}


def test_the_fronts_own_refusals_are_in_anthropics_shape(keyed_server):
    big = b'{"model": "smollm2-dynamic", "max_tokens": 4, "system": "' + b"a" * (1024 * 1024) + b'"}'
    status, _, body = raw(keyed_server, "POST", "/v1/messages", big, KEY)
    assert status == 413 and body["type"] == "error" and body["error"]["type"] == "request_too_large"
    status, _, body = raw(keyed_server, "GET", "/v1/messages", None, KEY)
    assert status == 405 and body["error"]["type"] == "invalid_request_error"
    status, _, body = raw(keyed_server, "POST", "/v1/messages/count_tokens", b'{"model": "nope", "messages": []}', KEY)
    assert status == 404 and body["error"]["type"] == "not_found_error"


# The front's API key (LLM_API_KEY), on every kind of route


def test_without_the_key_the_anthropic_sdk_gets_its_authentication_error(keyed_server):
    wrong = anthropic.Anthropic(base_url=keyed_server.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        wrong.messages.create(model=KEYED_MODELS[0], max_tokens=4, messages=QUESTION)
    body = caught.value.body
    assert set(body) == {"type", "error"} and body["error"]["type"] == "authentication_error"
    assert "API key" in body["error"]["message"]
    with pytest.raises(anthropic.AuthenticationError):
        wrong.messages.count_tokens(model=KEYED_MODELS[0], messages=QUESTION)


def test_without_the_key_the_openai_sdk_gets_its_authentication_error(keyed_server):
    wrong = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.chat.completions.create(model=KEYED_MODELS[0], max_tokens=4, messages=QUESTION)
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    right = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key=API_KEY, max_retries=0)
    assert sorted(m.id for m in right.models.list()) == sorted(KEYED_MODELS)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"x-api-key": "wrong"},
        {"Authorization": f"Basic {API_KEY}"},
        {"Authorization": API_KEY},
    ],
)
def test_native_routes_want_the_key(keyed_server, headers):
    body = json.dumps({"instances": ["Hi"], "parameters": {"max_new_tokens": 1}}).encode()
    status, answer_headers, answer = raw(keyed_server, "POST", "/predictions/smollm2-dynamic", body, headers)
    assert status == 401 and answer["code"] == 401 and "API key" in answer["error"]
    assert answer_headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "headers", [{"Authorization": f"Bearer {API_KEY}"}, {"x-api-key": API_KEY}, {"authorization": f"bearer {API_KEY}"}]
)
def test_either_header_carries_the_key(keyed_server, headers):
    body = json.dumps({"instances": ["Hi"], "parameters": {"max_new_tokens": 1}}).encode()
    assert raw(keyed_server, "POST", "/predictions/smollm2-dynamic", body, headers)[0] == 200
    question = json.dumps({"model": KEYED_MODELS[0], "messages": QUESTION}).encode()
    assert raw(keyed_server, "POST", "/v1/messages/count_tokens", question, headers)[0] == 200


def test_health_stays_open_and_metrics_do_not(keyed_server):
    assert raw(keyed_server, "GET", "/health")[0] == 200
    assert raw(keyed_server, "GET", "/ping")[0] == 200
    assert raw(keyed_server, "GET", "/metrics", port=keyed_server.metrics_port)[0] == 401
    request = urllib.request.Request(f"{keyed_server.metrics}/metrics", headers=KEY)
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200 and b"llm_front" in response.read()
