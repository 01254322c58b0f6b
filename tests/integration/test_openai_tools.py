"""Tool calling and the Responses API with the official clients against the product's tree (front, TorchServe, SmolLM2), on both batching paths.

SmolLM2-135M's template knows no tools, so these run the fallback format. Every
`tool_choice` mode; streamed calls read back by the SDK's own chunk types; a tool result fed
back; and the guarantee: seeded, sampled calls to varied schemas (nested objects, enums,
arrays, bounded integers), every one of whose arguments parses and validates. The hostile
part sends bad tool bodies: each a 4xx in OpenAI's shape naming the field, the worker the same after.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import openai
import pytest

from tests.integration.test_openai_api import CHAT, MODELS, chat, client, model, post, worker_pids  # noqa: F401
from tests.support.torchserve import TorchServe, build_archive, continuous_model_config, dynamic_model_config


def patient(config: dict[str, Any]) -> dict[str, Any]:
    """The app's config with fp32 (no dtype probe at start) and room for slow answers: on a shared
    2-core machine the app's 50 s deadline cuts calls short, and these tests are about their shape."""
    config["handler"] = {**config["handler"], "dtype": "float32", "deadline_seconds": 900}
    config["responseTimeout"] = 900
    return config


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[TorchServe]:
    workdir = tmp_path_factory.mktemp("openai-tools")
    store = workdir / "store"
    store.mkdir()
    configs = dict(zip(MODELS, (patient(dynamic_model_config("smollm2")), patient(continuous_model_config("smollm2")))))
    served = TorchServe(workdir, {name: build_archive("smollm2", name, store, config) for name, config in configs.items()})
    try:
        served.start()
        yield served
    finally:
        served.stop()


WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 24}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone",
     "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 24}}, "required": ["zone"]}}},
]  # fmt: skip
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# Varied schemas for the guarantee: nested objects, enums, arrays with bounds, integers with bounds, numbers, booleans.
SCHEMAS = {
    "book_flight": {
        "type": "object",
        "properties": {
            "origin": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "destination": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
            "cabin": {"enum": ["economy", "business", "first"]},
        },
        "required": ["origin", "destination", "passengers", "cabin"],
    },
    "create_user": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "address": {
                "type": "object",
                "properties": {"street": {"type": "string", "maxLength": 30}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["street", "zip"],
            },
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "address", "age"],
    },
    "add_tags": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3}},
        "required": ["tags"],
    },
    "set_thermostat": {
        "type": "object",
        "properties": {"celsius": {"type": "number", "minimum": 5, "maximum": 30}, "eco": {"type": "boolean"}},
        "required": ["celsius", "eco"],
    },
    "order_items": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 2,
                "items": {
                    "type": "object",
                    "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"}, "qty": {"type": "integer", "minimum": 1, "maximum": 5}},
                    "required": ["sku", "qty"],
                },
            }
        },
        "required": ["items"],
    },
    "schedule": {
        "type": "object",
        "properties": {
            "day": {"enum": ["mon", "tue", "wed", "thu", "fri"]},
            "slot": {"type": "object", "properties": {"hour": {"type": "integer", "minimum": 8, "maximum": 17}, "minutes": {"enum": [0, 30]}}, "required": ["hour", "minutes"]},
            "note": {"anyOf": [{"type": "string", "maxLength": 16}, {"type": "null"}]},
        },
        "required": ["day", "slot", "note"],
    },
    "rate": {
        "type": "object",
        "properties": {"stars": {"type": "integer", "minimum": 1, "maximum": 5}, "scores": {"type": "array", "items": {"type": "integer", "minimum": -3, "maximum": 3}, "maxItems": 4}},
        "required": ["stars", "scores"],
    },
}  # fmt: skip
GUARANTEE_TOOLS = [{"type": "function", "function": {"name": name, "parameters": schema}} for name, schema in SCHEMAS.items()]
SEEDS = range(4)


