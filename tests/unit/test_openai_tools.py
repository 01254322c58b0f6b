"""Tool calls through the adapter on both batching paths, with a tiny random Llama and SmolLM2's tokenizer.

A random model writes nothing sensible, which is the point: whatever it picks, the grammar
holds it to a known tool and its schema, so a `required` or named call always parses and
validates. Tool rows, JSON-schema rows and plain rows share one batch, and the plain row's
greedy text is what it is alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.support.context import run_raw, tool_handler

CHAT = {"X-LLM-Protocol": "openai-chat"}
USER = [{"role": "user", "content": "Book a table"}]
SCHEMA = {
    "type": "object",
    "properties": {
        "size": {"type": "integer", "minimum": 1, "maximum": 8},
        "kind": {"enum": ["indoor", "outdoor"]},
        "vegan": {"type": "boolean"},
    },
    "required": ["size", "kind", "vegan"],
}
TOOLS = [
    {"type": "function", "function": {"name": "book", "description": "Book a table", "parameters": SCHEMA}},
    {
        "type": "function",
        "function": {
            "name": "cancel",
            "parameters": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
        },
    },
]
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}


@pytest.fixture(scope="module", params=["dynamic", "continuous"])
def served(request, tool_model_dir: Path):
    handler, context = tool_handler(tool_model_dir, request.param)
    yield handler, context
    handler.service.stop()


def answers(served, bodies: list[dict]) -> list[tuple[int, str, list]]:
    handler, context = served
    outputs, chunks = run_raw(handler, context, bodies, [CHAT] * len(bodies))
    return [(context.get_response_status(i)[0], out, chunks) for i, out in enumerate(outputs)]


def body(**extra) -> dict:
    return {"model": "tiny", "messages": USER, "tools": TOOLS, "max_tokens": 300, "temperature": 0, **extra}


def valid_calls(reply: ChatCompletion) -> list[tuple[str, dict]]:
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    found = []
    for call in choice.message.tool_calls:
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, PARAMETERS[call.function.name])
        assert call.type == "function" and call.id.startswith("call_")
        found.append((call.function.name, arguments))
    return found


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_required_calls_parse_and_validate_whatever_the_model_picks(served, seed):
    [(status, out, _)] = answers(served, [body(tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=seed)])
    assert status == 200
    assert len(valid_calls(ChatCompletion.model_validate_json(out))) == 1


def test_a_named_tool_is_the_one_called(served):
    [(status, out, _)] = answers(served, [body(tool_choice={"type": "function", "function": {"name": "cancel"}})])
    assert status == 200 and [name for name, _ in valid_calls(ChatCompletion.model_validate_json(out))] == ["cancel"]


def test_tool_rows_json_rows_and_plain_rows_share_a_batch(served):
    plain = {"model": "tiny", "messages": USER, "max_tokens": 6, "temperature": 0}
    [(_, alone, _)] = answers(served, [plain])
    schema_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": PARAMETERS["cancel"]}}
    results = answers(
        served, [body(tool_choice="required"), {**plain, "response_format": schema_format, "max_tokens": 40}, plain]
    )
    assert [status for status, _, _ in results] == [200, 200, 200]
    replies = [ChatCompletion.model_validate_json(out) for _, out, _ in results]
    assert valid_calls(replies[0])
    jsonschema.validate(json.loads(replies[1].choices[0].message.content), PARAMETERS["cancel"])
    assert replies[2].choices[0].message.content == ChatCompletion.model_validate_json(alone).choices[0].message.content


def test_a_streamed_call_arrives_in_openais_delta_shape_and_matches_the_whole_answer(served):
    request = body(tool_choice={"type": "function", "function": {"name": "book"}})
    [(_, whole, _)] = answers(served, [request])
    [(status, out, chunks)] = answers(served, [{**request, "stream": True}])
    events = "".join(data.decode() for _, data in chunks) + out
    data = [event[len("data: ") :] for event in events.split("\n\n") if event]
    assert status == 200 and data[-1] == "[DONE]"
    parsed = [ChatCompletionChunk.model_validate_json(d) for d in data[:-1]]
    deltas = [c.choices[0].delta.tool_calls[0] for c in parsed if c.choices and c.choices[0].delta.tool_calls]
    assert deltas[0].id.startswith("call_") and deltas[0].type == "function" and deltas[0].function.name == "book"
    assert all(d.id is None and d.function.name is None and d.index == 0 for d in deltas[1:])
    [expected] = ChatCompletion.model_validate_json(whole).choices[0].message.tool_calls
    assert "".join(d.function.arguments or "" for d in deltas) == expected.function.arguments
    assert [c.choices[0].finish_reason for c in parsed if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_none_answers_text_and_auto_answers_text_or_valid_calls(served):
    results = answers(served, [body(tool_choice="none", max_tokens=8), body(max_tokens=60, temperature=1.0, seed=5)])
    none, auto = (ChatCompletion.model_validate_json(out) for _, out, _ in results)
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason == "length"
    for call in auto.choices[0].message.tool_calls or []:
        if auto.choices[0].finish_reason == "tool_calls":
            jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


def test_a_tool_result_round_trip_is_answered(served):
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "book", "arguments": '{"size": 2, "kind": "indoor", "vegan": true}'},
    }
    messages = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "booked"},
    ]
    [(status, out, _)] = answers(served, [body(messages=messages, tool_choice="none", max_tokens=4)])
    assert status == 200 and ChatCompletion.model_validate_json(out).usage.prompt_tokens > 0
