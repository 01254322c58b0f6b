"""Parameter values that once passed validation and then failed a whole batch's generate.

A temperature of 1e-40 or 1e39, or a repetition penalty of 1e-300, turned a row's float32
logits into inf/nan; torch.multinomial then raised and every request in the batch got 500.
A lone surrogate in a bad word made the tokenizer raise inside generate, with the same result.
"""

import math

import pytest

from handler.errors import RequestError
from handler.params import GenerationParams, ParamLimits, resolve_params


def resolve(params: dict) -> GenerationParams:
    return resolve_params([("parameters.", params)], ParamLimits())


def rejects(params: dict) -> RequestError:
    with pytest.raises(RequestError) as caught:
        resolve(params)
    return caught.value


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324, 9e-6])
def test_a_temperature_too_small_for_float32_means_greedy(temperature):
    params = resolve({"temperature": temperature, "do_sample": True})
    assert not params.sampling


def test_a_small_but_usable_temperature_still_samples():
    assert resolve({"temperature": 1e-5}).sampling


@pytest.mark.parametrize("temperature", [100.5, 1e39, 1e300])
def test_a_temperature_that_overflows_is_rejected(temperature):
    error = rejects({"temperature": temperature})
    assert error.field == "parameters.temperature" and error.status == 400
    assert "<= 100" in error.message


def test_the_largest_temperature_is_accepted():
    assert resolve({"temperature": 100}).temperature == 100.0


@pytest.mark.parametrize("penalty", [1e-300, 1e-30, 0.0009, 1000.5, 1e300])
def test_a_repetition_penalty_that_breaks_float32_logits_is_rejected(penalty):
    error = rejects({"repetition_penalty": penalty})
    assert error.field == "parameters.repetition_penalty" and error.status == 400


@pytest.mark.parametrize("penalty", [0.001, 0.5, 1.0, 1.3, 1000])
def test_usable_repetition_penalties_are_accepted(penalty):
    assert math.isclose(resolve({"repetition_penalty": penalty}).repetition_penalty, penalty)


@pytest.mark.parametrize("name", ["bad_words", "stop"])
def test_a_lone_surrogate_in_a_word_list_is_rejected(name):
    error = rejects({name: ["fine", "bad\ud800"]})
    assert error.field == f"parameters.{name}" and error.status == 400
    assert "surrogate" in error.message


def test_paired_surrogates_are_ordinary_text():
    assert resolve({"stop": ["\U0001f600"]}).stop == ("\U0001f600",)