def ask(client: openai.OpenAI, model: str, **extra: Any):
    fields = {"messages": ASK, "tools": TOOLS, "max_tokens": 120, "temperature": 0, **extra}
    return client.chat.completions.create(model=model, **fields)


def validated(choice) -> list[tuple[str, dict]]:
    """Each call's name and arguments, after checking they parse and match their tool's schema. An answer
    cut by `max_tokens` (a small model may call again and again when parallel calls are allowed) has
    its complete calls checked, not the last, which the limit cut."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS + GUARANTEE_TOOLS}
    found = []
    calls = choice.message.tool_calls
    assert choice.finish_reason in ("tool_calls", "length") and calls, choice
    for call in calls[:-1] if choice.finish_reason == "length" else calls:
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, schemas[call.function.name])
        assert call.type == "function" and call.id.startswith("call_")
        found.append((call.function.name, arguments))
    return found


def test_required_calls_a_tool_whose_arguments_validate(client, model):
    reply = ask(client, model, tool_choice="required", max_tokens=160)
    choice = reply.choices[0]
    assert validated(choice)
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 0


CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
CITY_TOOL = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": CITY}}
]


@pytest.mark.parametrize("parallel", [True, False])
def test_a_required_call_to_a_one_string_tool_fits_in_40_tokens(client, model, parallel):
    """Arguments are compact JSON, no free whitespace between tokens (before, such a call was reported
    cut at 40 tokens with arguments `{ "`). Greedy, fp32. With parallel calls allowed SmolLM2 goes on
    to a second call, which the limit cuts before its name: that is no text, and the first call is whole."""
    fields = {"messages": ASK, "tools": CITY_TOOL, "tool_choice": "required", "max_tokens": 40, "temperature": 0}
    choice = client.chat.completions.create(model=model, parallel_tool_calls=parallel, **fields).choices[0]
    first = choice.message.tool_calls[0]
    assert first.function.arguments == '{"city":"Paris"}' and choice.message.content is None
    if not parallel:
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1


def test_a_named_tool_is_called(client, model):
    choice = ask(client, model, tool_choice={"type": "function", "function": {"name": "get_time"}}).choices[0]
    assert choice.finish_reason == "tool_calls" and [name for name, _ in validated(choice)] == ["get_time"]


def test_parallel_tool_calls_false_allows_exactly_one_call(client, model):
    choice = ask(client, model, tool_choice="required", parallel_tool_calls=False).choices[0]
    assert choice.finish_reason == "tool_calls" and len(validated(choice)) == 1


def test_none_answers_in_text(client, model):
    choice = ask(client, model, tool_choice="none", max_tokens=16).choices[0]
    assert choice.message.tool_calls is None and choice.message.content


def test_auto_answers_in_text_or_with_valid_calls(client, model):
    for question in (ASK, [{"role": "user", "content": "Write one sentence about the sea."}]):
        choice = ask(client, model, messages=question).choices[0]
        if choice.message.tool_calls:
            validated(choice)
        else:
            assert choice.message.content and choice.finish_reason in ("stop", "length")


def test_a_streamed_call_is_the_whole_answers_call(client, model):
    named = {"type": "function", "function": {"name": "get_weather"}}
    [expected] = ask(client, model, tool_choice=named).choices[0].message.tool_calls
    chunks = list(ask(client, model, tool_choice=named, stream=True, stream_options={"include_usage": True}))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].index == 0 and deltas[0].id.startswith("call_") and deltas[0].type == "function"
    assert deltas[0].function.name == "get_weather" and all(d.function.name is None and d.id is None for d in deltas[1:])
    assert len(deltas) > 2, "arguments arrive in pieces"
    assert "".join(d.function.arguments or "" for d in deltas) == expected.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert chunks[-1].usage.completion_tokens > 0


def test_a_tool_result_round_trip(client, model):
    first = ask(client, model, tool_choice={"type": "function", "function": {"name": "get_weather"}}).choices[0].message
    [call] = first.tool_calls
    result = {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "clear"})}
    messages = [*ASK, first.model_dump(exclude_none=True), result]
    answer = client.chat.completions.create(
        model=model, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=24, temperature=0
    )
    assert answer.choices[0].message.content and answer.choices[0].message.tool_calls is None
    assert answer.usage.prompt_tokens > ask(client, model, tool_choice="none", max_tokens=1).usage.prompt_tokens


@pytest.mark.parametrize("served", MODELS)
def test_every_seeded_sampled_call_to_varied_schemas_parses_and_validates(server, served):
    """len(SCHEMAS) x len(SEEDS) calls per path, half named, half `required` with one call.

    Eight threads share one connection pool, as an agent's workers do; the client keeps the SDK's
    default retries of a connection the front closed as it was reused (seen once in CI, a
    keep-alive race docs/reliability.md notes), since this test is about the calls' arguments."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=600)

    def one(job: tuple[int, str]):
        seed, name = job
        choice = {"type": "function", "function": {"name": name}} if seed % 2 else "required"
        content = f"Call {name} with realistic arguments."
        return client.chat.completions.create(
            model=served, messages=[{"role": "user", "content": content}], tools=GUARANTEE_TOOLS, tool_choice=choice,
            parallel_tool_calls=False, temperature=1.0, seed=seed, max_tokens=200,
        )  # fmt: skip

    jobs = [(seed, name) for seed in SEEDS for name in SCHEMAS]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(one, jobs))
    calls = [validated(reply.choices[0]) for reply in replies]
    assert [reply.choices[0].finish_reason for reply in replies] == ["tool_calls"] * len(jobs)
    assert all(len(found) == 1 for found in calls)
    named = [(job, found[0][0]) for job, found in zip(jobs, calls) if job[0] % 2]
    assert all(name == called for (_, name), called in named)
    assert len(jobs) >= 28


