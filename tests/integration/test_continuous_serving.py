"""The smollm2 app on a real TorchServe in continuous batching mode.

The worker runs asynchronously (`asyncCommunication: true`, `batchSize: 1`) and every
request joins transformers' continuous batching manager, or the classic engine for the
parameters the manager cannot honour. Concurrent requests each keep their own
parameters; greedy text equals the classic engine's, loaded here in-process.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from handler.model.loading import load_model
from handler.pipeline.prompts import encode
from handler.pipeline.shapes import RequestShape, parse_request
from handler.schedulers.dynamic import DynamicScheduler
from handler.settings import HandlerSettings
from tests.integration.test_streaming import OMELETTE, assert_streamed_before_the_end, curl_lines, stream
from tests.support.torchserve import TorchServe, app_model_config, start_app

NAME = "smollm2-continuous"


def continuous_config() -> dict[str, Any]:
    config = app_model_config("smollm2")
    config.update(asyncCommunication=True, batchSize=1)
    config["handler"]["batching"] = "continuous"
    config["handler"]["dtype"] = "float32"  # the in-process reference must decode in the server's dtype
    return config


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[TorchServe]:
    served = start_app(tmp_path_factory.mktemp("torchserve-continuous"), NAME, continuous_config())
    yield served
    served.stop()


@pytest.fixture(scope="module")
def classic(smollm2_dir: Path):
    """The classic engine with the app's own settings, and a function that completes a request body with it."""
    settings = HandlerSettings.from_config(continuous_config(), {})
    loaded = load_model(smollm2_dir, settings, torch.device("cpu"))
    engine = DynamicScheduler(loaded)
    shape = RequestShape(settings.defaults, settings.limits, settings.max_instances, settings.max_prompt_chars)

    def complete(body: dict[str, Any]) -> list[str]:
        prompts = [
            encode(instance, loaded.tokenizer, settings.prompt_template, loaded.limits)
            for instance in parse_request({"body": body}, shape)
        ]
        return [c.text for sequences in engine.generate(prompts) for c in sequences]

    return complete


def post_all(server: TorchServe, bodies: list[dict[str, Any]]) -> list[tuple[int, Any]]:
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: server.post(NAME, body, timeout=600), bodies))


def texts(body: dict[str, Any]) -> list[str]:
    return [p["generated_text"] for p in body["predictions"]]


def test_the_omelette_request_answers_in_english(server: TorchServe):
    status, body = server.post(NAME, {"instances": [OMELETTE], "parameters": {"temperature": 0}})
    assert status == 200, body
    words = {w.lower() for w in re.findall(r"[A-Za-z]+", body["predictions"][0]["generated_text"])}
    assert len(words) >= 8, body
    assert words & {"the", "and", "a", "of", "to", "in", "with", "eggs", "egg"}


def test_greedy_text_equals_the_classic_engine(server: TorchServe, classic):
    bodies = [
        {"instances": [OMELETTE], "parameters": {"temperature": 0, "max_new_tokens": 40}},
        {"instances": [OMELETTE], "parameters": {"temperature": 0, "max_new_tokens": 40, "repetition_penalty": 1.0}},
        {
            "instances": [{"messages": [{"role": "user", "content": "What is 2+2? Answer with one word."}]}],
            "parameters": {"temperature": 0, "max_new_tokens": 40, "min_new_tokens": 20},
        },
    ]
    for body in bodies:
        status, answer = server.post(NAME, body)
        assert status == 200, answer
        assert texts(answer) == classic(body), body


