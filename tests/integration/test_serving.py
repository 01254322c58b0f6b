"""The smollm2 app served by a real TorchServe, as `make serve` runs it."""

import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.torchserve import TorchServe

APP = "smollm2"
OMELETTE = {"instances": ["How to prepare a spanish omelette:"], "parameters": {"temperature": 0}}


def english_words(text: str) -> set[str]:
    return {w.lower() for w in re.findall(r"[A-Za-z]+", text)}


def test_the_omelette_request_answers_in_english(smollm2_server: TorchServe):
    status, body = smollm2_server.post(APP, OMELETTE)
    assert status == 200
    (prediction,) = body["predictions"]
    words = english_words(prediction["generated_text"])
    assert len(words) >= 8, prediction
    assert words & {"the", "and", "a", "of", "to", "in", "with"}


def test_a_plain_text_body(smollm2_server: TorchServe):
    status, body = smollm2_server.post(APP, None, raw=b"The sky is", content_type="text/plain")
    assert status == 200, body
    # The app's sampled defaults apply (a text body carries no parameters): only the shape is certain.
    [prediction] = body["predictions"]
    assert isinstance(prediction["generated_text"], str)


def test_a_form_encoded_body_gets_a_hint_not_silence(smollm2_server: TorchServe):
    status, body = smollm2_server.post(APP, None, raw=b"The sky is", content_type="application/x-www-form-urlencoded")
    assert status == 400 and "text/plain" in body["error"]


def test_a_concurrent_burst_of_valid_and_invalid_requests(smollm2_server: TorchServe):
    valid = [
        {"instances": [f"Write one word about the number {i}:"], "parameters": {"max_new_tokens": 4, "temperature": 0}}
        for i in range(6)
    ]
    invalid = [
        {"instances": []},
        {"instances": ["x"], "parameters": {"temperature": -1}},
        {"instances": ["x"], "parameters": {"max_new_tokens": 10**6}},
        {"instances": ["x"], "parameters": {"colour": "red"}},
        {"instances": [{"messages": [{"role": "wizard", "content": "x"}]}]},
        {"instances": [7]},
    ]
    bodies = [body for pair in zip(valid, invalid) for body in pair]
    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(lambda body: smollm2_server.post(APP, body, timeout=600), bodies))
    for body, (status, answer) in zip(bodies, results):
        if body in valid:
            assert status == 200, answer
            assert answer["predictions"][0]["generated_text"]
        else:
            assert 400 <= status < 500, (body, status, answer)
            assert answer["error"] and answer["field"]


def test_a_chat_message_instance(smollm2_server: TorchServe):
    status, body = smollm2_server.post(
        APP,
        {
            "instances": [{"messages": [{"role": "user", "content": "What is the capital of France?"}]}],
            "parameters": {"max_new_tokens": 20, "temperature": 0},
        },
    )
    assert status == 200
    assert "paris" in body["predictions"][0]["generated_text"].lower()


@pytest.mark.honours("continuous", "stop", "details")
def test_a_stop_sequence_is_honoured(smollm2_server: TorchServe):
    request = {"instances": ["Count from one to ten in words: one, two,"], "parameters": {"max_new_tokens": 30, "temperature": 0}}
    status, body = smollm2_server.post(APP, request)
    assert status == 200
    free_text = body["predictions"][0]["generated_text"]
    assert "five" in free_text
    request["parameters"].update(stop=["five"], details=True)
    status, body = smollm2_server.post(APP, request)
    (prediction,) = body["predictions"]
    assert status == 200
    assert prediction["finish_reason"] == "stop"
    assert "five" not in prediction["generated_text"]
    assert free_text.startswith(prediction["generated_text"])


def test_our_metrics_appear_on_the_metrics_port(smollm2_server: TorchServe):
    assert smollm2_server.post(APP, {"instances": ["Hi"], "parameters": {"max_new_tokens": 3}})[0] == 200
    with urllib.request.urlopen(f"{smollm2_server.metrics}/metrics", timeout=30) as response:
        exposition = response.read().decode()
    for name in ("PromptTokens", "GeneratedTokens", "GenerationTokensPerSecond", "TimeToFirstTokenMs", "TimePerOutputTokenMs"):
        assert re.search(rf'^{name}\{{.*ModelName="{APP}".*\}} [0-9.]+', exposition, re.MULTILINE), name
