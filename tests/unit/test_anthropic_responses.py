"""Completions rendered as Anthropic's objects, read back by the official `anthropic` SDK (its types and its stream parser)."""

import json

import anthropic
import httpx2
import pytest

from handler.api.anthropic.rendering import (
    SSE,
    Reply,
    StreamRenderer,
    error_body,
    error_json,
    response,
    stop_reason,
    token_count,
)
from handler.decoding.sequence import Completion
from handler.decoding.stopping import FinishReason
from handler.errors import RequestError, limit_error
from handler.params import GenerationParams
from handler.pipeline.prompts import Prompt

PROMPT = Prompt("Hi", (1, 2, 3), GenerationParams(stop=("\n",)))
QUESTION = [{"role": "user", "content": "Hi"}]


def sdk_client(status: int, content: str, content_type: str) -> anthropic.Anthropic:
    """The real SDK, its HTTP answered in-process with the bytes under test."""
    transport = httpx2.MockTransport(
        lambda request: httpx2.Response(status, text=content, headers={"content-type": content_type})
    )
    return anthropic.Anthropic(
        base_url="http://test", api_key="none", http_client=httpx2.Client(transport=transport), max_retries=0
    )


def test_a_message_as_the_sdk_reads_it():
    body = response(Reply.new("smollm2"), [(PROMPT, [Completion("Hello", FinishReason.EOS, 3, 2)])])
    reply = sdk_client(200, json.dumps(body), "application/json").messages.create(model="m", max_tokens=4, messages=QUESTION)
    assert isinstance(reply, anthropic.types.Message) and reply.id.startswith("msg_") and reply.model == "smollm2"
    assert (reply.type, reply.role, reply.stop_reason, reply.stop_sequence) == ("message", "assistant", "end_turn", None)
    assert [(b.type, b.text) for b in reply.content] == [("text", "Hello")]
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (3, 2)


@pytest.mark.parametrize(
    "reason, stop, expected",
    [
        (FinishReason.EOS, None, "end_turn"),
        (FinishReason.LENGTH, None, "max_tokens"),
        (FinishReason.STOP, "\n", "stop_sequence"),
        (FinishReason.STOP, None, "end_turn"),
    ],
)
def test_stop_reasons(reason, stop, expected):
    assert stop_reason(Completion("x", reason, 3, 1, stop_sequence=stop)) == expected


def test_the_stop_sequence_is_named():
    body = response(Reply.new("m"), [(PROMPT, [Completion("x", FinishReason.STOP, 3, 1, stop_sequence="\n")])])
    assert (body["stop_reason"], body["stop_sequence"]) == ("stop_sequence", "\n")


def events(renderer: StreamRenderer, pieces: list[str], completion: Completion) -> str:
    return "".join(renderer.piece(0, piece) for piece in pieces) + renderer.end([(PROMPT, [completion])])


def test_a_stream_as_the_sdk_reads_it():
    stream = events(
        StreamRenderer(Reply.new("smollm2"), [PROMPT]),
        ["Hel", "lo"],
        Completion("Hello", FinishReason.STOP, 3, 2, stop_sequence="\n"),
    )
    client = sdk_client(200, stream, SSE)
    with client.messages.stream(model="m", max_tokens=4, messages=QUESTION) as streamed:
        assert list(streamed.text_stream) == ["Hel", "lo"]
        final = streamed.get_final_message()
    assert final.content[0].text == "Hello" and final.model == "smollm2"
    assert (final.stop_reason, final.stop_sequence, final.usage.input_tokens, final.usage.output_tokens) == (
        "stop_sequence",
        "\n",
        3,
        2,
    )


def test_the_event_sequence_is_anthropics():
    stream = events(StreamRenderer(Reply.new("m"), [PROMPT]), ["a", "b"], Completion("ab", FinishReason.LENGTH, 3, 2))
    parsed = [event.split("\n") for event in stream.split("\n\n") if event]
    names = [lines[0].removeprefix("event: ") for lines in parsed]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert [json.loads(lines[1].removeprefix("data: "))["type"] for lines in parsed] == names


def test_a_stream_without_text_still_opens_and_closes():
    stream = events(StreamRenderer(Reply.new("m"), [PROMPT]), [], Completion("", FinishReason.EOS, 3, 1))
    with sdk_client(200, stream, SSE).messages.stream(model="m", max_tokens=4, messages=QUESTION) as streamed:
        final = streamed.get_final_message()
    assert final.content[0].text == "" and final.stop_reason == "end_turn"


def test_an_error_after_the_stream_began_is_what_the_sdk_raises():
    renderer = StreamRenderer(Reply.new("m"), [PROMPT])
    stream = renderer.piece(0, "Hel") + renderer.error(RequestError("generation failed; see the server log", status=500))
    with pytest.raises(anthropic.APIStatusError) as caught:
        with sdk_client(200, stream, SSE).messages.stream(model="m", max_tokens=4, messages=QUESTION) as streamed:
            list(streamed.text_stream)
    assert "generation failed" in str(caught.value)


@pytest.mark.parametrize(
    "error, status, kind, sdk_error",
    [
        (RequestError("max_tokens: field required", "max_tokens"), 400, "invalid_request_error", anthropic.BadRequestError),
        (
            limit_error("messages has 9 tokens", "messages", 8, 9),
            422,
            "invalid_request_error",
            anthropic.UnprocessableEntityError,
        ),
        (RequestError("no such model", "model", status=404), 404, "not_found_error", anthropic.NotFoundError),
        (RequestError("failed", status=500), 500, "api_error", anthropic.InternalServerError),
        (RequestError("busy", status=503), 503, "overloaded_error", anthropic.InternalServerError),
    ],
)
def test_errors_in_anthropics_shape(error, status, kind, sdk_error):
    body = error_body(error)
    assert body == {"type": "error", "error": {"type": kind, "message": body["error"]["message"]}}
    assert body["error"]["message"].endswith(error.message)
    with pytest.raises(sdk_error) as caught:
        sdk_client(status, error_json(error), "application/json").messages.create(model="m", max_tokens=4, messages=QUESTION)
    assert caught.value.body["error"]["type"] == kind


def test_the_message_leads_with_the_field_it_names():
    assert error_body(RequestError("malformed JSON", "body"))["error"]["message"] == "body: malformed JSON"
    assert (
        error_body(RequestError("max_tokens: field required", "max_tokens"))["error"]["message"] == "max_tokens: field required"
    )
    assert error_body(RequestError("failed", status=500))["error"]["message"] == "failed"


def test_token_count():
    assert token_count([PROMPT]) == {"input_tokens": 3}
    client = sdk_client(200, json.dumps(token_count([PROMPT])), "application/json")
    assert client.messages.count_tokens(model="m", messages=QUESTION).input_tokens == 3
