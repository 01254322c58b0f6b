"""The OpenAI API with the official `openai` SDK, against the product's own tree (front, TorchServe, SmolLM2).

One tree serves SmolLM2 twice, as `smollm2-dynamic` and `smollm2-continuous`; the SDK's
`model` picks the batching path, so every check runs on both. Text is asserted only greedy
or seeded. The hostile-input part sends bad bodies to both OpenAI routes: each gets a 4xx
in OpenAI's error shape, and the same worker answers a good request after.
"""

from __future__ import annotations

import http.client
import json
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import openai
import pytest
from transformers import AutoTokenizer

from tests.support.torchserve import TorchServe, build_archive, continuous_model_config, dynamic_model_config

MODELS = ("smollm2-dynamic", "smollm2-continuous")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MAX_REQUEST_SIZE = 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[TorchServe]:
    workdir = tmp_path_factory.mktemp("openai-api")
    store = workdir / "store"
    store.mkdir()
    configs = dict(zip(MODELS, (dynamic_model_config("smollm2"), continuous_model_config("smollm2"))))
    served = TorchServe(workdir, {name: build_archive("smollm2", name, store, config) for name, config in configs.items()})
    try:
        served.start()
        yield served
    finally:
        served.stop()


@pytest.fixture(scope="module")
def client(server: TorchServe) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(params=MODELS)
def model(request) -> str:
    return request.param


def greedy_chat(client: openai.OpenAI, model: str, **extra: Any):
    return client.chat.completions.create(model=model, messages=QUESTION, max_tokens=16, temperature=0, **extra)


def test_models_lists_every_app(client):
    assert sorted(m.id for m in client.models.list()) == sorted(MODELS)
    assert client.models.retrieve("smollm2-dynamic").id == "smollm2-dynamic"


def test_chat(client, model):
    reply = greedy_chat(client, model)
    assert reply.object == "chat.completion" and reply.model == model
    assert reply.choices[0].message.role == "assistant" and "Paris" in reply.choices[0].message.content


