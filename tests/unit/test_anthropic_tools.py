"""Anthropic's tool calling: bodies into the neutral `ToolSpec` and turns, answers as `tool_use` blocks and
their stream, read back by the official `anthropic` SDK; then through the adapter on both batching paths
with a tiny random Llama (whatever it picks, a forced call validates against its schema)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter
from transformers import AutoTokenizer

from handler.api.anthropic.parsing import COUNT_TOKENS, MESSAGES, parse_anthropic
from handler.api.anthropic.rendering import SSE, Reply, StreamRenderer, response
from handler.decoding.sequence import Completion
from handler.decoding.stopping import FinishReason
from handler.errors import RequestError
from handler.params import GenerationParams, ParamLimits
from handler.pipeline.prompts import Prompt, render
from handler.pipeline.shapes import RequestShape
from handler.structured import tools as calls
from tests.support.context import run_raw, tool_handler
from tests.unit.test_anthropic_responses import QUESTION, sdk_client

SHAPE = RequestShape(defaults=GenerationParams(max_new_tokens=32), limits=ParamLimits(), max_instances=4, max_prompt_chars=500)
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
TOOLS = [
    {"name": "get_weather", "description": "The weather in a city", "input_schema": WEATHER},
    {"name": "get_time", "input_schema": {"type": "object", "properties": {}}},
]
USER = [{"role": "user", "content": "Weather in Paris?"}]
USE = {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}}
RESULT = {"type": "tool_result", "tool_use_id": "toolu_01", "content": "sunny"}
ROUND_TRIP = [*USER, {"role": "assistant", "content": [USE]}, {"role": "user", "content": [RESULT]}]
EVENT = TypeAdapter(RawMessageStreamEvent)


def parsed(endpoint: str = MESSAGES, **fields):
    body = {"model": "m", "max_tokens": 16, "messages": USER, "tools": TOOLS, **fields}
    if endpoint == COUNT_TOKENS:
        body.pop("max_tokens")
    [instance] = parse_anthropic(endpoint, {k: v for k, v in body.items() if v is not None}, SHAPE).instances
    return instance


def refused(**fields) -> RequestError:
    with pytest.raises(RequestError) as caught:
        parsed(**fields)
    return caught.value


# parsing


@pytest.mark.parametrize(
    "choice, mode, name, parallel",
    [
        (None, "auto", None, True),
        ({"type": "auto", "disable_parallel_tool_use": True}, "auto", None, False),
        ({"type": "any"}, "required", None, True),
        ({"type": "tool", "name": "get_time"}, "function", "get_time", True),
        ({"type": "none"}, "none", None, True),
    ],
)
def test_tool_choices_are_the_neutral_ones(choice, mode, name, parallel):
    instance = parsed(tool_choice=choice)
    assert instance.tools is not None and [t.name for t in instance.tools.tools] == ["get_weather", "get_time"]
    assert instance.tools.choice == calls.ToolChoice(mode, name, parallel)
    assert json.loads(instance.tools.tools[0].parameters) == WEATHER
    grammar = instance.params.response_format
    assert (grammar is None) == (mode == "none")
    if grammar is not None:
        assert grammar.kind == calls.TOOL_CALLS and grammar.where == "tools"


def test_count_tokens_takes_the_tools_but_no_grammar():
    instance = parsed(COUNT_TOKENS, tool_choice={"type": "any"})
    assert instance.tools is not None and instance.params.response_format is None


def test_an_empty_tools_list_is_no_tools():
    assert parsed(tools=[]).tools is None


@pytest.mark.parametrize(
    "fields, field, words",
    [
        ({"tool_choice": {"type": "tool", "name": "launch"}}, "tool_choice", "'launch'"),
        ({"tool_choice": {"type": "tool"}}, "tool_choice.name", "required"),
        ({"tool_choice": {"type": "required"}}, "tool_choice.type", "auto, any, tool, none"),
        ({"tool_choice": "any"}, "tool_choice.type", "auto, any, tool, none"),
        ({"tool_choice": {"type": "any", "disable_parallel_tool_use": "yes"}}, "tool_choice.disable_parallel_tool_use", ""),
        ({"tool_choice": {"type": "none", "name": "x"}}, "tool_choice.name", "unknown"),
        ({"tools": None, "tool_choice": {"type": "auto"}}, "tool_choice", "with tools"),
        ({"tools": [{"name": "f"}]}, "tools[0].input_schema", "required"),
        ({"tools": [{"name": "f", "input_schema": {"type": "string"}}]}, "tools[0].input_schema", "object"),
        ({"tools": [{"name": "f", "input_schema": "{}"}]}, "tools[0].input_schema", "JSON Schema"),
        ({"tools": [{"name": "f", "input_schema": {"type": "object", "not": {}}}]}, "tools[0].input_schema", "not"),
        ({"tools": [{"name": 'f"}', "input_schema": WEATHER}]}, "tools[0].name", "letters"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools[1]", "repeats"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type", "server tools"),
        ({"tools": [{**TOOLS[0], "colour": "red"}]}, "tools[0].colour", "unknown"),
        ({"tools": {"name": "f"}}, "tools", "list"),
    ],
)
def test_bad_tools_and_choices_are_refused_naming_the_field(fields, field, words):
    error = refused(**fields)
    assert (error.status, error.field) == (400, field) and error.message.startswith(field) and words in error.message


def test_tool_use_and_tool_result_blocks_are_the_turns_calls_and_results():
    turns = [*ROUND_TRIP[:2], {"role": "user", "content": [RESULT, {"type": "text", "text": "And tomorrow?"}]}]
    instance = parsed(messages=turns)
    assert instance.messages == (
        USER[0],
        {"role": "assistant", "content": "", "tool_calls": (calls.ToolCall("toolu_01", "get_weather", '{"city":"Paris"}'),)},
        {"role": "tool", "content": "sunny", "tool_call_id": "toolu_01"},
        {"role": "user", "content": "And tomorrow?"},
    )
    assert not instance.prefill


def test_text_beside_calls_a_failed_result_and_result_blocks():
    text = {"type": "text", "text": "Let me look."}
    failed = {**RESULT, "is_error": True, "content": [{"type": "text", "text": "timeout"}]}
    instance = parsed(messages=[*USER, {"role": "assistant", "content": [text, USE]}, {"role": "user", "content": [failed]}])
    assert instance.messages[1]["content"] == "Let me look." and len(instance.messages[1]["tool_calls"]) == 1
    assert instance.messages[2] == {"role": "tool", "content": "Error: timeout", "tool_call_id": "toolu_01"}


@pytest.mark.parametrize(
    "turns, field",
    [
        ([{"role": "user", "content": [RESULT]}], "messages[0].content[0].tool_use_id"),
        ([*USER, {"role": "assistant", "content": [USE]}, {"role": "user", "content": [{**RESULT, "tool_use_id": "toolu_02"}]}],
         "messages[2].content[0].tool_use_id"),
        ([{"role": "user", "content": [USE]}], "messages[0].content[0].type"),
        ([*USER, {"role": "assistant", "content": [RESULT]}], "messages[1].content[0].type"),
        ([*USER, {"role": "assistant", "content": [{**USE, "input": "Paris"}]}, *USER], "messages[1].content[0].input"),
        ([*USER, {"role": "assistant", "content": [{**USE, "id": "a b"}]}, *USER], "messages[1].content[0].id"),
        ([*USER, {"role": "assistant", "content": [{**USE, "name": "<x>"}]}, *USER], "messages[1].content[0].name"),
        ([*USER, {"role": "assistant", "content": [USE, USE]}, *USER], "messages[1].content[1].id"),
        ([*USER, {"role": "assistant", "content": [USE]}], "messages[1].content"),
        ([*ROUND_TRIP[:2], {"role": "user", "content": [{**RESULT, "is_error": "no"}]}], "messages[2].content[0].is_error"),
        ([*ROUND_TRIP[:2], {"role": "user", "content": [{**RESULT, "content": [{"type": "image"}]}]}],
         "messages[2].content[0].content[0].type"),
    ],
)  # fmt: skip
def test_bad_tool_blocks_are_refused_naming_the_field(turns, field):
    error = refused(messages=turns)
    assert (error.status, error.field) == (400, field) and error.message.startswith(field)


# the prompt


def test_a_template_without_tools_gets_the_fallback_block_calls_and_results(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    text, _ = render(parsed(messages=ROUND_TRIP), tokenizer, None)
    assert '"name": "get_weather"' in text and "<tools>" in text
    assert calls.call_text("get_weather", '{"city":"Paris"}') in text
    assert calls.result_text("sunny") in text


# rendering


def tool_prompt(choice: dict | None = None) -> Prompt:
    return Prompt("x", (1, 2, 3), parsed(tool_choice=choice).params)


CALL = calls.call_text("get_weather", '{"city":"Paris"}')


def test_calls_are_tool_use_blocks_and_the_stop_reason_is_tool_use():
    completion = Completion("Let me look.\n" + CALL, FinishReason.EOS, 3, 9)
    message = Message.model_validate(response(Reply.new("m"), [(tool_prompt(), [completion])]))
    [text, use] = message.content
    assert text.type == "text" and text.text == "Let me look."
    assert use.type == "tool_use" and use.id.startswith("toolu_") and (use.name, use.input) == ("get_weather", {"city": "Paris"})
    assert message.stop_reason == "tool_use"


def test_calls_alone_have_no_text_block_and_a_cut_call_stops_at_max_tokens():
    only = Message.model_validate(response(Reply.new("m"), [(tool_prompt(), [Completion(CALL, FinishReason.EOS, 3, 9)])]))
    assert [block.type for block in only.content] == ["tool_use"]
    cut = Completion(calls.BEGIN + 'get_weather", "arguments": {"city":"Pa', FinishReason.LENGTH, 3, 9)
    message = Message.model_validate(response(Reply.new("m"), [(tool_prompt(), [cut])]))
    assert message.stop_reason == "max_tokens" and message.content[0].type == "tool_use" and message.content[0].input == {}


def test_text_alone_under_auto_is_a_text_block_ending_the_turn():
    message = response(Reply.new("m"), [(tool_prompt(), [Completion("It is sunny.", FinishReason.EOS, 3, 4)])])
    assert (message["content"], message["stop_reason"]) == ([{"type": "text", "text": "It is sunny."}], "end_turn")


def streamed(pieces: list[str], completion: Completion) -> str:
    renderer = StreamRenderer(Reply.new("m"), [tool_prompt()])
    return "".join(renderer.piece(0, piece) for piece in pieces) + renderer.end([(tool_prompt(), [completion])])


def test_a_streamed_call_is_anthropics_event_sequence():
    text = "Sure." + CALL
    stream = streamed([text[i : i + 3] for i in range(0, len(text), 3)], Completion(text, FinishReason.EOS, 3, 9))
    data = [json.loads(event.split("\n")[1].removeprefix("data: ")) for event in stream.split("\n\n") if event]
    names = [d["type"] for d in data]
    texts = sum(1 for d in data if d["type"] == "content_block_delta" and d["index"] == 0)
    inputs = sum(1 for d in data if d["type"] == "content_block_delta" and d["index"] == 1)
    assert texts >= 1 and inputs >= 1
    assert names == ["message_start", "content_block_start", "ping", *["content_block_delta"] * texts, "content_block_stop",
                     "content_block_start", *["content_block_delta"] * inputs, "content_block_stop", "message_delta",
                     "message_stop"]  # fmt: skip
    text = "".join(d["delta"]["text"] for d in data if d["type"] == "content_block_delta" and d["index"] == 0)
    assert text == "Sure." and data[1]["content_block"] == {"type": "text", "text": ""}
    start = data[4 + texts]
    assert start["index"] == 1 and start["content_block"]["type"] == "tool_use" and start["content_block"]["input"] == {}
    assert start["content_block"]["id"].startswith("toolu_") and start["content_block"]["name"] == "get_weather"
    inputs = [d["delta"] for d in data if d["type"] == "content_block_delta" and d["index"] == 1]
    assert (
        all(d["type"] == "input_json_delta" for d in inputs) and "".join(d["partial_json"] for d in inputs) == '{"city":"Paris"}'
    )
    assert data[-2]["delta"]["stop_reason"] == "tool_use"
    assert all(EVENT.validate_python(d) for d in data if d["type"] != "ping")


def test_the_sdk_reads_a_streamed_call_as_the_whole_message():
    stream = streamed([CALL[:20], CALL[20:45], CALL[45:]], Completion(CALL, FinishReason.EOS, 3, 9))
    with sdk_client(200, stream, SSE).messages.stream(model="m", max_tokens=4, messages=QUESTION) as events:
        final = events.get_final_message()
    [use] = final.content
    assert (use.type, use.name, use.input, final.stop_reason) == ("tool_use", "get_weather", {"city": "Paris"}, "tool_use")


# through the adapter, both paths

HEADER = {"X-LLM-Protocol": "anthropic-messages"}


@pytest.fixture(scope="module", params=["dynamic", "continuous"])
def served(request, tool_model_dir: Path):
    handler, context = tool_handler(tool_model_dir, request.param)
    yield handler, context
    handler.service.stop()


def answer(served, body: dict) -> tuple[int, str, str]:
    handler, context = served
    [out], chunks = run_raw(handler, context, [body], [HEADER])
    return context.get_response_status(0)[0], out, "".join(data.decode() for _, data in chunks) + out


def test_a_forced_tool_validates_whatever_the_model_picks_and_streams_the_same_input(served):
    body = {"model": "tiny", "messages": USER, "tools": TOOLS, "max_tokens": 200, "temperature": 0,
            "tool_choice": {"type": "tool", "name": "get_weather"}}  # fmt: skip
    status, whole, _ = answer(served, body)
    message = Message.model_validate_json(whole)
    [use] = [block for block in message.content if block.type == "tool_use"]
    assert status == 200 and message.stop_reason == "tool_use" and use.name == "get_weather"
    jsonschema.validate(use.input, WEATHER)
    status, _, stream = answer(served, {**body, "stream": True})
    data = [json.loads(event.split("\n")[1].removeprefix("data: ")) for event in stream.split("\n\n") if event]
    partial = "".join(d["delta"].get("partial_json", "") for d in data if d["type"] == "content_block_delta")
    assert status == 200 and json.loads(partial) == use.input and data[-2]["delta"]["stop_reason"] == "tool_use"


@pytest.mark.parametrize("parallel", [True, False])
def test_any_calls_known_tools_with_valid_input_after_a_round_trip(served, parallel):
    """Greedy: Anthropic's API has no seed, and a random model's greedy pick is as arbitrary as a sampled one."""
    turns = [*ROUND_TRIP, {"role": "assistant", "content": "Noted."}, *USER]
    choice = {"type": "any", "disable_parallel_tool_use": not parallel}
    body = {"model": "tiny", "messages": turns, "tools": TOOLS, "max_tokens": 300, "temperature": 0, "tool_choice": choice}
    status, whole, _ = answer(served, body)
    message = Message.model_validate_json(whole)
    uses = [block for block in message.content if block.type == "tool_use"]
    assert status == 200 and uses and all(block.type == "tool_use" for block in message.content)
    if message.stop_reason == "max_tokens":  # a random model may loop parallel calls: the complete ones count
        assert parallel
        uses = uses[:-1]
    else:
        assert message.stop_reason == "tool_use" and (parallel or len(uses) == 1)
    schemas = {tool["name"]: tool["input_schema"] for tool in TOOLS}
    for use in uses:
        jsonschema.validate(use.input, schemas[use.name])
