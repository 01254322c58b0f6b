"""Bodies that once escaped request validation as exceptions and failed their whole batch (503)."""

import pytest

from handler.errors import RequestError
from handler.params import GenerationParams, ParamLimits
from handler.pipeline.shapes import RequestShape, parse_request

SHAPE = RequestShape(defaults=GenerationParams(), limits=ParamLimits(), max_instances=4, max_prompt_chars=1000)


def rejects(body) -> RequestError:
    with pytest.raises(RequestError) as caught:
        parse_request({"body": body}, SHAPE)
    return caught.value


def test_an_integer_too_long_for_python_is_a_400_not_a_crash():
    # Python refuses to convert integers of over 4300 digits (a ValueError, not a JSONDecodeError).
    body = b'{"instances": ["hi"], "parameters": {"max_new_tokens": ' + b"9" * 5000 + b"}}"
    error = rejects(body)
    assert error.status == 400 and error.field == "body"
    assert "4300 digits" in error.message


@pytest.mark.parametrize(
    "body, field",
    [
        ({"instances": ["a\ud800b"]}, "instances[0]"),
        ({"instances": [{"prompt": "\udfff"}]}, "instances[0].prompt"),
        ({"inputs": ["ok", "\ud83d"]}, "inputs[1]"),
        ({"instances": [{"messages": [{"role": "user", "content": "x\udc00"}]}]}, "instances[0].messages[0].content"),
    ],
)
def test_a_lone_surrogate_in_a_prompt_names_its_field(body, field):
    # TorchServe's json.loads turns the escape "\ud800" into a str that tokenizers refuse.
    error = rejects(body)
    assert error.status == 400 and error.field == field
    assert "surrogate" in error.message


def test_a_lone_surrogate_escape_in_raw_json_is_rejected():
    error = rejects(b'{"instances": ["\\ud800"]}')
    assert error.field == "instances[0]"


def test_an_emoji_written_as_a_surrogate_pair_is_accepted():
    (instance,) = parse_request({"body": b'{"instances": ["\\ud83d\\ude00"]}'}, SHAPE)
    assert instance.text == "\U0001f600"