def test_a_streamed_chat_concatenates_to_the_greedy_text(client, model):
    whole = greedy_chat(client, model)
    chunks = list(greedy_chat(client, model, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_a_stream_is_sse_arriving_in_pieces(server, model):
    """What the SDK hides: the content type, and that events come in several reads, not one block at the end."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
    body = {"model": model, "messages": QUESTION, "max_tokens": 24, "temperature": 0, "stream": True}
    try:
        connection.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        reads = []
        while block := response.read1(65536):
            reads.append(block)
    finally:
        connection.close()
    assert response.status == 200 and response.getheader("content-type") == "text/event-stream"
    events = [event for event in b"".join(reads).decode().split("\n\n") if event]
    assert all(event.startswith("data: ") for event in events) and events[-1] == "data: [DONE]"
    assert len([r for r in reads if b"content" in r]) >= 3


def test_completions(client, model):
    reply = client.completions.create(model=model, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert reply.object == "text_completion" and "Paris" in reply.choices[0].text


def test_n_with_a_seed_gives_the_same_choices(client, model):
    def ask():
        return client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, n=2, seed=7, temperature=1.0)

    first, again = ask(), ask()
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]


def test_stop_strings(client, model):
    whole = greedy_chat(client, model).choices[0].message.content
    stop = "Paris"
    assert stop in whole
    reply = greedy_chat(client, model, stop=[stop, "nowhere"])
    assert reply.choices[0].message.content == whole[: whole.index(stop)] and reply.choices[0].finish_reason == "stop"


def test_usage_is_the_tokenizers_count(client, model, tokenizer):
    reply = greedy_chat(client, model)
    prompt = tokenizer.apply_chat_template(QUESTION, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    text = reply.choices[0].message.content
    generated = len(tokenizer(text, add_special_tokens=False)["input_ids"]) + (reply.choices[0].finish_reason == "stop")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), generated)
    assert reply.usage.total_tokens == len(prompt) + generated


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"temperature": -1}, "temperature"),
        ({"tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools[0].function.name"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"extra_body": {"colour": "red"}}, "colour"),
    ],
)
def test_bad_input_is_the_sdks_bad_request_error_naming_the_field(client, model, extra, field):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model, messages=QUESTION, **extra)
    assert caught.value.param == field and field in caught.value.message


SCHEMA_FILE = Path(__file__).parents[1] / "support" / "structured_schemas.json"
SCHEMAS = {entry["name"]: entry for entry in json.loads(SCHEMA_FILE.read_text())["schemas"]}


@pytest.mark.parametrize("name", ["person", "order_items", "any_of_value"])
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.8, "seed": 11}], ids=["greedy", "seeded"])
def test_json_schema_response_format_gives_valid_json(client, model, name, sampling):
    entry = SCHEMAS[name]
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": entry.get("prompt", "Answer in JSON.")}],
        max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": name, "schema": entry["schema"]}},
        **sampling,
    )
    assert reply.choices[0].finish_reason == "stop", reply
    jsonschema.validate(json.loads(reply.choices[0].message.content), entry["schema"])


def test_json_object_response_format_gives_a_json_object(client, model):
    reply = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=200, temperature=0, response_format={"type": "json_object"}
    )
    assert reply.choices[0].finish_reason == "stop", reply
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_an_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert caught.value.param == "model" and "gpt-4o" in caught.value.message


# Hostile input on the OpenAI routes


def js(value: Any) -> bytes:
    return json.dumps(value).encode()


def chat(**fields: Any) -> bytes:
    return js({"model": "MODEL", "messages": QUESTION, **fields})


def completion(**fields: Any) -> bytes:
    return js({"model": "MODEL", "prompt": "Hello", **fields})


CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
# (kind, route, raw body, status, OpenAI `param`); MODEL is replaced by the model under test.
CASES = [
    ("malformed JSON", CHAT, b'{"model": "MODEL", "messages": [', 400, "body"),
    ("non-UTF-8 bytes", CHAT, b"\xff\xfe\xfa\x80", 400, "body"),
    ("a list as the body", CHAT, b"[1, 2]", 400, "body"),
    ("an empty body", COMPLETIONS, b"", 400, "body"),
    ("JSON nested 100,000 deep", CHAT, b"[" * 100_000 + b"]" * 100_000, 400, "body"),
    (
        "NaN temperature",
        CHAT,
        b'{"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        400,
        "temperature",
    ),
    ("no messages", CHAT, js({"model": "MODEL"}), 400, "messages"),
    ("messages null", CHAT, chat(messages=None), 400, "messages"),
    ("empty messages", CHAT, chat(messages=[]), 400, "messages"),
    ("a message that is a string", CHAT, chat(messages=["hi"]), 400, "messages[0]"),
    ("a tool message with no call", CHAT, chat(messages=[{"role": "tool", "content": "x"}]), 400, "messages[0].tool_call_id"),
    ("an unknown role", CHAT, chat(messages=[{"role": "root", "content": "x"}]), 400, "messages[0].role"),
    (
        "an image part",
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        400,
        "messages[0].content[0].type",
    ),
    (
        "a lone surrogate in content",
        CHAT,
        b'{"model": "MODEL", "messages": [{"role": "user", "content": "hi \\udfff"}]}',
        400,
        "messages[0].content",
    ),
    (
        "a tool name with a space",
        CHAT,
        chat(tools=[{"type": "function", "function": {"name": "f g"}}]),
        400,
        "tools[0].function.name",
    ),
    ("tool_choice", CHAT, chat(tool_choice="auto"), 400, "tool_choice"),
    ("audio output", CHAT, chat(modalities=["audio"]), 400, "modalities"),
    ("an unknown field", CHAT, chat(colour="red"), 400, "colour"),
    (
        "json_schema response_format without its schema",
        CHAT,
        chat(response_format={"type": "json_schema"}),
        400,
        "response_format.json_schema",
    ),
    (
        "a regex response_format (not an OpenAI type)",
        CHAT,
        chat(response_format={"type": "regex", "pattern": "a"}),
        400,
        "response_format",
    ),
    ("max_tokens 0", CHAT, chat(max_tokens=0), 400, "max_tokens"),
    ("max_tokens and max_completion_tokens", CHAT, chat(max_tokens=5, max_completion_tokens=5), 400, "max_completion_tokens"),
    ("max_tokens over the context", CHAT, chat(max_tokens=100_000), 422, "max_tokens"),
    ("a string temperature", CHAT, chat(temperature="hot"), 400, "temperature"),
    ("temperature 1e39", CHAT, chat(temperature=1e39), 400, "temperature"),
    ("top_p 0", CHAT, chat(top_p=0), 400, "top_p"),
    ("n over the limit", CHAT, chat(n=100), 400, "n"),
    ("n > 1 greedy", CHAT, chat(n=2, temperature=0), 400, "n"),
    ("a negative seed", CHAT, chat(seed=-5), 400, "seed"),
    ("fifty stop strings", CHAT, chat(stop=[f"s{i}" for i in range(50)]), 422, "stop"),
    ("a number as stop", CHAT, chat(stop=7), 400, "stop"),
    ("presence_penalty 3", CHAT, chat(presence_penalty=3), 400, "presence_penalty"),
    ("frequency_penalty -2.5", CHAT, chat(frequency_penalty=-2.5), 400, "frequency_penalty"),
    ("logit_bias on a token out of the vocabulary", CHAT, chat(logit_bias={"99999999": 5}), 400, "logit_bias"),
    ("logit_bias of 101", CHAT, chat(logit_bias={"5": 101}), 400, "logit_bias.5"),
    ("top_logprobs without logprobs", CHAT, chat(top_logprobs=3), 400, "top_logprobs"),
    ("top_logprobs 50", CHAT, chat(logprobs=True, top_logprobs=50), 400, "top_logprobs"),
    ("stream_options without stream", CHAT, chat(stream_options={"include_usage": True}), 400, "stream_options"),
    ("a number as the model", CHAT, chat(model=5), 400, "model"),
    ("a user that is not a string", CHAT, chat(user=["eve"]), 400, "user"),
    ("prompt as token ids", COMPLETIONS, completion(prompt=[1, 2, 3]), 400, "prompt"),
    ("an empty prompt", COMPLETIONS, completion(prompt=""), 400, "prompt"),
    ("too many prompts", COMPLETIONS, completion(prompt=["a"] * 1000), 422, "prompt"),
    ("suffix", COMPLETIONS, completion(suffix="end"), 400, "suffix"),
    ("best_of", COMPLETIONS, completion(best_of=3), 400, "best_of"),
    ("messages on completions", COMPLETIONS, completion(messages=QUESTION), 400, "messages"),
    ("echo with logprobs", COMPLETIONS, completion(echo=True, logprobs=1), 400, "echo"),
    ("a prompt over the character limit", COMPLETIONS, completion(prompt="a" * 120_000), 422, "prompt"),
    ("an unknown model", CHAT, js({"model": "gpt-4o", "messages": QUESTION}), 404, "model"),
]


def post(server: TorchServe, route: str, body: bytes) -> tuple[int, Any]:
    request = urllib.request.Request(f"{server.url}{route}", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def worker_pids(server: TorchServe, model: str) -> list[int]:
    with urllib.request.urlopen(f"{server.management}/models/{model}", timeout=30) as response:
        return [worker["pid"] for description in json.load(response) for worker in description["workers"]]


def test_the_cases_cover_the_issue():
    assert len(CASES) >= 25 and len({kind for kind, *_ in CASES}) == len(CASES)
    assert all(len(body) < MAX_REQUEST_SIZE for _, _, body, *_ in CASES)


@pytest.mark.parametrize("kind, route, body, status, param", CASES, ids=[case[0] for case in CASES])
def test_a_bad_body_gets_a_4xx_in_openai_shape(server, model, kind, route, body, status, param):
    before = worker_pids(server, model)
    got_status, got = post(server, route, body.replace(b"MODEL", model.encode()))
    assert got_status == status, got
    assert set(got) == {"error"} and set(got["error"]) == {"message", "type", "param", "code"}, got
    assert got["error"]["param"] == param and got["error"]["type"] == "invalid_request_error"
    assert post(server, CHAT, chat(max_tokens=1).replace(b"MODEL", model.encode()))[0] == 200
    assert worker_pids(server, model) == before, "the worker was replaced"


def test_a_body_over_the_size_limit_is_refused_in_openai_shape(server):
    """The front answers from the declared length and may close before the body is all sent; the answer still reads."""
    big = b'{"model": "smollm2-dynamic", "prompt": "' + b"a" * MAX_REQUEST_SIZE + b'"}'
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        try:
            connection.request("POST", COMPLETIONS, body=big, headers={"Content-Type": "application/json"})
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = connection.getresponse()
        status, body = response.status, json.loads(response.read())
    finally:
        connection.close()
    assert status == 413 and body["error"]["param"] == "body" and body["error"]["code"] == "request_too_large"
