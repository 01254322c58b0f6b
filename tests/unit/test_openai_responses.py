"""Completions rendered as OpenAI objects, read back by the official `openai` SDK (its types and its stream parser)."""

import json

import httpx
import openai
import pytest
from openai.types import Completion as SDKCompletion
from openai.types.chat import ChatCompletion

from handler.api.openai.parsing import CHAT, COMPLETIONS
from handler.api.openai.rendering import DONE, SSE, Reply, StreamRenderer, error_body, error_json, response, usage
from handler.decoding.sequence import Completion
from handler.decoding.stopping import FinishReason
from handler.errors import RequestError, limit_error
from handler.params import GenerationParams
from handler.pipeline.prompts import Prompt

PROMPT = Prompt("Hi", (1, 2, 3), GenerationParams(num_return_sequences=2))
ANSWER = [
    (
        PROMPT,
        [Completion("Hello", FinishReason.EOS, 3, 2), Completion("Hey there", FinishReason.LENGTH, 3, 4)],
    )
]


def sdk_client(status: int, content: str, content_type: str) -> openai.OpenAI:
    """The real SDK, its HTTP answered in-process with the bytes under test."""
    transport = httpx.MockTransport(lambda request: httpx.Response(status, text=content, headers={"content-type": content_type}))
    return openai.OpenAI(base_url="http://test/v1", api_key="none", http_client=httpx.Client(transport=transport), max_retries=0)


def test_a_chat_completion_as_the_sdk_reads_it():
    body = response(Reply.new(CHAT, "smollm2"), ANSWER)
    reply = sdk_client(200, json.dumps(body), "application/json").chat.completions.create(model="smollm2", messages=[])
    assert isinstance(reply, ChatCompletion) and reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == "smollm2" and reply.created > 0
    assert [(c.index, c.message.role, c.message.content, c.finish_reason) for c in reply.choices] == [
        (0, "assistant", "Hello", "stop"),
        (1, "assistant", "Hey there", "length"),
    ]


def test_stop_strings_finish_with_stop():
    answer = [(PROMPT, [Completion("x", FinishReason.STOP, 3, 1)])]
    assert response(Reply.new(CHAT, "m"), answer)["choices"][0]["finish_reason"] == "stop"


def test_usage_counts_the_prompt_once_and_every_generated_token():
    assert usage(ANSWER) == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}


def test_text_completions_with_several_prompts_index_choices_prompt_by_prompt():
    second = Prompt("Bye", (4, 5), GenerationParams())
    answer = ANSWER + [(second, [Completion("now", FinishReason.LENGTH, 2, 1)])]
    body = response(Reply.new(COMPLETIONS, "smollm2"), answer)
    reply = SDKCompletion.model_validate(body)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert [(c.index, c.text) for c in reply.choices] == [(0, "Hello"), (1, "Hey there"), (2, "now")]
    assert reply.usage.prompt_tokens == 5 and reply.usage.completion_tokens == 7


def test_echo_puts_the_prompt_in_front():
    prompt = Prompt("Once", (1,), GenerationParams(return_full_text=True))
    body = response(Reply.new(COMPLETIONS, "m"), [(prompt, [Completion(" upon", FinishReason.LENGTH, 1, 1)])])
    assert body["choices"][0]["text"] == "Once upon"


def stream_events(renderer: StreamRenderer, pieces, answer) -> str:
    return "".join(renderer.piece(index, text) for index, text in pieces) + renderer.end(answer)


def test_a_chat_stream_as_the_sdk_reads_it():
    renderer = StreamRenderer(Reply.new(CHAT, "smollm2"), [PROMPT], include_usage=True)
    events = stream_events(renderer, [(0, "Hel"), (1, "Hey"), (0, "lo"), (1, " there")], ANSWER)
    assert events.endswith(DONE)
    chunks = list(sdk_client(200, events, SSE).chat.completions.create(model="smollm2", messages=[], stream=True))
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    firsts = {}
    for chunk in chunks:
        for choice in chunk.choices:
            firsts.setdefault(choice.index, choice.delta)
    assert firsts[0].role == "assistant" and firsts[1].role == "assistant"
    text = {0: "", 1: ""}
    reasons = {}
    for chunk in chunks:
        for choice in chunk.choices:
            text[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    assert text == {0: "Hello", 1: "Hey there"} and reasons == {0: "stop", 1: "length"}
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 9
    assert all(c.usage is None for c in chunks[:-1])


def test_a_choice_that_streamed_nothing_still_opens_and_finishes():
    prompt = Prompt("Hi", (1,), GenerationParams())
    events = StreamRenderer(Reply.new(CHAT, "m"), [prompt], False).end([(prompt, [Completion("", FinishReason.EOS, 1, 1)])])
    data = [json.loads(line[6:]) for line in events.split("\n\n") if line.startswith("data: {")]
    assert data[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert data[1]["choices"][0]["finish_reason"] == "stop"
    assert "usage" not in data[0]


def test_a_completions_stream_with_echo_sends_the_prompt_first():
    prompt = Prompt("Once", (1,), GenerationParams(return_full_text=True))
    renderer = StreamRenderer(Reply.new(COMPLETIONS, "m"), [prompt], False)
    events = stream_events(renderer, [(0, " upon")], [(prompt, [Completion(" upon", FinishReason.LENGTH, 1, 1)])])
    chunks = list(sdk_client(200, events, SSE).completions.create(model="m", prompt="Once", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "Once upon"
    assert chunks[-1].choices[0].finish_reason == "length"


def test_an_error_after_the_stream_began_is_raised_by_the_sdk():
    renderer = StreamRenderer(Reply.new(CHAT, "m"), [PROMPT], False)
    events = renderer.piece(0, "Hel") + renderer.error(RequestError("generation failed; see the server log", status=500))
    stream = sdk_client(200, events, SSE).chat.completions.create(model="m", messages=[], stream=True)
    with pytest.raises(openai.APIError, match="generation failed"):
        list(stream)


def test_errors_take_openai_shape():
    error = RequestError("temperature must be a finite number >= 0.0, got -1.0", "temperature")
    assert error_body(error) == {
        "error": {"message": error.message, "type": "invalid_request_error", "param": "temperature", "code": None}
    }
    assert error_body(limit_error("too long", "max_tokens", 2048, 4000))["error"]["code"] == "limit_exceeded"
    assert error_body(RequestError("boom", status=500))["error"]["type"] == "server_error"


def test_the_sdk_raises_a_400_as_bad_request_naming_the_field():
    error = RequestError("tools is not supported by this server", "tools", details={"code": "unsupported_parameter"})
    client = sdk_client(400, error_json(error), "application/json")
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=[])
    assert caught.value.param == "tools" and caught.value.code == "unsupported_parameter"
    assert "tools" in caught.value.message
