"""An OpenAI request's exchange: parse, rename later errors, render whole or streamed; Vertex's chat instances."""

import json

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from handler.api.openai.exchange import JSON, OpenAIExchange, VertexChatExchange, is_vertex_chat
from handler.api.openai.parsing import CHAT, COMPLETIONS
from handler.api.openai.rendering import SSE
from handler.decoding.sequence import Completion
from handler.decoding.stopping import FinishReason
from handler.errors import RequestError
from handler.params import GenerationParams, ParamLimits
from handler.pipeline.prompts import Prompt
from handler.pipeline.shapes import RequestShape

SHAPE = RequestShape(defaults=GenerationParams(), limits=ParamLimits(), max_instances=2, max_prompt_chars=100)
USER = [{"role": "user", "content": "Hi"}]


def prompted(instance) -> Prompt:
    return Prompt("<rendered>", (1, 2), instance.params)


def test_a_chat_exchange_renders_a_chat_completion_under_the_requested_model():
    exchange = OpenAIExchange(CHAT, "smollm2")
    (instance,) = exchange.parse({"model": "alias", "messages": USER}, SHAPE)
    exchange.begin([prompted(instance)])
    assert exchange.content_type == JSON
    body = json.loads(exchange.body([(prompted(instance), [Completion("Hello", FinishReason.EOS, 2, 3)])]))
    reply = ChatCompletion.model_validate(body)
    assert reply.model == "alias" and reply.choices[0].message.content == "Hello"


def test_a_body_without_a_model_is_answered_as_the_app():
    exchange = OpenAIExchange(COMPLETIONS, "smollm2")
    (instance,) = exchange.parse({"prompt": "Once"}, SHAPE)
    body = json.loads(exchange.body([(prompted(instance), [Completion(" upon", FinishReason.LENGTH, 2, 1)])]))
    assert body["model"] == "smollm2" and body["object"] == "text_completion"


def test_a_streaming_exchange_sends_sse_pieces_then_its_end():
    exchange = OpenAIExchange(CHAT, "smollm2")
    (instance,) = exchange.parse({"messages": USER, "stream": True}, SHAPE)
    exchange.begin([prompted(instance)])
    assert exchange.stream and exchange.content_type == SSE
    events = exchange.piece(0, "Hel") + exchange.body([(prompted(instance), [Completion("Hel", FinishReason.LENGTH, 2, 1)])])
    data = [line[len("data: ") :] for line in events.split("\n\n") if line]
    assert data[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(json.loads(d)) for d in data[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hel"
    assert chunks[-1].choices[0].finish_reason == "length"
    error = exchange.stream_error(RequestError("generation failed; see the server log", status=500))
    assert json.loads(error.split("\n\n")[0][6:])["error"]["type"] == "server_error"


def test_later_pipeline_errors_name_openai_fields(smollm2_dir):
    """The token limits are checked after parsing, by the pipeline, in the names the exchange gave it."""
    from transformers import AutoTokenizer

    from handler.pipeline.prompts import TokenLimits, encode

    exchange = OpenAIExchange(CHAT, "smollm2")
    (instance,) = exchange.parse({"messages": USER, "max_tokens": 10}, SHAPE)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    with pytest.raises(RequestError) as caught:
        encode(instance, tokenizer, None, TokenLimits(max_input_tokens=100, max_total_tokens=12))
    error = caught.value
    assert error.field == "max_tokens" and "10 max_tokens" in error.message
    assert json.loads(exchange.error_body(error))["error"]["param"] == "max_tokens"


def vertex(*instances, **extra):
    return {"instances": [{"@requestFormat": "chatCompletions", **i} for i in instances], **extra}


def test_vertex_chat_instances_are_recognised():
    assert is_vertex_chat(vertex({"messages": USER}))
    assert not is_vertex_chat({"instances": ["plain"]})
    assert not is_vertex_chat({"messages": USER})


def test_vertex_chat_instances_and_other_instances_do_not_mix():
    with pytest.raises(RequestError) as caught:
        is_vertex_chat({"instances": [{"@requestFormat": "chatCompletions", "messages": USER}, "plain"]})
    assert caught.value.field == "instances[1]"


def test_an_unknown_request_format_is_refused():
    with pytest.raises(RequestError) as caught:
        is_vertex_chat({"instances": [{"@requestFormat": "embeddings", "input": "x"}]})
    assert "embeddings" in caught.value.message


def test_each_vertex_chat_instance_is_answered_with_a_chat_completion():
    exchange = VertexChatExchange("smollm2")
    instances = exchange.parse(vertex({"messages": USER, "max_tokens": 3}, {"messages": USER, "temperature": 0}), SHAPE)
    assert [i.params.max_new_tokens for i in instances] == [3, 64]
    answer = [(prompted(i), [Completion(f"answer {n}", FinishReason.EOS, 2, 2)]) for n, i in enumerate(instances)]
    predictions = json.loads(exchange.body(answer))["predictions"]
    assert [ChatCompletion.model_validate(p).choices[0].message.content for p in predictions] == ["answer 0", "answer 1"]
    assert len({p["id"] for p in predictions}) == 2


@pytest.mark.parametrize(
    "body, field",
    [
        (vertex({"messages": USER, "tools": []}), "instances[0].tools"),
        (vertex({"messages": USER}, {"messages": [{"role": "robot", "content": "x"}]}), "instances[1].messages[0].role"),
        (vertex({"messages": USER, "stream": True}), "instances[0].stream"),
        (vertex({"messages": USER}, parameters={"temperature": 0}), "parameters"),
        (vertex({"messages": USER}, {"messages": USER}, {"messages": USER}), "instances"),
        (vertex({}), "instances[0].messages"),
    ],
)
def test_bad_vertex_chat_instances_name_the_instance(body, field):
    with pytest.raises(RequestError) as caught:
        VertexChatExchange("m").parse(body, SHAPE)
    assert caught.value.field == field


def test_vertex_instances_name_their_fields_with_the_instance():
    exchange = VertexChatExchange("m")
    instances = exchange.parse(vertex({"messages": USER}, {"messages": USER, "max_completion_tokens": 3}), SHAPE)
    assert [i.fields.prompt for i in instances] == ["instances[0].messages", "instances[1].messages"]
    assert instances[1].fields.parameter("max_new_tokens") == "instances[1].max_completion_tokens"
    assert instances[0].fields.parameter("max_new_tokens") == "instances[0].max_tokens"
