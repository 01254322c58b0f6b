"""Anthropic Messages bodies into instances and parameters: each rule in a few lines, errors naming Anthropic's field."""

import pytest

from handler.api.anthropic.parsing import COUNT_TOKENS, MESSAGES, parse_anthropic
from handler.errors import RequestError
from handler.params import GenerationParams, ParamLimits
from handler.pipeline.shapes import RequestShape

SHAPE = RequestShape(defaults=GenerationParams(max_new_tokens=32), limits=ParamLimits(), max_instances=4, max_prompt_chars=200)
USER = [{"role": "user", "content": "Hi"}]


def messages(**fields):
    return parse_anthropic(MESSAGES, {"model": "smollm2", "max_tokens": 16, "messages": USER, **fields}, SHAPE)


def refused(**fields) -> RequestError:
    body = {"model": "smollm2", "max_tokens": 16, "messages": USER, **fields}
    body = {key: value for key, value in body.items() if value is not DROP}
    with pytest.raises(RequestError) as caught:
        parse_anthropic(MESSAGES, body, SHAPE)
    return caught.value


DROP = object()


def test_a_body_becomes_one_chat_instance_under_anthropics_names():
    request = messages()
    (instance,) = request.instances
    assert instance.messages == ({"role": "user", "content": "Hi"},) and not instance.prefill
    assert (request.model, request.stream, instance.fields.prompt) == ("smollm2", False, "messages")
    assert instance.params.max_new_tokens == 16 and instance.fields.parameter("max_new_tokens") == "max_tokens"
    assert instance.fields.parameter("stop") == "stop_sequences"


def test_max_tokens_is_required():
    error = refused(max_tokens=DROP)
    assert error.field == "max_tokens" and "required" in error.message


def test_the_sampling_fields_map_to_the_native_parameters():
    params = messages(temperature=0, top_p=0.5, top_k=7, stop_sequences=["\n\n"], stream=True).instances[0].params
    assert (params.temperature, params.top_p, params.top_k, params.stop, params.stream) == (0, 0.5, 7, ("\n\n",), True)
    assert params.return_full_text is False


def test_system_as_a_string_or_text_blocks_is_the_first_turn():
    blocks = [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind.", "cache_control": {"type": "ephemeral"}}]
    assert messages(system="Be brief.").instances[0].messages[0] == {"role": "system", "content": "Be brief."}
    assert messages(system=blocks).instances[0].messages[0] == {"role": "system", "content": "Be brief.\nBe kind."}
    assert messages(system="").instances[0].messages == ({"role": "user", "content": "Hi"},)


def test_text_blocks_join_and_consecutive_turns_of_one_role_merge():
    turns = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "user", "content": "c"},
    ]
    assert messages(messages=turns).instances[0].messages == ({"role": "user", "content": "a\nb\n\nc"},)


def test_a_last_assistant_turn_is_a_prefill():
    turns = [*USER, {"role": "assistant", "content": "Hello,"}]
    (instance,) = messages(messages=turns).instances
    assert instance.prefill and instance.messages[-1] == {"role": "assistant", "content": "Hello,"}


@pytest.mark.parametrize("field", ["thinking", "mcp_servers", "service_tier"])
def test_fields_not_served_yet_are_refused_by_name(field):
    error = refused(**{field: {}})
    assert error.field == field and "not supported" in error.message


@pytest.mark.parametrize("kind", ["image", "document", "thinking", "server_tool_use"])
def test_blocks_not_served_yet_are_refused_by_name(kind):
    error = refused(messages=[{"role": "user", "content": [{"type": kind}]}])
    assert error.field == "messages[0].content[0].type" and kind in error.message


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"colour": "red"}, "colour"),
        ({"messages": []}, "messages"),
        ({"messages": "Hi"}, "messages"),
        ({"messages": ["Hi"]}, "messages[0]"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x", "name": "eve"}]}, "messages[0].name"),
        ({"messages": [{"role": "user", "content": []}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "txt", "text": "x"}]}]}, "messages[0].content[0].type"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0].text"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "y": 1}]}]}, "messages[0].content[0].y"),
        ({"messages": [{"role": "user", "content": "   "}]}, "messages[0].content"),
        ({"system": 5}, "system"),
        ({"system": [{"type": "image"}]}, "system[0].type"),
        ({"temperature": 1.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"stop_sequences": "Paris"}, "stop_sequences"),
        ({"stop_sequences": [""]}, "stop_sequences"),
        ({"metadata": {"user_id": 5}}, "metadata.user_id"),
        ({"metadata": {"session": "x"}}, "metadata.session"),
        ({"metadata": "eve"}, "metadata"),
        ({"stream": "yes"}, "stream"),
        ({"model": 5}, "model"),
        ({"anthropic_version": 1}, "anthropic_version"),
    ],
)
def test_a_bad_field_is_refused_naming_it(fields, field):
    error = refused(**fields)
    assert error.field == field and field in error.message and error.status == 400


def test_too_many_stop_sequences_is_a_limit():
    error = refused(stop_sequences=[f"s{i}" for i in range(10)])
    assert (error.status, error.field) == (422, "stop_sequences")


def test_a_body_that_is_not_an_object_is_refused():
    with pytest.raises(RequestError) as caught:
        parse_anthropic(MESSAGES, ["Hi"], SHAPE)
    assert caught.value.field == "body"


def test_vertexs_anthropic_version_is_accepted_and_the_model_optional():
    request = parse_anthropic(MESSAGES, {"anthropic_version": "vertex-2023-10-16", "max_tokens": 4, "messages": USER}, SHAPE)
    assert request.model is None


def test_count_tokens_takes_the_conversation_only():
    request = parse_anthropic(COUNT_TOKENS, {"model": "m", "system": "s", "messages": USER}, SHAPE)
    assert len(request.instances[0].messages) == 2 and request.instances[0].params.max_new_tokens == 1
    with pytest.raises(RequestError) as caught:
        parse_anthropic(COUNT_TOKENS, {"model": "m", "messages": USER, "max_tokens": 5}, SHAPE)
    assert caught.value.field == "max_tokens"