@pytest.mark.honours("continuous", "stop", "details", "return_full_text", "num_return_sequences")
def test_concurrent_requests_each_keep_their_own_parameters(server: TorchServe, classic):
    greedy = {"instances": [OMELETTE], "parameters": {"temperature": 0, "max_new_tokens": 30}}
    reference = classic(greedy)[0]
    stop = reference[len(reference) // 2 : len(reference) // 2 + 4]
    bodies = [
        {"instances": ["Name a colour:"], "parameters": {"max_new_tokens": 3, "details": True}},
        {"instances": [OMELETTE], "parameters": {"max_new_tokens": 48, "min_new_tokens": 48, "details": True}},
        {"instances": [OMELETTE], "parameters": {"temperature": 0, "max_new_tokens": 30, "stop": [stop], "details": True}},
        {
            "instances": ["Count to ten:"],
            "parameters": {"max_new_tokens": 12, "temperature": 1.2, "top_k": 20, "num_return_sequences": 2},
        },
        {"instances": ["Write a haiku:"], "parameters": {"max_new_tokens": 10, "return_full_text": True}},
        {"instances": ["The sky is", "Grass is"], "parameters": {"max_new_tokens": 6, "details": True}},
        greedy,
    ]
    results = post_all(server, bodies)
    assert [status for status, _ in results] == [200] * len(bodies), results
    answers = [body for _, body in results]
    short = answers[0]["predictions"][0]
    assert short["generated_tokens"] <= 3 and short["finish_reason"] in ("length", "eos")
    long = answers[1]["predictions"][0]
    assert long["generated_tokens"] == 48 and long["finish_reason"] == "length"
    stopped = answers[2]["predictions"][0]
    assert stopped["finish_reason"] == "stop" and stopped["generated_text"] == reference[: reference.find(stop)]
    assert len(answers[3]["predictions"]) == 2
    assert answers[4]["predictions"][0]["generated_text"].startswith("Write a haiku:")
    assert [p["prompt_tokens"] > 0 for p in answers[5]["predictions"]] == [True, True]
    assert texts(answers[6]) == [reference]


def test_a_seeded_request_gives_the_same_text_alone_and_among_others(server: TorchServe):
    seeded = {"instances": ["Tell me a story:"], "parameters": {"max_new_tokens": 20, "temperature": 1.0, "seed": 1234}}
    status, alone = server.post(NAME, seeded)
    assert status == 200, alone
    neighbours = [{"instances": [f"Say something about {n}:"], "parameters": {"max_new_tokens": 25}} for n in range(4)]
    results = post_all(server, [neighbours[0], neighbours[1], seeded, neighbours[2], neighbours[3]])
    assert [status for status, _ in results] == [200] * 5
    assert texts(results[2][1]) == texts(alone)


def test_an_invalid_request_among_valid_ones_gets_its_own_error(server: TorchServe):
    valid = {"instances": ["Hello"], "parameters": {"max_new_tokens": 8, "temperature": 0}}
    bodies = [
        valid,
        {"instances": ["x"], "parameters": {"temperature": -1}},
        valid,
        {"instances": ["x"], "parameters": {"max_new_tokens": 10**6}},
        valid,
    ]
    results = post_all(server, bodies)
    assert [status for status, _ in results] == [200, 400, 200, 422, 200], results
    assert results[1][1]["field"] == "parameters.temperature"
    assert results[3][1]["field"] == "max_new_tokens"
    assert all(texts(results[i][1])[0] for i in (0, 2, 4))


LONG_STREAM = {"instances": [OMELETTE], "parameters": {"max_new_tokens": 40, "min_new_tokens": 40, "stream": True}}


def test_chunks_arrive_while_the_generation_runs(server: TorchServe):
    assert_streamed_before_the_end(stream(server.port, NAME, LONG_STREAM))


def test_curl_no_buffer_prints_lines_as_they_come(server: TorchServe):
    open_at_first_line, lines = curl_lines(server.port, NAME, LONG_STREAM)
    assert len(lines) > 3
    assert open_at_first_line, "curl printed its first line only once the response had ended"


def test_concurrent_streams_stay_apart(server: TorchServe):
    bodies = [
        {"instances": [f"List {n} fruits:"], "parameters": {"max_new_tokens": 16 + 8 * n, "temperature": 0, "stream": True}}
        for n in range(3)
    ]
    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(lambda body: stream(server.port, NAME, body), bodies))
    for result in results:
        assert result.status == 200
        assert "".join(c["text"] for c in result.chunks) == result.final["predictions"][0]["generated_text"]


def test_a_seeded_stream_from_the_classic_engine(server: TorchServe):
    body = {"instances": [OMELETTE], "parameters": {"max_new_tokens": 30, "min_new_tokens": 30, "seed": 7, "stream": True}}
    assert_streamed_before_the_end(stream(server.port, NAME, body))
