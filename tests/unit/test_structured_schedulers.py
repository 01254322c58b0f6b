"""Structured output on both schedulers, on a tiny random Llama: same tokens, stop at completion, neighbours untouched.

The continuous manager's constrained output is compared with the dynamic scheduler's, so the
constraint is honoured exactly on both paths; prompts go through the real pipeline
(`Service.compile_formats` compiles their formats).
"""

import asyncio
import json
from pathlib import Path

import jsonschema
import pytest
import torch

from handler.decoding.stopping import FinishReason
from handler.errors import RequestError
from handler.model.loading import LoadedModel, load_model
from handler.params import ParamLimits, resolve_params
from handler.pipeline.prompts import Prompt
from handler.schedulers.base import unhonoured
from handler.schedulers.continuous import ContinuousScheduler
from handler.schedulers.dynamic import DynamicScheduler
from handler.service import Service
from handler.settings import ContinuousBatchingSettings, HandlerSettings, StructuredOutputSettings
from tests.support.prompts import make_prompt

CACHE = ContinuousBatchingSettings(num_blocks=48, page_size=16, max_batch_tokens=256)
SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "enum": ["yes", "no"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 9},
        "flags": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 2},
    },
    "required": ["answer", "score", "flags"],
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}}


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    return load_model(tiny_model_dir, HandlerSettings(dtype="float32", max_total_tokens=200), torch.device("cpu"))


@pytest.fixture(scope="module")
def service(loaded: LoadedModel):
    settings = HandlerSettings(max_total_tokens=200, structured_output=StructuredOutputSettings(max_mask_ms=1000))
    served = Service(settings, loaded, DynamicScheduler(loaded))
    yield served
    served.stop()


@pytest.fixture(scope="module")
def continuous(loaded: LoadedModel):
    served = ContinuousScheduler(loaded, CACHE)
    yield served
    served.stop()


def prompts(service: Service, *cases: tuple[str, dict]) -> list[Prompt]:
    prepared = service.compile_formats([make_prompt(service.loaded, text, **params) for text, params in cases])
    assert not isinstance(prepared, RequestError), prepared
    return prepared


def complete(scheduler, batch: list[Prompt]):
    return [sequences[0] for sequences in asyncio.run(scheduler.complete(batch))]


CONSTRAINED = [
    ("Answer:", {"max_new_tokens": 60, "temperature": 0, "response_format": FORMAT}),
    ("Another prompt, longer than the first:", {"max_new_tokens": 60, "temperature": 0, "response_format": FORMAT}),
    ("Digits:", {"max_new_tokens": 10, "temperature": 0, "response_format": {"type": "regex", "pattern": "[0-9]{4}"}}),
]
PLAIN = [("Once upon a time", {"max_new_tokens": 12, "temperature": 0})]


def test_both_schedulers_honour_response_format():
    params = resolve_params([("parameters.", {"response_format": FORMAT, "temperature": 0})], ParamLimits())
    assert unhonoured(params, ContinuousScheduler.honours) is None
    assert unhonoured(params, DynamicScheduler.honours) is None


@pytest.mark.honours("dynamic", "response_format")
def test_a_constrained_greedy_answer_validates_and_stops(service):
    completions = complete(service.scheduler, prompts(service, *CONSTRAINED))
    for completion in completions[:2]:
        jsonschema.validate(json.loads(completion.text), SCHEMA)
    assert len(completions[2].text) == 4 and completions[2].text.isdigit()
    assert [c.finish_reason for c in completions] == [FinishReason.STOP] * 3
    assert all(c.error is None for c in completions)


@pytest.mark.honours("continuous", "response_format")
def test_the_manager_writes_the_dynamic_schedulers_tokens_beside_an_unconstrained_neighbour(service, continuous):
    batch = prompts(service, *CONSTRAINED, *PLAIN)
    dynamic = complete(service.scheduler, batch)
    served = complete(continuous, batch)
    assert [c.text for c in served] == [c.text for c in dynamic]
    assert [c.finish_reason for c in served] == [c.finish_reason for c in dynamic]
    assert not continuous.front_lists and not continuous.processor_lists


@pytest.mark.parametrize("path", ["dynamic", "continuous"])
def test_an_unconstrained_neighbour_writes_what_it_writes_alone(service, continuous, path):
    scheduler = service.scheduler if path == "dynamic" else continuous
    alone = complete(scheduler, prompts(service, *PLAIN))
    together = complete(scheduler, prompts(service, *CONSTRAINED, *PLAIN))
    assert together[-1].text == alone[0].text


@pytest.mark.parametrize("path", ["dynamic", "continuous"])
@pytest.mark.honours("dynamic", "max_new_tokens")
@pytest.mark.honours("continuous", "max_new_tokens")
def test_max_new_tokens_cuts_a_constrained_answer_as_length(service, continuous, path):
    scheduler = service.scheduler if path == "dynamic" else continuous
    cut = ("Answer:", {"max_new_tokens": 3, "temperature": 0, "response_format": FORMAT})
    [completion] = complete(scheduler, prompts(service, cut))
    assert completion.finish_reason == FinishReason.LENGTH and completion.generated_tokens == 3


def test_sampled_constrained_answers_validate(service):
    cases = [
        ("Answer:", {"max_new_tokens": 60, "temperature": 1.0, "seed": seed, "response_format": FORMAT}) for seed in range(4)
    ]
    for completion in complete(service.scheduler, prompts(service, *cases)):
        jsonschema.validate(json.loads(completion.text), SCHEMA)


def test_a_compile_failure_is_its_own_requests_error(service):
    bad = service.compile_formats([make_prompt(service.loaded, "x", response_format={"type": "regex", "pattern": "(x"})])
    assert isinstance(bad, RequestError) and bad.status == 400 and bad.field == "parameters.response_format.pattern"


def test_a_failing_constraint_fails_its_request_only(loaded):
    """A 1 ms budget on an ambiguous regex: its request gets the 422, the neighbour its text."""
    settings = HandlerSettings(max_total_tokens=200, structured_output=StructuredOutputSettings(max_mask_ms=1))
    tight = Service(settings, loaded, DynamicScheduler(loaded))
    try:
        ambiguous = {"type": "regex", "pattern": "((a+)+)+b"}
        slow = ("a", {"max_new_tokens": 150, "temperature": 0, "response_format": ambiguous})
        first = tight.compile_formats([make_prompt(loaded, slow[0], **slow[1])])
        second = tight.compile_formats([make_prompt(loaded, PLAIN[0][0], **PLAIN[0][1])])
        answers = asyncio.run(tight.answer([first, second]))
        alone = asyncio.run(tight.answer([tight.compile_formats([make_prompt(loaded, PLAIN[0][0], **PLAIN[0][1])])]))
    finally:
        tight.stop()
    assert isinstance(answers[0], RequestError) and answers[0].status == 422, answers[0]
    assert answers[0].details["limit_name"] == "structured_output.max_mask_ms"
    assert answers[1][0][1][0].text == alone[0][0][1][0].text
