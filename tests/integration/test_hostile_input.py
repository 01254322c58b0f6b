"""Hostile and broken requests against a real TorchServe serving the real smollm2 app.

Every bad request must get a 4xx whose JSON names the problem (`error`) and the field at
fault (`field`), from the same worker process, which then answers a good request at once.
Bad and good requests sent together must not fail each other: on the dynamic path they share
TorchServe batches (batchSize 8); on the continuous path (the shipped default) they are
handled side by side on one event loop while a long generation runs. Every test runs on both.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.support.torchserve import TorchServe, continuous_model_config, dynamic_model_config, start_app

MODEL = "smollm2"
PATHS = {"dynamic": dynamic_model_config, "continuous": continuous_model_config}
GOOD = {"instances": ["The capital of France is"], "parameters": {"max_new_tokens": 1, "temperature": 0}}
MAX_REQUEST_SIZE = 1024 * 1024  # config.properties max_request_size


def js(value: Any) -> bytes:
    return json.dumps(value).encode()


def with_params(**params: Any) -> bytes:
    return js({"instances": ["Hello"], "parameters": params})


def chat(*messages: Any) -> bytes:
    return js({"instances": [{"messages": list(messages)}]})


# (kind, raw body, expected status, expected `field`, a piece of the expected `error`)
CASES = [
    ("malformed JSON", b'{"instances": [', 400, "body", "malformed JSON"),
    ("JSON with a trailing comma", b'{"instances": ["a"],}', 400, "body", "malformed JSON"),
    ("non-UTF-8 bytes", b"\xff\xfe\xfa\x80", 400, "body", "not valid UTF-8"),
    ("non-UTF-8 bytes inside a JSON string", b'{"instances": ["\xff"]}', 400, "body", "not valid UTF-8"),
    ("null as the body", b"null", 400, "body", "got null"),
    ("a number as the body", b"42", 400, "body", "got int"),
    ("a list as the body", b'["Hello"]', 400, "body", "got list"),
    ("an empty body", b"", 400, "body", "must not be empty"),
    ("NaN", b'{"instances": ["hi"], "parameters": {"temperature": NaN}}', 400, "parameters.temperature", "finite"),
    ("Infinity", b'{"instances": ["hi"], "parameters": {"top_p": Infinity}}', 400, "parameters.top_p", "finite"),
    (
        "a float that overflows (1e999)",
        b'{"instances": ["hi"], "parameters": {"temperature": 1e999}}',
        400,
        "parameters.temperature",
        "finite",
    ),
    (
        "an integer of 5000 digits",
        b'{"instances": ["hi"], "parameters": {"seed": ' + b"9" * 5000 + b"}}",
        400,
        "body",
        "4300 digits",
    ),
    ("JSON nested 100,000 deep", b"[" * 100_000 + b"]" * 100_000, 400, "body", "nested too deeply"),
    ("deep nesting inside instances", b'{"instances": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400, "body", "nested too deeply"),
    ("empty instances", js({"instances": []}), 400, "instances", "must not be empty"),
    ("100,000 instances", js({"instances": ["a"] * 100_000}), 422, "instances", "at most 16"),
    ("instances is null", js({"instances": None}), 400, "instances", "must be a list"),
    ("instances is a string", js({"instances": "Hello"}), 400, "instances", "must be a list"),
    ("an instance that is a number", js({"instances": [7]}), 400, "instances[0]", "must be a string or an object"),
    (
        "both prompt and messages",
        js({"instances": [{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}]}),
        400,
        "instances[0]",
        "exactly one",
    ),
    ("an empty prompt", js({"instances": [""]}), 400, "instances[0]", "must not be empty"),
    ("a whitespace prompt", js({"instances": [" \n\t "]}), 400, "instances[0]", "must not be empty"),
    ("no prompt at all", js({"parameters": {"max_new_tokens": 2}}), 400, "body", "exactly one"),
    ("TGI prompt that is null", js({"prompt": None}), 400, "prompt", "must be a string"),
    ("TGI inputs list holding a number", js({"inputs": ["a", 3]}), 400, "inputs[1]", "must be a string"),
    ("unknown top-level field", js({"instances": ["hi"], "colour": "red"}), 400, "colour", "unknown field"),
    (
        "a parameter outside 'parameters'",
        js({"instances": ["hi"], "max_new_tokens": 5}),
        400,
        "max_new_tokens",
        "inside 'parameters'",
    ),
    ("unknown parameter", with_params(colour="red"), 400, "parameters.colour", "unknown parameter"),
    (
        "unknown field in an instance",
        js({"instances": [{"prompt": "hi", "colour": "red"}]}),
        400,
        "instances[0].colour",
        "unknown parameter",
    ),
    ("parameters is a list", js({"instances": ["hi"], "parameters": [1]}), 400, "parameters", "JSON object"),
    ("string as a number", with_params(temperature="0.5"), 400, "parameters.temperature", "must be a number"),
    ("boolean as an integer", with_params(max_new_tokens=True), 400, "parameters.max_new_tokens", "got bool"),
    ("fraction as an integer", with_params(max_new_tokens=2.5), 400, "parameters.max_new_tokens", "integer"),
    ("integer as a boolean", with_params(do_sample=1), 400, "parameters.do_sample", "true or false"),
    ("max_new_tokens 0", with_params(max_new_tokens=0), 400, "parameters.max_new_tokens", ">= 1"),
    ("negative temperature", with_params(temperature=-1), 400, "parameters.temperature", ">= 0.0"),
    ("temperature that overflows float32 (1e39)", with_params(temperature=1e39), 400, "parameters.temperature", "<= 100.0"),
    ("top_p 0", with_params(top_p=0), 400, "parameters.top_p", "> 0.0"),
    ("negative top_k", with_params(top_k=-1), 400, "parameters.top_k", ">= 0"),
    ("repetition_penalty 1e-300", with_params(repetition_penalty=1e-300), 400, "parameters.repetition_penalty", ">= 0.001"),
    ("seed over 2**63-1", with_params(seed=2**64), 400, "parameters.seed", "between 0 and"),
    ("negative seed", with_params(seed=-1), 400, "parameters.seed", "between 0 and"),
    (
        "num_return_sequences over the limit",
        with_params(num_return_sequences=50),
        400,
        "parameters.num_return_sequences",
        "between 1 and 4",
    ),
    (
        "num_return_sequences > 1 when greedy",
        with_params(num_return_sequences=2, temperature=0),
        400,
        "num_return_sequences",
        "needs sampling",
    ),
    ("num_beams over the limit", with_params(num_beams=100), 400, "parameters.num_beams", "between 1 and 4"),
    ("stream with beam search", with_params(stream=True, num_beams=2), 400, "stream", "beam search"),
    ("contrastive search", with_params(penalty_alpha=0.6), 400, "penalty_alpha", "not served"),
    (
        "min_new_tokens > max_new_tokens",
        with_params(max_new_tokens=2, min_new_tokens=5),
        400,
        "min_new_tokens",
        "must be <= max_new_tokens",
    ),
    ("thousands of stop strings", with_params(stop=[f"s{i}" for i in range(5000)]), 422, "parameters.stop", "at most 8"),
    ("a stop string too long", with_params(stop=["x" * 1000]), 422, "parameters.stop", "at most 64 characters"),
    ("an empty stop string", with_params(stop=[""]), 400, "parameters.stop", "must not be empty"),
    ("stop strings that are numbers", with_params(stop=[1, 2]), 400, "parameters.stop", "list of strings"),
    ("a lone surrogate in the prompt", b'{"instances": ["Hello \\ud800"]}', 400, "instances[0]", "surrogate"),
    (
        "a lone surrogate in a chat message",
        chat({"role": "user", "content": "hi \udfff"}),
        400,
        "instances[0].messages[0].content",
        "surrogate",
    ),
    ("a lone surrogate in bad_words", with_params(bad_words=["\ud83d"]), 400, "parameters.bad_words", "surrogate"),
    ("a prompt over the character limit", js({"instances": ["a" * 120_000]}), 422, "instances[0]", "at most 100000 allowed"),
    (
        "a prompt far over the token limit",
        js({"instances": ["hello world " * 8000]}),
        422,
        "instances[0]",
        "tokens, at most max_input_tokens",
    ),
    ("prompt + max_new_tokens over max_total_tokens", with_params(max_new_tokens=2048), 422, "max_new_tokens", "must be <= 2048"),
    (
        "a chat message with a bad role",
        chat({"role": "root", "content": "hi"}),
        400,
        "instances[0].messages[0].role",
        "must be one of system, user, assistant",
    ),
    (
        "a chat role that is not a string",
        chat({"role": ["user"], "content": "hi"}),
        400,
        "instances[0].messages[0].role",
        "must be one of",
    ),
    ("a chat message without content", chat({"role": "user"}), 400, "instances[0].messages[0]", "exactly 'role' and 'content'"),
    (
        "a chat message with an extra key",
        chat({"role": "user", "content": "hi", "name": "eve"}),
        400,
        "instances[0].messages[0]",
        "exactly 'role' and 'content'",
    ),
    (
        "chat content that is a number",
        chat({"role": "user", "content": 3}),
        400,
        "instances[0].messages[0].content",
        "must be a string",
    ),
    ("empty messages", js({"instances": [{"messages": []}]}), 400, "instances[0].messages", "non-empty list"),
    ("messages that is a string", js({"instances": [{"messages": "hi"}]}), 400, "instances[0].messages", "non-empty list"),
]


@pytest.fixture(scope="module", params=sorted(PATHS))
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[TorchServe]:
    model_config = PATHS[request.param]
    torchserve = start_app(tmp_path_factory.mktemp(f"hostile-{request.param}"), MODEL, model_config("smollm2"))
    torchserve.path = request.param
    yield torchserve
    torchserve.stop()


@pytest.fixture(scope="module")
def worker_pid(server: TorchServe) -> int:
    return worker_pids(server)[0]


def worker_pids(server: TorchServe) -> list[int]:
    with urllib.request.urlopen(f"{server.management}/models/{MODEL}", timeout=30) as response:
        return [worker["pid"] for model in json.load(response) for worker in model["workers"]]


def assert_still_serving(server: TorchServe, worker_pid: int) -> None:
    status, body = server.post(MODEL, GOOD, timeout=120)
    assert status == 200, body
    assert body["predictions"][0]["generated_text"]
    assert worker_pids(server) == [worker_pid], "the worker was replaced"


def test_the_cases_cover_the_issue():
    assert len(CASES) >= 25
    assert len({kind for kind, *_ in CASES}) == len(CASES)
    assert all(len(body) < MAX_REQUEST_SIZE for _, body, *_ in CASES)


@pytest.mark.parametrize("kind, body, status, field, error", CASES, ids=[case[0] for case in CASES])
def test_a_bad_request_gets_a_4xx_naming_the_problem(server, worker_pid, kind, body, status, field, error):
    got_status, got = server.post(MODEL, None, raw=body, timeout=120)
    assert got_status == status, got
    assert isinstance(got, dict), got
    assert got["field"] == field
    assert error in got["error"]
    assert_still_serving(server, worker_pid)


def test_a_plain_text_body_of_spaces_is_refused(server, worker_pid):
    status, body = server.post(MODEL, None, raw=b"   \n ", content_type="text/plain", timeout=120)
    assert status == 400
    assert body == {"error": "body must not be empty", "field": "body"}
    assert_still_serving(server, worker_pid)


def send_oversized(server: TorchServe, size: int) -> tuple[int, dict[str, str], bytes]:
    """Announce a body of `size` bytes as curl does (`Expect: 100-continue`) and read the answer.

    The front answers an oversized body from its headers, without asking for the body.
    """
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as connection:
        connection.sendall(
            f"POST /predictions/{MODEL} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        response = http.client.HTTPResponse(connection)
        response.begin()
        return response.status, dict(response.getheaders()), response.read()


def test_a_body_over_max_request_size_is_refused_by_the_front(server, worker_pid):
    # The front answers this one from the headers, before TorchServe or any handler sees it.
    status, headers, body = send_oversized(server, MAX_REQUEST_SIZE + 1)
    assert status == 413
    answer = json.loads(body)
    assert answer["limit"] == MAX_REQUEST_SIZE and answer["value"] == MAX_REQUEST_SIZE + 1
    assert_still_serving(server, worker_pid)


def test_a_tiny_temperature_is_served_greedily_not_crashed(server, worker_pid):
    # 1e-40 turned float32 logits into inf/nan: every request in the batch got 500.
    params = {"max_new_tokens": 3, "temperature": 1e-40, "do_sample": True}
    status, body = server.post(MODEL, {"instances": ["The capital of France is"], "parameters": params}, timeout=120)
    greedy = {**params, "temperature": 0}
    status_greedy, body_greedy = server.post(
        MODEL, {"instances": ["The capital of France is"], "parameters": greedy}, timeout=120
    )
    assert (status, status_greedy) == (200, 200)
    assert body["predictions"] == body_greedy["predictions"]


def test_bad_and_good_requests_sharing_batches(server, worker_pid):
    """Bad requests, including those that once failed every request of their batch, queue up
    with good ones behind a long generation; the worker then takes them in shared batches."""
    good = [
        {"instances": [f"Name one colour (answer {i}):"], "parameters": {"max_new_tokens": 4, "temperature": 0}} for i in range(4)
    ]
    bad = [
        b'{"instances": ["Hello \\ud800"]}',
        b'{"instances": ["hi"], "parameters": {"max_new_tokens": ' + b"9" * 5000 + b"}}",
        with_params(bad_words=["\udc00"]),
        with_params(temperature=1e39, min_new_tokens=1),
    ]
    bodies: list[bytes] = [item for pair in zip(map(js, good), bad) for item in pair]
    dynamic = server.path == "dynamic"
    before = server.batches_received() if dynamic else 0
    occupy = threading.Thread(
        target=server.post,
        args=(MODEL, {"instances": ["Count to fifty:"], "parameters": {"max_new_tokens": 16, "min_new_tokens": 16}}),
        kwargs={"timeout": 300},
    )
    occupy.start()
    if dynamic:
        deadline = time.monotonic() + 120  # hang-guard, not a timing assertion
        while server.batches_received() == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.batches_received() == before + 1, "the long request never reached the worker"
    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(lambda body: server.post(MODEL, None, raw=body, timeout=300), bodies))
    occupy.join(timeout=300)
    assert not occupy.is_alive()
    for body, (status, answer) in zip(bodies, results):
        if body in map(js, good):
            assert status == 200, answer
            assert answer["predictions"][0]["generated_text"]
        else:
            assert status == 400, answer
            assert answer["field"] and answer["error"]
    if dynamic:  # all eight were queued while the worker was busy: they were served in shared batches
        assert server.batches_received() - before - 1 < len(bodies) / 2
    assert_still_serving(server, worker_pid)
