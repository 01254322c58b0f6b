"""The TorchServe adapter driven through its lifecycle with TorchServe's own Context class.

One batch holds valid and invalid requests: each invalid one gets its own 4xx and JSON
body, the valid ones are served. The real SmolLM2 checkpoint answers the omelette prompt.
"""

import logging
from pathlib import Path

import pytest
from ts.context import Context

from handler.torchserve_handler import LLMHandler
from tests.support.context import make_context, run_batch

OMELETTE = "How to prepare a spanish omelette:"


@pytest.fixture(scope="module")
def smollm2_handler(smollm2_dir: Path, tmp_path_factory) -> tuple[LLMHandler, Context]:
    model_dir = tmp_path_factory.mktemp("archive")
    for item in smollm2_dir.iterdir():
        (model_dir / item.name).symlink_to(item)
    context = make_context("smollm2", model_dir, {"handler": {"defaults": {"max_new_tokens": 40, "temperature": 0}}})
    handler = LLMHandler()
    handler.initialize(context)
    return handler, context


def test_real_smollm2_answers_the_omelette_prompt_in_english(smollm2_handler):
    handler, context = smollm2_handler
    [(status, body)] = run_batch(handler, context, [{"instances": [OMELETTE], "parameters": {"details": True}}])
    assert status == 200
    (prediction,) = body["predictions"]
    words = prediction["generated_text"].lower().split()
    assert len(words) >= 10
    assert {"egg", "eggs", "pan", "onion", "onions", "potatoes", "oil"} & {w.strip(".,:;*-") for w in words}
    assert prediction["finish_reason"] in ("length", "eos")
    assert prediction["prompt_tokens"] > 0 and 0 < prediction["generated_tokens"] <= 40


def test_a_mixed_batch_answers_each_request_on_its_own(smollm2_handler):
    handler, context = smollm2_handler
    results = run_batch(
        handler,
        context,
        [
            {"instances": ["The capital of France is"], "parameters": {"max_new_tokens": 5}},
            {"instances": []},
            b'{"instances": ["unterminated',
            {"instances": [{"messages": [{"role": "user", "content": "Say hello."}]}], "parameters": {"max_new_tokens": 8}},
            {"instances": ["x"], "parameters": {"max_new_tokens": 100_000}},
        ],
    )
    statuses = [status for status, _ in results]
    assert statuses == [200, 400, 400, 200, 422]
    assert results[1][1]["field"] == "instances"
    assert results[4][1]["field"] == "max_new_tokens" and results[4][1]["limit"] == 8192
    assert results[0][1]["predictions"][0]["generated_text"].strip()
    assert results[3][1]["predictions"][0]["generated_text"].strip()


def test_status_does_not_leak_into_the_next_batch(smollm2_handler):
    handler, context = smollm2_handler
    run_batch(handler, context, [{"instances": []}])
    [(status, _)] = run_batch(handler, context, [{"instances": ["Hi"], "parameters": {"max_new_tokens": 2}}])
    assert status == 200


@pytest.mark.honours("dynamic", "return_full_text")
def test_return_full_text_prepends_the_prompt(smollm2_handler):
    handler, context = smollm2_handler
    [(status, body)] = run_batch(
        handler, context, [{"instances": ["Once upon a time"], "parameters": {"max_new_tokens": 4, "return_full_text": True}}]
    )
    assert status == 200 and body["predictions"][0]["generated_text"].startswith("Once upon a time")


def test_generation_metrics_are_reported(smollm2_handler, caplog):
    handler, context = smollm2_handler
    with caplog.at_level(logging.INFO, logger="ts.metrics.caching_metric"):
        run_batch(handler, context, [{"instances": ["Hi"], "parameters": {"max_new_tokens": 3}}])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[METRICS]")]
    emitted = {line[len("[METRICS]") :].split(".")[0]: line for line in lines}
    assert {"PromptTokens", "GeneratedTokens", "GenerationTokensPerSecond", "TimeToFirstTokenMs"} <= set(emitted)
    assert "GeneratedTokens.Count:3|#ModelName:smollm2" in emitted["GeneratedTokens"]
