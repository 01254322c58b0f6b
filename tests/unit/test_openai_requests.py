"""OpenAI bodies into instances and parameters: each rule in a few lines, errors naming OpenAI's field."""

import pytest

from handler.api.openai.parsing import CHAT, COMPLETIONS, parse_openai
from handler.errors import RequestError
from handler.params import GenerationParams, ParamLimits
from handler.pipeline.shapes import RequestShape

SHAPE = RequestShape(defaults=GenerationParams(max_new_tokens=32), limits=ParamLimits(), max_instances=4, max_prompt_chars=200)
USER = [{"role": "user", "content": "Hi"}]


def chat(**fields):
    return parse_openai(CHAT, {"model": "smollm2", "messages": USER, **fields}, SHAPE)


def completions(**fields):
    return parse_openai(COMPLETIONS, {"model": "smollm2", "prompt": "Once", **fields}, SHAPE)


def refused(endpoint, body) -> RequestError:
    with pytest.raises(RequestError) as caught:
        parse_openai(endpoint, body, SHAPE)
    return caught.value


def chat_refused(**fields) -> RequestError:
    return refused(CHAT, {"model": "smollm2", "messages": USER, **fields})


def test_a_chat_body_becomes_one_chat_instance():
    request = chat()
    (instance,) = request.instances
    assert instance.messages == ({"role": "user", "content": "Hi"},)
    assert (request.endpoint, request.model, instance.fields.prompt, request.stream) == (CHAT, "smollm2", "messages", False)


def test_the_app_defaults_apply_when_the_body_leaves_a_parameter_out():
    assert chat().instances[0].params.max_new_tokens == 32


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
def test_both_length_fields_set_max_new_tokens(name):
    assert chat(**{name: 5}).instances[0].params.max_new_tokens == 5


def test_sampling_fields_map_onto_the_native_parameters():
    params = chat(temperature=0.5, top_p=0.9, n=3, seed=7, stop="\n").instances[0].params
    assert (params.temperature, params.top_p, params.num_return_sequences, params.seed, params.stop) == (0.5, 0.9, 3, 7, ("\n",))


def test_stop_may_be_a_list():
    assert chat(stop=["a", "b"]).instances[0].params.stop == ("a", "b")


def test_null_means_not_given():
    params = chat(temperature=None, tools=None, max_tokens=None, user=None).instances[0].params
    assert params == GenerationParams(max_new_tokens=32)


def test_user_is_accepted_and_ignored():
    assert chat(user="someone").instances == chat().instances


def test_content_as_text_parts_is_joined():
    body = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    assert chat(messages=body).instances[0].messages == ({"role": "user", "content": "one\ntwo"},)


def test_system_user_assistant_roles_and_developer_as_system():
    body = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    assert [m["role"] for m in chat(messages=body).instances[0].messages] == ["system", "user", "assistant", "user"]


def test_stream_and_include_usage():
    request = chat(stream=True, stream_options={"include_usage": True})
    assert request.stream and request.include_usage


def test_stream_options_without_stream_is_refused():
    assert chat_refused(stream_options={"include_usage": True}).field == "stream_options"


def test_stream_options_unknown_key_is_refused():
    assert (
        chat_refused(stream=True, stream_options={"continuous_usage_stats": True}).field
        == "stream_options.continuous_usage_stats"
    )


@pytest.mark.parametrize("name", ["functions", "function_call", "audio", "modalities"])
def test_known_but_unsupported_fields_get_400_naming_them(name):
    error = chat_refused(**{name: [{"type": "function"}]})
    assert (error.status, error.field, error.details["code"]) == (400, name, "unsupported_parameter")
    assert name in error.message


def test_unknown_fields_get_400_naming_them():
    error = chat_refused(temprature=0.5)
    assert (error.status, error.field, error.details["code"]) == (400, "temprature", "unknown_parameter")


def test_response_format_text_is_no_constraint_and_json_maps_onto_structured_output():
    assert chat(response_format={"type": "text"}).instances == chat().instances
    [instance] = chat(response_format={"type": "json_object"}).instances
    assert instance.params.response_format.kind == "json_object"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    [instance] = chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}).instances
    assert instance.params.response_format.kind == "json_schema"
    assert chat_refused(response_format={"type": "regex", "pattern": "a"}).field == "response_format"
    assert chat_refused(response_format={"type": "json_schema"}).field.startswith("response_format")


def test_errors_name_openai_fields_not_native_ones():
    assert chat_refused(max_tokens=0).field == "max_tokens"
    assert "max_tokens must be" in chat_refused(max_tokens=0).message
    assert chat_refused(max_completion_tokens=-1).field == "max_completion_tokens"
    assert chat_refused(n=99).field == "n"
    assert chat_refused(temperature=-1).field == "temperature"


def test_native_bounds_are_shared():
    assert chat_refused(top_p=0).field == "top_p"
    assert chat_refused(seed=-1).field == "seed"
    assert chat_refused(stop=["a"] * 5).status == 422


