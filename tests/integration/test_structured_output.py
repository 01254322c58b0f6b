"""`response_format` end to end: SmolLM2 behind a real TorchServe, on both batching paths.

Every answer to the fixture schemas (tests/support/structured_schemas.json) must parse and
validate with `jsonschema`, greedy and sampled with a seed, alone and beside unconstrained
neighbours in one batch; those neighbours' greedy text must be what they write alone. A
grammar that completes ends its answer with finish_reason "stop"; max_new_tokens cuts one
short with "length". Bad formats get a 4xx naming the field, and the server serves after.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest

from tests.support.torchserve import TorchServe, continuous_model_config, dynamic_model_config, start_app

MODEL = "smollm2"
PATHS = {"dynamic": dynamic_model_config, "continuous": continuous_model_config}
SCHEMAS = json.loads((Path(__file__).parents[1] / "support" / "structured_schemas.json").read_text())["schemas"]
PER_REQUEST = 8  # instances per request, within max_instances
MAX_NEW_TOKENS = 160
NEIGHBOURS = ["The capital of France is", "List three colours:", "Once upon a time,"]
# Ten 3000-character strings: inside the size limit, but seconds of compiling (the test app allows 1 s).
SLOW_SCHEMA = {"enum": ["x" * 3000 + str(i) for i in range(10)]}


def json_schema(entry: dict) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": entry["name"], "schema": entry["schema"]}}


def constrained(entry: dict, **overrides: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": entry["prompt"]}], "response_format": json_schema(entry), **overrides}


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


@pytest.fixture(scope="module", params=list(PATHS))
def server(request, tmp_path_factory: pytest.TempPathFactory, smollm2_dir) -> Iterator[TorchServe]:
    config = PATHS[request.param](MODEL)
    # No deadline: on a busy 2-core machine the app's 50 s would cut answers short ("length").
    handler = {key: value for key, value in config["handler"].items() if key != "deadline_seconds"}
    # float32: neighbours' texts are compared alone and in a batch.
    config["handler"] = {**handler, "dtype": "float32", "structured_output": {"compile_timeout_seconds": 1}}
    config["responseTimeout"] = 1800  # TorchServe restarts a worker past it; a batch of 8 can take minutes here
    torchserve = start_app(tmp_path_factory.mktemp(f"structured-{request.param}"), MODEL, config)
    yield torchserve
    torchserve.stop()


def predict(server: TorchServe, instances: list, **parameters: Any) -> list[dict]:
    body = {"instances": instances, "parameters": {"max_new_tokens": MAX_NEW_TOKENS, "details": True, **parameters}}
    status, answer = server.post(MODEL, body, timeout=1800)
    assert status == 200, answer
    return answer["predictions"]


def assert_valid(prediction: dict, entry: dict) -> None:
    assert prediction["finish_reason"] == "stop", (entry["name"], prediction)
    jsonschema.validate(json.loads(prediction["generated_text"]), entry["schema"])


@pytest.mark.parametrize(
    "sampling", [{"temperature": 0}, {"temperature": 0.8, "top_p": 0.95, "seed": 11}], ids=["greedy", "sampled"]
)
def test_every_schema_answer_validates(server, sampling):
    for group in chunks(SCHEMAS, PER_REQUEST):
        predictions = predict(server, [constrained(entry) for entry in group], **sampling)
        for prediction, entry in zip(predictions, group):
            assert_valid(prediction, entry)


def test_a_seeded_sampled_answer_is_the_same_alone_and_in_a_batch(server):
    entry = SCHEMAS[0]
    sampling = {"temperature": 0.9, "seed": 5}
    alone = predict(server, [constrained(entry)], **sampling)[0]
    together = predict(server, [constrained(entry), *NEIGHBOURS], **sampling)[0]
    assert together["generated_text"] == alone["generated_text"]


def test_constrained_and_unconstrained_share_a_batch_and_neighbours_are_unchanged(server):
    alone = predict(server, NEIGHBOURS, temperature=0, max_new_tokens=24)
    for group in chunks(SCHEMAS, PER_REQUEST - len(NEIGHBOURS)):
        instances = [*(constrained(entry, max_new_tokens=MAX_NEW_TOKENS) for entry in group), *NEIGHBOURS]
        predictions = predict(server, instances, temperature=0, max_new_tokens=24)
        for prediction, entry in zip(predictions, group):
            assert_valid(prediction, entry)
        assert [p["generated_text"] for p in predictions[len(group) :]] == [p["generated_text"] for p in alone]


def test_concurrent_requests_mixing_formats_all_validate(server):
    """Separate HTTP requests, which TorchServe batches (dynamic) or the manager interleaves (continuous)."""
    group = SCHEMAS[:6]

    def send(index: int) -> tuple[int, Any]:
        if index % 2:
            body = {"instances": NEIGHBOURS[:1], "parameters": {"max_new_tokens": 16, "temperature": 0}}
        else:
            parameters = {"max_new_tokens": MAX_NEW_TOKENS, "details": True, "temperature": 0}
            body = {"instances": [constrained(group[index // 2])], "parameters": parameters}
        return server.post(MODEL, body, timeout=1800)

    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(send, range(12)))
    for index, (status, answer) in enumerate(answers):
        assert status == 200, answer
        if index % 2 == 0:
            assert_valid(answer["predictions"][0], group[index // 2])


def test_max_new_tokens_cuts_an_answer_short_as_length(server):
    [prediction] = predict(server, [constrained(SCHEMAS[1])], temperature=0, max_new_tokens=5)
    assert prediction["finish_reason"] == "length" and prediction["generated_tokens"] == 5


@pytest.mark.parametrize(
    "response_format, answers",
    [
        ({"type": "regex", "pattern": "(yes|no), because [a-z ]{5,20}\\."}, "(yes|no), because [a-z ]{5,20}\\."),
        ({"type": "grammar", "grammar": 'root ::= "The answer is " ("yes" | "no") "."'}, "The answer is (yes|no)\\."),
    ],
    ids=["regex", "grammar"],
)
def test_regex_and_grammar_shape_the_text(server, response_format, answers):
    [prediction] = predict(server, ["Is the sky blue?"], temperature=0, response_format=response_format)
    assert re.fullmatch(answers, prediction["generated_text"]) and prediction["finish_reason"] == "stop", prediction


def test_json_object_gives_an_object(server):
    [prediction] = predict(
        server,
        [{"messages": [{"role": "user", "content": "Describe a cat in JSON."}]}],
        temperature=0,
        response_format={"type": "json_object"},
        max_new_tokens=200,
    )
    assert prediction["finish_reason"] == "stop", prediction
    assert isinstance(json.loads(prediction["generated_text"]), dict)


def test_a_constrained_stream_sends_the_same_text(server):
    entry = SCHEMAS[0]
    parameters = {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0, "stream": True}
    status, answer = server.post(MODEL, {"instances": [constrained(entry)], "parameters": parameters}, timeout=1800)
    assert status == 200 and isinstance(answer, str), answer
    lines = [json.loads(line) for line in answer.splitlines() if line.strip()]
    final = lines[-1]["predictions"][0]["generated_text"]
    assert "".join(line["text"] for line in lines[:-1]) == final
    jsonschema.validate(json.loads(final), entry["schema"])


# (kind, response_format, expected status, expected field, a piece of the error)
HOSTILE = [
    ("unknown type", {"type": "xml"}, 400, "parameters.response_format.type", "must be one of"),
    (
        "schema not an object",
        {"type": "json_schema", "json_schema": {"schema": "{}"}},
        400,
        "parameters.response_format.json_schema.schema",
        "must be a JSON Schema object",
    ),
    (
        "unsupported type in a schema",
        json_schema({"name": "x", "schema": {"type": "objectx"}}),
        400,
        "parameters.response_format.json_schema.schema",
        "Unsupported type",
    ),
    (
        "circular $ref",
        json_schema({"name": "x", "schema": {"$ref": "#"}}),
        400,
        "parameters.response_format.json_schema.schema",
        "Circular",
    ),
    ("bad regex", {"type": "regex", "pattern": "(unclosed"}, 400, "parameters.response_format.pattern", "not closed"),
    ("bad grammar", {"type": "grammar", "grammar": "root ::= nothing"}, 400, "parameters.response_format.grammar", "not defined"),
    (
        "an enum of 20,000 values",
        json_schema({"name": "x", "schema": {"enum": [f"v{i}" for i in range(20_000)]}}),
        422,
        "parameters.response_format.json_schema.schema",
        "at most 32768",
    ),
    (
        "a schema over the compile time limit",
        json_schema({"name": "x", "schema": SLOW_SCHEMA}),
        422,
        "parameters.response_format.json_schema.schema",
        "compile limit",
    ),
    ("with beam search", {"type": "json_object"}, 400, "num_beams", "cannot be combined"),
]


@pytest.mark.parametrize("kind, response_format, status, field, words", HOSTILE, ids=[case[0] for case in HOSTILE])
def test_a_bad_format_is_a_4xx_naming_the_field_and_the_server_serves_after(server, kind, response_format, status, field, words):
    parameters = {"max_new_tokens": 4, "response_format": response_format}
    if kind == "with beam search":
        parameters["num_beams"] = 2
    got, answer = server.post(MODEL, {"instances": ["Hello"], "parameters": parameters})
    assert (got, answer.get("field")) == (status, field), answer
    assert words in answer["error"]
    if words == "compile limit":
        assert answer["limit"] == 1
    predictions = predict(server, [constrained(SCHEMAS[3])], temperature=0)
    assert_valid(predictions[0], SCHEMAS[3])


def test_a_bad_format_does_not_fail_requests_batched_with_it(server):
    slow = json_schema({"name": "x", "schema": {**SLOW_SCHEMA, "title": "not cached yet"}})
    bad = {"instances": ["Hello"], "parameters": {"response_format": slow}}
    parameters = {"max_new_tokens": MAX_NEW_TOKENS, "details": True, "temperature": 0}
    good = {"instances": [constrained(SCHEMAS[3])], "parameters": parameters}
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(server.post, MODEL, body, 1800) for body in (bad, good, good, bad)]
        answers = [future.result() for future in futures]
    assert [status for status, _ in answers] == [422, 200, 200, 422]
    for _, answer in answers[1:3]:
        assert_valid(answer["predictions"][0], SCHEMAS[3])
