"""The Responses API at the edge: bodies into instances, completions into `response` objects and typed events.

Rendered objects and events are read back with the `openai` SDK's own types.
"""

from __future__ import annotations

import json

import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from handler.api.openai_responses.exchange import ResponsesExchange
from handler.api.protocols import Exchange, named_exchange, sniffed_exchange
from handler.decoding.sequence import Completion
from handler.decoding.stopping import FinishReason
from handler.errors import RequestError
from handler.params import GenerationParams, ParamLimits
from handler.pipeline.prompts import Prompt
from handler.pipeline.shapes import RequestShape
from handler.structured.tools import call_text

SHAPE = RequestShape(GenerationParams(), ParamLimits(), 16, 100_000)
TOOL = {
    "type": "function",
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
EVENTS = TypeAdapter(ResponseStreamEvent)


def parsed(**body):
    exchange = ResponsesExchange("smollm2")
    [instance] = exchange.parse({"model": "smollm2", **body}, SHAPE)
    return exchange, instance


def refused(**body) -> RequestError:
    with pytest.raises(RequestError) as caught:
        parsed(**body)
    return caught.value


def test_a_string_input_with_instructions_is_a_system_and_a_user_message():
    _, instance = parsed(input="Hi", instructions="Be brief", max_output_tokens=7, temperature=0.5)
    assert instance.messages == ({"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"})
    assert (instance.params.max_new_tokens, instance.params.temperature) == (7, 0.5)
    assert instance.fields.parameter("max_new_tokens") == "max_output_tokens"


def test_items_become_a_conversation_with_calls_and_results():
    items = [
        {"role": "developer", "content": [{"type": "input_text", "text": "Rules"}]},
        {"type": "message", "role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Lyon"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2", "output": "rain"},
    ]
    _, instance = parsed(input=items, tools=[TOOL])
    roles = [m["role"] for m in instance.messages]
    assert roles == ["system", "user", "assistant", "tool", "tool"]
    assert [c.arguments for c in instance.messages[2]["tool_calls"]] == ['{"city":"Paris"}', '{"city":"Lyon"}']
    assert instance.tools.active and instance.params.response_format.kind == "tool_calls"


def test_text_format_json_schema_is_the_native_format():
    _, instance = parsed(
        input="x", text={"format": {"type": "json_schema", "name": "p", "schema": {"type": "object"}, "strict": True}}
    )
    assert instance.params.response_format.kind == "json_schema"


@pytest.mark.parametrize(
    "body, field",
    [
        ({"input": "x", "store": True}, "store"),
        ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": "x", "background": True}, "background"),
        ({"input": "x", "conversation": "c"}, "conversation"),
        ({}, "input"),
        ({"input": []}, "input"),
        ({"input": 5}, "input"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
        ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0].type"),
        (
            {"input": [{"role": "user", "content": "x"}, {"type": "function_call_output", "call_id": "nope", "output": "x"}]},
            "input[1].call_id",
        ),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{bad"}]}, "input[0].arguments"),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f g", "arguments": "{}"}]}, "input[0].name"),
        ({"input": "x", "text": {"format": {"type": "regex"}}}, "text.format.type"),
        ({"input": "x", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": "x", "tools": [{**TOOL, "name": "a b"}]}, "tools[0].name"),
        ({"input": "x", "tools": [TOOL], "tool_choice": {"type": "function", "name": "other"}}, "tool_choice"),
        ({"input": "x", "tool_choice": "required"}, "tool_choice"),
        ({"input": "x", "tools": [TOOL], "text": {"format": {"type": "json_object"}}}, "text.format"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "x", "metadata": {"a": 1}}, "metadata"),
        ({"input": "x", "truncation": "auto"}, "truncation"),
        ({"input": "x", "colour": "red"}, "colour"),
    ],
)
def test_bad_bodies_name_the_field(body, field):
    assert refused(**body).field == field


def answered(exchange: ResponsesExchange, instance, text: str, reason=FinishReason.EOS, pieces=None) -> tuple[str, list[str]]:
    prompt = Prompt("p", (1, 2, 3), instance.params)
    exchange.begin([prompt])
    streamed = [exchange.piece(0, piece) for piece in pieces or []]
    return exchange.body([(prompt, [Completion(text, reason, 3, 5)])]), streamed


def test_a_whole_answer_is_a_response_the_sdk_reads():
    exchange, instance = parsed(input="Hi", metadata={"k": "v"})
    body, _ = answered(exchange, instance, "Hello there")
    response = Response.model_validate_json(body)
    assert response.status == "completed" and response.output_text == "Hello there"
    assert response.metadata == {"k": "v"} and response.usage.output_tokens == 5 and response.usage.input_tokens == 3


def test_calls_are_function_call_items_and_a_cut_answer_is_incomplete():
    exchange, instance = parsed(input="Hi", tools=[TOOL])
    text = call_text("get_weather", '{"city": "Paris"}')
    response = Response.model_validate_json(answered(exchange, instance, text)[0])
    [item] = response.output
    assert (item.type, item.name, item.arguments, item.status) == (
        "function_call",
        "get_weather",
        '{"city": "Paris"}',
        "completed",
    )
    assert item.call_id.startswith("call_") and item.id.startswith("fc_")
    exchange, instance = parsed(input="Hi")
    response = Response.model_validate_json(answered(exchange, instance, "Hel", FinishReason.LENGTH)[0])
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"


def events_of(streamed: list[str], end: str) -> list:
    text = "".join(streamed) + end
    blocks = [block for block in text.split("\n\n") if block]
    events = []
    for block in blocks:
        kind, data = block.split("\n")
        event = EVENTS.validate_python(json.loads(data.removeprefix("data: ")))
        assert kind == f"event: {event.type}"
        events.append(event)
    return events


def test_a_stream_is_the_sdks_event_sequence_numbered_in_order():
    exchange, instance = parsed(input="Hi", stream=True, tools=[TOOL])
    call = call_text("get_weather", '{"city": "Paris"}')
    pieces = ["Let me ", "check.", call[:20], call[20:40], call[40:]]
    end, streamed = answered(exchange, instance, "Let me check." + call, pieces=pieces)
    events = events_of(streamed, end)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]  # fmt: skip
    assert kinds[-1] == "response.completed" and "response.function_call_arguments.done" in kinds
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert arguments == '{"city": "Paris"}'
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Let me check."
    final = events[-1].response
    assert [item.type for item in final.output] == ["message", "function_call"] and final.output_text == "Let me check."


def test_the_header_and_the_body_shape_pick_the_responses_exchange():
    assert isinstance(named_exchange("openai-responses", "m"), ResponsesExchange)
    assert isinstance(sniffed_exchange({"model": "m", "input": "hi"}, "m"), ResponsesExchange)
    assert isinstance(ResponsesExchange("m"), Exchange)
