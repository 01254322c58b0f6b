"""Generation parameters: coercion, ranges, precedence and cross-checks, one rule per test."""

import math

import pytest

from handler.errors import RequestError
from handler.params import PARAMETER_NAMES, GenerationParams, ParamLimits, resolve_params

LIMITS = ParamLimits(max_stop_sequences=2, max_stop_length=8, max_bad_words=2, max_num_beams=4, max_num_return_sequences=3)


def resolve(params: dict, base: GenerationParams | None = None) -> GenerationParams:
    return resolve_params([("parameters.", params)], LIMITS, base)


def rejects(params: dict) -> RequestError:
    with pytest.raises(RequestError) as caught:
        resolve(params)
    return caught.value


def test_library_defaults_apply_when_nothing_is_given():
    assert resolve({}) == GenerationParams()


def test_precedence_instance_over_request_over_app_defaults():
    app = GenerationParams(max_new_tokens=10, temperature=0.5, top_k=7)
    params = resolve_params(
        [("parameters.", {"max_new_tokens": 20, "temperature": 0.9}), ("instances[0].", {"max_new_tokens": 30})],
        LIMITS,
        app,
    )
    assert (params.max_new_tokens, params.temperature, params.top_k) == (30, 0.9, 7)


def test_integral_floats_are_accepted_as_integers():
    params = resolve({"max_new_tokens": 16.0, "top_k": 5.0, "seed": 42.0})
    assert (params.max_new_tokens, params.top_k, params.seed) == (16, 5, 42)
    assert isinstance(params.max_new_tokens, int)


def test_fractional_float_for_an_integer_is_rejected():
    error = rejects({"max_new_tokens": 16.5})
    assert error.field == "parameters.max_new_tokens" and error.status == 400


@pytest.mark.parametrize("value", [True, "16", None, [16]])
def test_non_numbers_for_integers_are_rejected(value):
    assert rejects({"max_new_tokens": value}).field == "parameters.max_new_tokens"


@pytest.mark.parametrize(
    "name, value",
    [
        ("max_new_tokens", 0),
        ("min_new_tokens", -1),
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("typical_p", 0),
        ("repetition_penalty", 0),
        ("top_k", -1),
        ("num_beams", 5),
        ("num_return_sequences", 4),
        ("penalty_alpha", 1.5),
        ("seed", -1),
        ("seed", 2**64),
    ],
)
def test_out_of_range_values_name_the_parameter(name, value):
    error = rejects({name: value})
    assert error.field == f"parameters.{name}"
    assert name in error.message


def test_unknown_parameter_lists_the_known_ones():
    error = rejects({"temprature": 0.5})
    assert error.field == "parameters.temprature"
    assert error.details["known"] == list(PARAMETER_NAMES)
    assert "temperature" in error.message


def test_booleans_must_be_booleans():
    assert rejects({"details": 1}).field == "parameters.details"


def test_a_single_stop_string_becomes_a_list():
    assert resolve({"stop": "###"}).stop == ("###",)


def test_too_many_stop_strings_is_a_limit_error():
    error = rejects({"stop": ["a", "b", "c"]})
    assert (error.status, error.details["limit"], error.details["value"]) == (422, 2, 3)


def test_too_long_stop_string_is_a_limit_error():
    error = rejects({"stop": ["x" * 9]})
    assert error.status == 422 and error.details["limit"] == 8


def test_empty_stop_string_is_rejected():
    assert rejects({"stop": [""]}).status == 400


def test_stop_must_hold_strings():
    assert rejects({"stop": [1]}).field == "parameters.stop"


def test_min_new_tokens_cannot_exceed_max_new_tokens():
    assert rejects({"min_new_tokens": 9, "max_new_tokens": 8}).field == "min_new_tokens"


def test_temperature_zero_means_greedy_even_with_do_sample():
    assert not resolve({"temperature": 0, "do_sample": True}).sampling


def test_do_sample_false_means_greedy():
    assert not resolve({"temperature": 0.7, "do_sample": False}).sampling


def test_positive_temperature_samples_by_default():
    assert resolve({"temperature": 0.7}).sampling


def test_several_greedy_sequences_need_beams():
    assert rejects({"temperature": 0, "num_return_sequences": 2}).field == "num_return_sequences"
    assert resolve({"temperature": 0, "num_return_sequences": 2, "num_beams": 2}).num_return_sequences == 2


def test_contrastive_search_is_refused_with_the_reason():
    error = rejects({"penalty_alpha": 0.6, "top_k": 4})
    assert error.field == "penalty_alpha" and "contrastive" in error.message


def test_streaming_beam_search_is_refused():
    assert rejects({"num_beams": 2, "stream": True}).field == "stream"


def test_parameters_must_be_an_object():
    with pytest.raises(RequestError) as caught:
        resolve_params([("parameters.", ["max_new_tokens"])], LIMITS)
    assert caught.value.field == "parameters"


def test_logit_bias_becomes_sorted_token_id_pairs():
    from handler.params import _as_logit_bias

    assert _as_logit_bias({"7": 1, "3": -100.0}, "parameters.logit_bias", 300) == ((3, -100.0), (7, 1.0))


def test_logit_bias_naming_one_token_twice_is_refused():
    assert rejects({"logit_bias": {"1": 1, "01": 2}}).field == "parameters.logit_bias"


def test_logit_bias_over_its_limit_is_a_422():
    with pytest.raises(RequestError) as caught:
        resolve_params([("parameters.", {"logit_bias": {str(i): 1 for i in range(301)}})], ParamLimits())
    assert (caught.value.status, caught.value.details["limit"]) == (422, 300)


@pytest.mark.parametrize("value", [["1"], "1", {"-1": 1}, {"1": "x"}, {"1": math.nan}, {"1": 100.5}])
def test_bad_logit_bias_is_refused(value):
    assert rejects({"logit_bias": value}).field.startswith("parameters.logit_bias")


@pytest.mark.parametrize("name", ["presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("value", [2.01, -2.01, math.nan, "1"])
def test_token_penalties_are_within_openai_range(name, value):
    assert rejects({name: value}).field == f"parameters.{name}"


def test_top_logprobs_is_bounded_and_needs_logprobs():
    assert rejects({"logprobs": True, "top_logprobs": 21}).field == "parameters.top_logprobs"
    assert rejects({"top_logprobs": 2}).field == "top_logprobs"


def test_beam_search_refuses_token_penalties():
    assert rejects({"num_beams": 2, "frequency_penalty": 0.5}).field == "frequency_penalty"


def test_token_penalties_logit_bias_and_logprobs_resolve():
    params = resolve(
        {"presence_penalty": 0.5, "frequency_penalty": -1, "logit_bias": {"9": 5}, "logprobs": True, "top_logprobs": 3}
    )
    assert (params.presence_penalty, params.frequency_penalty, params.logit_bias) == (0.5, -1.0, ((9, 5.0),))
    assert (params.logprobs, params.top_logprobs) == (True, 3)


@pytest.mark.parametrize("value", [0, 0.0, 0.05, 1, 1.0])
def test_min_p_takes_a_number_from_zero_to_one(value):
    assert resolve({"min_p": value}).min_p == float(value)


@pytest.mark.parametrize("value", [-0.1, 1.5, math.inf, math.nan, "0.1", True, None])
def test_min_p_outside_zero_to_one_names_the_field(value):
    error = rejects({"min_p": value})
    assert error.status == 400 and error.field == "parameters.min_p"
    assert "min_p" in error.message