def test_native_cross_checks_name_openai_fields():
    error = chat_refused(n=2, temperature=0)
    assert error.field == "n" and error.message.startswith("n > 1")


def test_both_length_fields_together_are_refused():
    assert chat_refused(max_tokens=5, max_completion_tokens=5).field == "max_completion_tokens"


@pytest.mark.parametrize("name, value", [("presence_penalty", 3.0), ("frequency_penalty", -2.5)])
def test_penalties_are_bounded_as_openai_bounds_them(name, value):
    assert chat_refused(**{name: value}).field == name


def test_logit_bias_values_are_bounded():
    assert chat_refused(logit_bias={"5": 101}).field == "logit_bias.5"
    assert chat_refused(logit_bias={"five": 1}).field == "logit_bias"


def test_top_logprobs_needs_logprobs():
    assert chat_refused(top_logprobs=2).field == "top_logprobs"


@pytest.mark.parametrize(
    "message, field",
    [
        ({"role": "tool", "content": "x", "tool_call_id": "1"}, "messages[0].tool_call_id"),
        ({"role": "tool", "content": "x"}, "messages[0].tool_call_id"),
        ({"role": "user", "content": "x", "name": "bob"}, "messages[0].name"),
        ({"role": "assistant", "tool_calls": []}, "messages[0].tool_calls"),
        ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, "messages[0].content[0].type"),
        ({"role": "user", "content": [{"type": "text"}]}, "messages[0].content[0].text"),
        ({"role": "user", "content": [{"type": "text", "text": "a", "extra": 1}]}, "messages[0].content[0].extra"),
        ({"role": "user", "content": []}, "messages[0].content"),
        ({"role": "user"}, "messages[0].content"),
        ({"role": "robot", "content": "x"}, "messages[0].role"),
        ({"role": "user", "content": ""}, "messages[0].content"),
        ({"role": "user", "content": 5}, "messages[0].content"),
        ("hello", "messages[0]"),
    ],
)
def test_bad_messages_name_the_field(message, field):
    assert chat_refused(messages=[message]).field == field


def test_messages_are_required_and_a_non_empty_list():
    assert refused(CHAT, {"model": "m"}).field == "messages"
    assert chat_refused(messages=[]).field == "messages"


@pytest.mark.parametrize("body", [[], "text", None, 5])
def test_a_body_that_is_not_an_object_is_refused(body):
    assert refused(CHAT, body).field == "body"


@pytest.mark.parametrize("name, value", [("model", 5), ("user", ["x"])])
def test_model_and_user_must_be_strings(name, value):
    assert chat_refused(**{name: value}).field == name


def test_a_completions_body_is_one_instance_per_prompt():
    request = completions(prompt=["a", "b"], n=2, temperature=1.0)
    assert [i.text for i in request.instances] == ["a", "b"]
    assert [i.fields.prompt for i in request.instances] == ["prompt[0]", "prompt[1]"]
    assert all(i.params.num_return_sequences == 2 for i in request.instances)


def test_completions_logprobs_is_the_number_of_top_tokens():
    with pytest.raises(RequestError) as caught:
        completions(logprobs=30)
    assert caught.value.field == "logprobs"
    with pytest.raises(RequestError) as caught:
        completions(logprobs=True)
    assert caught.value.field == "logprobs"


def test_echo_returns_the_prompt_too():
    assert completions(echo=True).instances[0].params.return_full_text
    assert not completions().instances[0].params.return_full_text


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": [[1, 2]]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [""]}, "prompt[0]"),
        ({"prompt": ["ok", 5]}, "prompt[1]"),
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 2}, "best_of"),
        ({"messages": USER}, "messages"),
        ({"max_completion_tokens": 5}, "max_completion_tokens"),
    ],
)
def test_bad_completions_bodies_name_the_field(fields, field):
    assert refused(COMPLETIONS, {"model": "m", "prompt": "x", **fields}).field == field


def test_too_many_prompts_is_a_limit():
    error = refused(COMPLETIONS, {"prompt": ["a"] * 5})
    assert (error.status, error.field) == (422, "prompt")


def test_a_prompt_over_max_prompt_chars_is_a_limit():
    assert refused(COMPLETIONS, {"prompt": "x" * 201}).status == 422


def test_parsed_instances_name_their_fields_as_openai_does():
    """The pipeline's later errors (token limits, the chat template) use these names: nothing renames them."""
    (instance,) = chat(max_completion_tokens=60).instances
    assert instance.fields.prompt == "messages"
    assert instance.fields.parameter("max_new_tokens") == "max_completion_tokens"
    assert instance.fields.parameter("logit_bias") == "logit_bias"
    assert [i.fields.prompt for i in completions(prompt=["a", "b"]).instances] == ["prompt[0]", "prompt[1]"]
    assert completions(prompt=["a"], max_tokens=3).instances[0].fields.parameter("max_new_tokens") == "max_tokens"