# Hostile tool bodies: (kind, body fields, status, OpenAI `param`).
def tool(name: Any = "f", parameters: Any = None, **function: Any) -> dict:
    spec = {"name": name, **function}
    if parameters is not None:
        spec["parameters"] = parameters
    return {"type": "function", "function": spec}


CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
CALLED = [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [CALL]}]
CASES = [
    ("tool_choice without tools", {"tool_choice": "auto"}, 400, "tool_choice"),
    (
        "tool_choice naming an unknown tool",
        {"tools": [tool()], "tool_choice": {"type": "function", "function": {"name": "g"}}},
        400,
        "tool_choice",
    ),
    ("tool_choice 'sometimes'", {"tools": [tool()], "tool_choice": "sometimes"}, 400, "tool_choice"),
    (
        "tool_choice function without a name",
        {"tools": [tool()], "tool_choice": {"type": "function"}},
        400,
        "tool_choice.function",
    ),
    ("tools as an object", {"tools": {"f": {}}}, 400, "tools"),
    ("an empty tools list", {"tools": []}, 400, "tools"),
    ("a tool that is a string", {"tools": ["f"]}, 400, "tools[0]"),
    ("a code_interpreter tool", {"tools": [{"type": "code_interpreter"}]}, 400, "tools[0].type"),
    ("a tool without its function", {"tools": [{"type": "function"}]}, 400, "tools[0].function"),
    (
        "a function without a name",
        {"tools": [{"type": "function", "function": {"description": "x"}}]},
        400,
        "tools[0].function.name",
    ),
    ("a name with a space", {"tools": [tool("get weather")]}, 400, "tools[0].function.name"),
    ("a name with a quote", {"tools": [tool('f", "arguments": {}}')]}, 400, "tools[0].function.name"),
    ("a name holding the closing tag", {"tools": [tool("f</tool_call>")]}, 400, "tools[0].function.name"),
    ("a name of 65 characters", {"tools": [tool("f" * 65)]}, 400, "tools[0].function.name"),
    ("two tools of one name", {"tools": [tool(), tool()]}, 400, "tools[1]"),
    ("parameters as a list", {"tools": [tool(parameters=[1])]}, 400, "tools[0].function.parameters"),
    ("parameters of type string", {"tools": [tool(parameters={"type": "string"})]}, 400, "tools[0].function.parameters"),
    (
        "parameters the compiler would ignore",
        {"tools": [tool(parameters={"type": "object", "not": {}})]},
        400,
        "tools[0].function.parameters",
    ),
    (
        "parameters with an unknown type",
        {"tools": [tool(parameters={"type": "object", "properties": {"a": {"type": "objectx"}}})], "tool_choice": "required"},
        400,
        "tools",
    ),
    (
        "parameters with a circular $ref",
        {
            "tools": [
                tool(
                    parameters={
                        "type": "object",
                        "properties": {"a": {"$ref": "#/$defs/x"}},
                        "$defs": {"x": {"$ref": "#/$defs/x"}},
                        "required": ["a"],
                    }
                )
            ],
            "tool_choice": "required",
        },
        400,
        "tools",
    ),
    (
        "a grammar over the size limit",
        {"tools": [tool(parameters={"type": "object", "properties": {"a": {"enum": [f"v{i:05}" for i in range(5000)]}}})]},
        422,
        "tools",
    ),
    ("two hundred tools", {"tools": [tool(f"f{i}") for i in range(200)]}, 422, "tools"),
    ("an unknown key in a function", {"tools": [tool(colour="red")]}, 400, "tools[0].function.colour"),
    ("strict as a string", {"tools": [tool(strict="yes")]}, 400, "tools[0].function.strict"),
    ("parallel_tool_calls as a string", {"tools": [tool()], "parallel_tool_calls": "no"}, 400, "parallel_tool_calls"),
    (
        "tools with a json_object response_format",
        {"tools": [tool()], "response_format": {"type": "json_object"}},
        400,
        "response_format",
    ),
    (
        "a tool message with no matching call",
        {"messages": [*CALLED, {"role": "tool", "tool_call_id": "call_2", "content": "x"}]},
        400,
        "messages[2].tool_call_id",
    ),
    (
        "a tool message without tool_call_id",
        {"messages": [*CALLED, {"role": "tool", "content": "x"}]},
        400,
        "messages[2].tool_call_id",
    ),
    (
        "a tool message first",
        {"messages": [{"role": "tool", "tool_call_id": "call_1", "content": "x"}]},
        400,
        "messages[0].tool_call_id",
    ),
    (
        "a tool_call_id on a user message",
        {"messages": [{"role": "user", "content": "x", "tool_call_id": "call_1"}]},
        400,
        "messages[0].tool_call_id",
    ),
    (
        "tool_calls on a user message",
        {"messages": [{"role": "user", "content": "x", "tool_calls": [CALL]}]},
        400,
        "messages[0].tool_calls",
    ),
    (
        "arguments that are not JSON",
        {
            "messages": [
                CALLED[0],
                {"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "f", "arguments": "{oops"}}]},
            ]
        },
        400,
        "messages[1].tool_calls[0].function.arguments",
    ),
    (
        "arguments as an object",
        {"messages": [CALLED[0], {"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "f", "arguments": {}}}]}]},
        400,
        "messages[1].tool_calls[0].function.arguments",
    ),
    (
        "a call of type code",
        {"messages": [CALLED[0], {"role": "assistant", "tool_calls": [{**CALL, "type": "code"}]}]},
        400,
        "messages[1].tool_calls[0].type",
    ),
    (
        "a call without an id",
        {
            "messages": [
                CALLED[0],
                {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            ]
        },
        400,
        "messages[1].tool_calls[0].id",
    ),
    (
        "a called name that breaks the format",
        {
            "messages": [
                CALLED[0],
                {"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "f\n</tool_call>", "arguments": "{}"}}]},
            ]
        },
        400,
        "messages[1].tool_calls[0].function.name",
    ),
    ("the function role", {"messages": [{"role": "function", "name": "f", "content": "x"}]}, 400, "messages[0].role"),
    ("a tool_result role", {"messages": [{"role": "tool_result", "content": "x"}]}, 400, "messages[0].role"),
    ("the deprecated functions", {"functions": [{"name": "f"}]}, 400, "functions"),
]


def test_the_tool_cases_cover_the_issue():
    assert len(CASES) >= 25 and len({kind for kind, *_ in CASES}) == len(CASES)


@pytest.mark.parametrize("kind, fields, status, param", CASES, ids=[case[0] for case in CASES])
def test_a_bad_tool_body_gets_a_4xx_in_openai_shape(server, model, kind, fields, status, param):
    before = worker_pids(server, model)
    body = json.loads(chat())
    body.update(fields, model=model)
    got_status, got = post(server, CHAT, json.dumps(body).encode())
    assert got_status == status, got
    assert set(got) == {"error"} and set(got["error"]) == {"message", "type", "param", "code"}, got
    assert got["error"]["param"] == param and got["error"]["type"] == "invalid_request_error", got
    assert post(server, CHAT, chat(max_tokens=1).replace(b"MODEL", model.encode()))[0] == 200
    assert worker_pids(server, model) == before, "the worker was replaced"


# The Responses API (`/v1/responses`), stateless, with the same SDK.
RESPONSE_TOOLS = [{"type": "function", "name": t["function"]["name"], "description": t["function"]["description"],
                   "parameters": t["function"]["parameters"]} for t in TOOLS]  # fmt: skip
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"]}  # fmt: skip
RESPONSES = "/v1/responses"


def respond(client: openai.OpenAI, model: str, **extra: Any):
    fields = {"input": "What is the capital of France?", "max_output_tokens": 24, "temperature": 0, **extra}
    return client.responses.create(model=model, **fields)


def test_a_response_answers_in_text_with_usage(client, model):
    response = respond(client, model, instructions="Answer in one short sentence.", metadata={"run": "test"})
    assert response.object == "response" and response.status in ("completed", "incomplete") and response.model == model
    assert response.output[0].type == "message" and response.output_text == response.output[0].content[0].text
    assert response.usage.input_tokens > 0 and response.usage.output_tokens > 0 and response.metadata == {"run": "test"}


def test_a_cut_response_is_incomplete_with_its_reason(client, model):
    response = respond(client, model, max_output_tokens=2)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"


def test_a_streamed_response_is_the_whole_response(client, model):
    whole = respond(client, model)
    events = list(respond(client, model, stream=True))
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == whole.status.join(("response.", ""))
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    with client.responses.stream(
        model=model, input="What is the capital of France?", max_output_tokens=24, temperature=0
    ) as stream:
        final = stream.get_final_response()
    assert final.output_text == whole.output_text


def test_a_function_tool_round_trip(client, model):
    first = respond(client, model, input="What is the weather in Paris?", tools=RESPONSE_TOOLS, tool_choice="required",
                    parallel_tool_calls=False, max_output_tokens=120)  # fmt: skip
    [call] = [item for item in first.output if item.type == "function_call"]
    jsonschema.validate(json.loads(call.arguments), {t["name"]: t["parameters"] for t in RESPONSE_TOOLS}[call.name])
    assert call.call_id.startswith("call_") and first.status == "completed"
    items = [{"role": "user", "content": "What is the weather in Paris?"}, call.model_dump(exclude_none=True),
             {"type": "function_call_output", "call_id": call.call_id, "output": json.dumps({"temperature": 21})}]  # fmt: skip
    second = respond(client, model, input=items, tools=RESPONSE_TOOLS, tool_choice="none")
    assert second.output_text and not [item for item in second.output if item.type == "function_call"]


def test_a_streamed_function_call_arrives_in_argument_deltas(client, model):
    named = {"type": "function", "name": "get_weather"}
    events = list(
        respond(
            client, model, input="Weather in Oslo?", tools=RESPONSE_TOOLS, tool_choice=named, stream=True, max_output_tokens=120
        )
    )
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert (
        len(done) == 1
        and "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta") == done[0].arguments
    )
    jsonschema.validate(json.loads(done[0].arguments), WEATHER)
    assert events[-1].type == "response.completed" and events[-1].response.output[-1].type == "function_call"


def test_a_json_schema_text_format_gives_valid_json(client, model):
    text = {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}
    response = respond(client, model, input="Describe a person as JSON.", text=text, max_output_tokens=60)
    assert response.status == "completed", response
    jsonschema.validate(json.loads(response.output_text), PERSON)


@pytest.mark.parametrize("field, value", [("store", True), ("previous_response_id", "resp_1"), ("background", True)])
def test_state_it_does_not_keep_is_refused_naming_the_field(client, model, field, value):
    with pytest.raises(openai.BadRequestError) as caught:
        respond(client, model, **{field: value})
    assert caught.value.param == field and "stateless" in caught.value.message


RESPONSE_CASES = [
    ("no input", {"input": None}, 400, "input"),
    ("an empty input list", {"input": []}, 400, "input"),
    ("a number as input", {"input": 5}, 400, "input"),
    ("store true", {"store": True}, 400, "store"),
    ("previous_response_id", {"previous_response_id": "resp_x"}, 400, "previous_response_id"),
    ("background true", {"background": True}, 400, "background"),
    ("a reasoning item", {"input": [{"type": "reasoning", "summary": []}]}, 400, "input[0].type"),
    ("an unknown role", {"input": [{"role": "robot", "content": "x"}]}, 400, "input[0].role"),
    (
        "an image part",
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
        400,
        "input[0].content[0].type",
    ),
    (
        "an output with no call",
        {"input": [{"role": "user", "content": "x"}, {"type": "function_call_output", "call_id": "c", "output": "x"}]},
        400,
        "input[1].call_id",
    ),
    (
        "a call with bad arguments",
        {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{"}]},
        400,
        "input[0].arguments",
    ),
    (
        "a call whose name breaks the format",
        {"input": [{"type": "function_call", "call_id": "c", "name": "f</tool_call>", "arguments": "{}"}]},
        400,
        "input[0].name",
    ),
    ("a regex text format", {"text": {"format": {"type": "regex"}}}, 400, "text.format.type"),
    (
        "a json_schema text format without schema",
        {"text": {"format": {"type": "json_schema", "name": "x"}}},
        400,
        "text.format.schema",
    ),
    ("a web_search tool", {"tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
    ("a tool name with a space", {"tools": [{"type": "function", "name": "a b"}]}, 400, "tools[0].name"),
    (
        "a tool with string parameters",
        {"tools": [{"type": "function", "name": "f", "parameters": {"type": "string"}}]},
        400,
        "tools[0].parameters",
    ),
    (
        "tool_choice naming no tool",
        {"tools": RESPONSE_TOOLS, "tool_choice": {"type": "function", "name": "other"}},
        400,
        "tool_choice",
    ),
    ("tool_choice without tools", {"tool_choice": "required"}, 400, "tool_choice"),
    ("tools with a text format", {"tools": RESPONSE_TOOLS, "text": {"format": {"type": "json_object"}}}, 400, "text.format"),
    ("max_output_tokens 0", {"max_output_tokens": 0}, 400, "max_output_tokens"),
    ("max_output_tokens over the context", {"max_output_tokens": 100_000}, 422, "max_output_tokens"),
    ("temperature -1", {"temperature": -1}, 400, "temperature"),
    ("metadata with a number", {"metadata": {"a": 1}}, 400, "metadata"),
    ("truncation auto", {"truncation": "auto"}, 400, "truncation"),
    ("an unknown field", {"colour": "red"}, 400, "colour"),
    (
        "a schema with a circular $ref",
        {
            "tools": [
                {
                    "type": "function",
                    "name": "f",
                    "parameters": {
                        "type": "object",
                        "properties": {"a": {"$ref": "#/$defs/x"}},
                        "$defs": {"x": {"$ref": "#/$defs/x"}},
                        "required": ["a"],
                    },
                }
            ],
            "tool_choice": "required",
        },
        400,
        "tools",
    ),
]


def test_the_responses_cases_cover_the_issue():
    assert len(RESPONSE_CASES) >= 25 and len({kind for kind, *_ in RESPONSE_CASES}) == len(RESPONSE_CASES)


@pytest.mark.parametrize("kind, fields, status, param", RESPONSE_CASES, ids=[case[0] for case in RESPONSE_CASES])
def test_a_bad_responses_body_gets_a_4xx_in_openai_shape(server, model, kind, fields, status, param):
    before = worker_pids(server, model)
    body = {"model": model, "input": "hi", **fields}
    got_status, got = post(server, RESPONSES, json.dumps({k: v for k, v in body.items() if v is not None}).encode())
    assert got_status == status, got
    assert set(got) == {"error"} and got["error"]["param"] == param and got["error"]["type"] == "invalid_request_error", got
    assert post(server, RESPONSES, json.dumps({"model": model, "input": "hi", "max_output_tokens": 1}).encode())[0] == 200
    assert worker_pids(server, model) == before, "the worker was replaced"


# Agent frameworks, unchanged, against the same server: the tool actually called, its result sent back and answered.
def weather_tool(seen: list[str]):
    from agents import function_tool

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        seen.append(city)
        return f"It is sunny and 21 degrees in {city}."

    return get_weather


@pytest.mark.parametrize("wire", ["responses", "chat"])
def test_an_openai_agent_calls_its_tool_and_answers_with_the_result(server, model, wire):
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, set_default_openai_client, set_tracing_disabled

    set_tracing_disabled(True)
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)
    set_default_openai_client(client, use_for_tracing=False)
    seen: list[str] = []
    agent = Agent(
        name="weather",
        instructions="Answer questions about the weather. Call get_weather first, then answer in one sentence.",
        tools=[weather_tool(seen)],
        model=model if wire == "responses" else OpenAIChatCompletionsModel(model, client),  # a name: the default Responses model
        model_settings=ModelSettings(tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=80),
    )
    result = Runner.run_sync(agent, "What is the weather in Paris?", max_turns=4)
    outputs = [item for item in result.to_input_list() if item.get("type") == "function_call_output"]
    assert seen and outputs and "sunny" in str(outputs[0]["output"])
    assert isinstance(result.final_output, str) and result.final_output.strip()
    assert len(result.raw_responses) >= 2, "the tool's result went back to the model, which answered"


def test_langchain_binds_tools_and_gets_structured_output(server, model):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=20)
        age: int = Field(ge=0, le=120)

    llm = ChatOpenAI(model=model, base_url=f"{server.url}/v1", api_key="unused", temperature=0, max_tokens=80, max_retries=0)
    message = llm.bind_tools([TOOLS[0]], tool_choice="get_weather").invoke("What is the weather in Paris?")
    [call] = message.tool_calls
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    jsonschema.validate(call["args"], WEATHER)
    person = llm.with_structured_output(Person).invoke("Describe a person.")
    assert isinstance(person, Person)


def test_litellm_completion_with_tools(server, model, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    reply = litellm.completion(
        model=f"openai/{model}", api_base=f"{server.url}/v1", api_key="unused", messages=ASK, tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, temperature=0, max_tokens=80,
    )  # fmt: skip
    [call] = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls" and call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), TOOLS[1]["function"]["parameters"])
