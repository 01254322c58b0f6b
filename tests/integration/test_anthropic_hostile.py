"""Hostile bodies on Anthropic's routes, against the product's own tree on both batching paths.

Each bad body gets a 4xx in Anthropic's error shape, `{"type": "error", "error": {type, message}}`,
whose message names the field at fault, from the same worker process, which then answers a
good request at once (the pattern of test_hostile_input.py and test_openai_api.py).
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest

from tests.integration.conftest import API_KEY, KEYED_MODELS
from tests.support.torchserve import TorchServe

MESSAGES, COUNT = "/v1/messages", "/v1/messages/count_tokens"
USER = [{"role": "user", "content": "Hi"}]
MAX_REQUEST_SIZE = 1024 * 1024


def js(value: Any) -> bytes:
    return json.dumps(value).encode()


def message(**fields: Any) -> bytes:
    body = {"model": "MODEL", "max_tokens": 4, "messages": USER, **fields}
    return js({key: value for key, value in body.items() if value is not DROP})


def blocks(*content: Any, role: str = "user") -> list[dict[str, Any]]:
    return [{"role": role, "content": list(content)}]


DROP = object()
# (kind, route, raw body, status, the field its message names); MODEL is replaced by the model under test.
CASES = [
    ("malformed JSON", MESSAGES, b'{"model": "MODEL", "messages": [', 400, "body"),
    ("non-UTF-8 bytes", MESSAGES, b"\xff\xfe\xfa\x80", 400, "body"),
    ("a list as the body", MESSAGES, b"[1, 2]", 400, "body"),
    ("null as the body", MESSAGES, b"null", 400, "body"),
    ("an empty body", MESSAGES, b"", 400, "body"),
    ("JSON nested 100,000 deep", MESSAGES, b"[" * 100_000 + b"]" * 100_000, 400, "body"),
    ("no max_tokens", MESSAGES, message(max_tokens=DROP), 400, "max_tokens"),
    ("max_tokens 0", MESSAGES, message(max_tokens=0), 400, "max_tokens"),
    ("max_tokens as a string", MESSAGES, message(max_tokens="many"), 400, "max_tokens"),
    ("max_tokens over the context", MESSAGES, message(max_tokens=100_000), 422, "max_tokens"),
    ("no messages", MESSAGES, message(messages=DROP), 400, "messages"),
    ("empty messages", MESSAGES, message(messages=[]), 400, "messages"),
    ("a message that is a string", MESSAGES, message(messages=["hi"]), 400, "messages[0]"),
    ("the system role in messages", MESSAGES, message(messages=[{"role": "system", "content": "x"}]), 400, "messages[0].role"),
    ("a tool role", MESSAGES, message(messages=[{"role": "tool", "content": "x"}]), 400, "messages[0].role"),
    ("a message without content", MESSAGES, message(messages=[{"role": "user"}]), 400, "messages[0].content"),
    (
        "an image block",
        MESSAGES,
        message(messages=blocks({"type": "image", "source": {"type": "base64"}})),
        400,
        "messages[0].content[0].type",
    ),
    (
        "a document block",
        MESSAGES,
        message(messages=blocks({"type": "document", "source": {}})),
        400,
        "messages[0].content[0].type",
    ),
    (
        "a tool_use block in a user message",
        MESSAGES,
        message(messages=blocks({"type": "tool_use", "id": "t", "name": "f", "input": {}})),
        400,
        "messages[0].content[0].type",
    ),
    (
        "a tool_result block in an assistant message",
        MESSAGES,
        message(messages=USER + blocks({"type": "tool_result", "tool_use_id": "t"}, role="assistant")),
        400,
        "messages[1].content[0].type",
    ),
    (
        "a tool_result without a matching tool_use",
        MESSAGES,
        message(messages=blocks({"type": "tool_result", "tool_use_id": "t"})),
        400,
        "messages[0].content[0].tool_use_id",
    ),
    (
        "a tool_use whose input is no object",
        MESSAGES,
        message(messages=USER + blocks({"type": "tool_use", "id": "t", "name": "f", "input": "x"}, role="assistant") + USER),
        400,
        "messages[1].content[0].input",
    ),
    (
        "a last assistant message with a tool_use",
        MESSAGES,
        message(messages=USER + blocks({"type": "tool_use", "id": "t", "name": "f", "input": {}}, role="assistant")),
        400,
        "messages[1].content",
    ),
    (
        "a block of an unknown type",
        MESSAGES,
        message(messages=blocks({"type": "txt", "text": "x"})),
        400,
        "messages[0].content[0].type",
    ),
    ("a text block without text", MESSAGES, message(messages=blocks({"type": "text"})), 400, "messages[0].content[0].text"),
    ("a block that is a string", MESSAGES, message(messages=blocks("hi")), 400, "messages[0].content[0]"),
    ("an empty block list", MESSAGES, message(messages=blocks()), 400, "messages[0].content"),
    (
        "a lone surrogate in content",
        MESSAGES,
        b'{"model": "MODEL", "max_tokens": 4, "messages": [{"role": "user", "content": "hi \\udfff"}]}',
        400,
        "messages[0].content",
    ),
    (
        "content over the character limit",
        MESSAGES,
        message(messages=[{"role": "user", "content": "a" * 120_000}]),
        422,
        "messages[0].content",
    ),
    ("system as a number", MESSAGES, message(system=5), 400, "system"),
    ("an image block in system", MESSAGES, message(system=[{"type": "image"}]), 400, "system[0].type"),
    ("an unknown field", MESSAGES, message(colour="red"), 400, "colour"),
    ("temperature 1.5", MESSAGES, message(temperature=1.5), 400, "temperature"),
    (
        "NaN temperature",
        MESSAGES,
        b'{"model": "MODEL", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        400,
        "temperature",
    ),
    ("top_p 0", MESSAGES, message(top_p=0), 400, "top_p"),
    ("top_k -1", MESSAGES, message(top_k=-1), 400, "top_k"),
    ("tools as an object", MESSAGES, message(tools={"name": "f"}), 400, "tools"),
    ("a tool without input_schema", MESSAGES, message(tools=[{"name": "f"}]), 400, "tools[0].input_schema"),
    (
        "an input_schema of a string",
        MESSAGES,
        message(tools=[{"name": "f", "input_schema": {"type": "string"}}]),
        400,
        "tools[0].input_schema",
    ),
    (
        "an input_schema the grammar cannot enforce",
        MESSAGES,
        message(tools=[{"name": "f", "input_schema": {"type": "object", "not": {"required": ["a"]}}}]),
        400,
        "tools[0].input_schema",
    ),
    (
        "a tool name that breaks the format",
        MESSAGES,
        message(tools=[{"name": 'f"}</tool_call>', "input_schema": {}}]),
        400,
        "tools[0].name",
    ),
    ("two tools of one name", MESSAGES, message(tools=[{"name": "f", "input_schema": {}}] * 2), 400, "tools[1]"),
    ("a server tool", MESSAGES, message(tools=[{"type": "web_search_20250305", "name": "web_search"}]), 400, "tools[0].type"),
    (
        "an input_schema over the grammar limit",
        MESSAGES,
        message(
            tools=[
                {
                    "name": "f",
                    "input_schema": {"type": "object", "properties": {f"p{i}": {"enum": ["x" * 40]} for i in range(800)}},
                }
            ]
        ),
        422,
        "tools",
    ),
    ("tool_choice without tools", MESSAGES, message(tool_choice={"type": "any"}), 400, "tool_choice"),
    (
        "tool_choice naming an unknown tool",
        MESSAGES,
        message(tools=[{"name": "f", "input_schema": {}}], tool_choice={"type": "tool", "name": "g"}),
        400,
        "tool_choice",
    ),
    (
        "tool_choice of an unknown type",
        MESSAGES,
        message(tools=[{"name": "f", "input_schema": {}}], tool_choice={"type": "required"}),
        400,
        "tool_choice.type",
    ),
    ("thinking", MESSAGES, message(thinking={"type": "enabled", "budget_tokens": 1024}), 400, "thinking"),
    ("fifty stop_sequences", MESSAGES, message(stop_sequences=[f"s{i}" for i in range(50)]), 422, "stop_sequences"),
    ("a stop sequence of 10,000 characters", MESSAGES, message(stop_sequences=["x" * 10_000]), 422, "stop_sequences"),
    ("stop_sequences as a string", MESSAGES, message(stop_sequences="Paris"), 400, "stop_sequences"),
    ("metadata with an unknown key", MESSAGES, message(metadata={"colour": "red"}), 400, "metadata.colour"),
    ("stream as a string", MESSAGES, message(stream="yes"), 400, "stream"),
    ("a number as the model", MESSAGES, message(model=5), 400, "model"),
    ("an unknown model", MESSAGES, message(model="claude-opus-4"), 404, "model"),
    ("max_tokens on count_tokens", COUNT, message(), 400, "max_tokens"),
    ("count_tokens without messages", COUNT, js({"model": "MODEL"}), 400, "messages"),
    (
        "a bad input_schema on count_tokens",
        COUNT,
        js({"model": "MODEL", "messages": USER, "tools": [{"name": "f", "input_schema": 5}]}),
        400,
        "tools[0].input_schema",
    ),
]
KINDS = {400: "invalid_request_error", 422: "invalid_request_error", 404: "not_found_error"}


def post(server: TorchServe, route: str, body: bytes) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json", "x-api-key": API_KEY, "anthropic-version": "2023-06-01"}
    request = urllib.request.Request(f"{server.url}{route}", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def worker_pids(server: TorchServe, model: str) -> list[int]:
    with urllib.request.urlopen(f"{server.management}/models/{model}", timeout=30) as response:
        return [worker["pid"] for description in json.load(response) for worker in description["workers"]]


@pytest.fixture(params=KEYED_MODELS)
def model(request) -> str:
    return request.param


def test_the_cases_cover_the_issue():
    assert len(CASES) >= 25 and len({kind for kind, *_ in CASES}) == len(CASES)
    assert all(len(body) < MAX_REQUEST_SIZE for _, _, body, *_ in CASES)


@pytest.mark.parametrize("kind, route, body, status, field", CASES, ids=[case[0] for case in CASES])
def test_a_bad_body_gets_a_4xx_in_anthropic_shape(keyed_server, model, kind, route, body, status, field):
    before = worker_pids(keyed_server, model)
    got_status, got = post(keyed_server, route, body.replace(b"MODEL", model.encode()))
    assert got_status == status, got
    assert set(got) == {"type", "error"} and got["type"] == "error" and set(got["error"]) == {"type", "message"}, got
    assert got["error"]["type"] == KINDS[status] and field in got["error"]["message"], got
    assert post(keyed_server, MESSAGES, message(max_tokens=1).replace(b"MODEL", model.encode()))[0] == 200
    assert worker_pids(keyed_server, model) == before, "the worker was replaced"
