"""Request shapes: every accepted body, and every way a body can be wrong."""

import json

import pytest

from handler.errors import RequestError
from handler.params import GenerationParams, ParamLimits
from handler.pipeline.shapes import RequestShape, parse_request

APP_DEFAULTS = GenerationParams(max_new_tokens=32, temperature=0.7)
SHAPE = RequestShape(defaults=APP_DEFAULTS, limits=ParamLimits(), max_instances=4, max_prompt_chars=100)


def parse(body):
    return parse_request({"body": body}, SHAPE)


def rejects(body) -> RequestError:
    with pytest.raises(RequestError) as caught:
        parse(body)
    return caught.value


def test_vertex_string_instances_take_the_request_parameters():
    instances = parse({"instances": ["a", "b"], "parameters": {"max_new_tokens": 8}})
    assert [i.text for i in instances] == ["a", "b"]
    assert all(i.params.max_new_tokens == 8 and i.params.temperature == 0.7 for i in instances)


def test_vertex_object_instances_accept_prompt_inputs_and_messages():
    instances = parse({"instances": [{"prompt": "p"}, {"inputs": "i"}, {"messages": [{"role": "user", "content": "m"}]}]})
    assert instances[0].text == "p" and instances[1].text == "i"
    assert instances[2].messages == ({"role": "user", "content": "m"},)


def test_instance_overrides_win_over_request_parameters():
    instances = parse({"instances": [{"prompt": "p", "max_new_tokens": 4}, "q"], "parameters": {"max_new_tokens": 8}})
    assert [i.params.max_new_tokens for i in instances] == [4, 8]


def test_app_defaults_apply_without_parameters():
    assert parse({"instances": ["a"]})[0].params == APP_DEFAULTS


def test_tgi_shape_with_a_string_or_a_list():
    assert [i.text for i in parse({"inputs": "x", "parameters": {"max_new_tokens": 2}})] == ["x"]
    assert [i.text for i in parse({"prompt": ["x", "y"]})] == ["x", "y"]


def test_plain_text_body_is_one_prompt():
    (instance,) = parse_request({"body": b"How to prepare a spanish omelette:"}, SHAPE)
    assert instance.text == "How to prepare a spanish omelette:"
    assert instance.params == APP_DEFAULTS


def test_json_bytes_are_decoded():
    (instance,) = parse(json.dumps({"instances": ["a"]}).encode())
    assert instance.text == "a"


def test_torchserve_data_key_is_read_too():
    (instance,) = parse_request({"data": {"instances": ["a"]}}, SHAPE)
    assert instance.text == "a"


@pytest.mark.parametrize(
    "body, field",
    [
        (b'{"instances": [', "body"),
        (b"\xff\xfe\x00", "body"),
        (b'{"instances": ["a"], "parameters": {"temperature": NaN}}', "body"),
        (None, "body"),
        (42, "body"),
        (["a"], "body"),
        ({"instances": []}, "instances"),
        ({"instances": "a"}, "instances"),
        ({"instances": ["a"] * 5}, "instances"),
        ({"instances": [""]}, "instances[0]"),
        ({"instances": [3]}, "instances[0]"),
        ({"instances": [{"prompt": "a", "messages": []}]}, "instances[0]"),
        ({"instances": [{"text": "a"}]}, "instances[0]"),
        ({"instances": [{"prompt": "a", "colour": 1}]}, "instances[0].colour"),
        ({"instances": ["a"], "temperature": 0.5}, "temperature"),
        ({"instances": ["a"], "parameters": {"top_k": "5"}}, "parameters.top_k"),
        ({"instances": ["a"], "parameters": 5}, "parameters"),
        ({"instances": [{"messages": [{"role": "wizard", "content": "x"}]}]}, "instances[0].messages[0].role"),
        ({"instances": [{"messages": [{"role": "user"}]}]}, "instances[0].messages[0]"),
        ({"instances": [{"messages": []}]}, "instances[0].messages"),
        ({"inputs": "a", "prompt": "b"}, "body"),
        ({"inputs": 5}, "inputs"),
        ({"instances": ["x" * 101]}, "instances[0]"),
    ],
)
def test_bad_bodies_are_rejected_naming_the_field(body, field):
    error = rejects(body)
    assert error.field == field
    assert 400 <= error.status < 500
    assert json.loads(error.json())["field"] == field


def test_too_many_instances_is_a_limit_error_with_the_limit():
    error = rejects({"instances": ["a"] * 5})
    assert (error.status, error.details) == (422, {"limit": 4, "value": 5})


def test_deeply_nested_json_is_rejected():
    assert rejects(b"[" * 100_000 + b"]" * 100_000).field == "body"


def test_parameter_hint_for_misplaced_parameters():
    assert "inside 'parameters'" in rejects({"instances": ["a"], "max_new_tokens": 5}).message


def test_a_form_encoded_body_is_refused_with_the_way_out():
    for fields in ({}, {"a": b"1"}):
        with pytest.raises(RequestError) as caught:
            parse_request(fields, SHAPE)
        assert "text/plain" in caught.value.message and caught.value.status == 400
