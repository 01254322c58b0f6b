"""An Anthropic request's exchange, alone and through the adapter on both batching paths (tiny model, TorchServe's Context).

The adapter's part: a `message`, its SSE events, a token count and a refusal, each its own
request in one batch, each answered in Anthropic's shape with its own status.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from handler.api.anthropic.exchange import JSON, AnthropicExchange
from handler.api.anthropic.parsing import COUNT_TOKENS, MESSAGES
from handler.api.anthropic.rendering import SSE
from handler.api.protocols import named_exchange, sniffed_exchange
from handler.decoding.sequence import Completion
from handler.decoding.stopping import FinishReason
from handler.errors import RequestError
from handler.params import GenerationParams, ParamLimits
from handler.pipeline.prompts import Prompt
from handler.pipeline.shapes import RequestShape
from handler.torchserve_handler import LLMHandler
from tests.support.context import make_context, run_raw

SHAPE = RequestShape(defaults=GenerationParams(), limits=ParamLimits(), max_instances=2, max_prompt_chars=100)
USER = [{"role": "user", "content": "Tell me a story"}]
EVENT = TypeAdapter(RawMessageStreamEvent)
MESSAGES_HEADER = {"X-LLM-Protocol": "anthropic-messages"}
COUNT_HEADER = {"x-llm-protocol": "anthropic-count-tokens"}
CACHE_CONFIG = {"num_blocks": 48, "page_size": 16, "max_batch_tokens": 256}


def prompted(instance) -> Prompt:
    return Prompt("<rendered>", (1, 2), instance.params)


def test_the_header_names_the_exchange_and_vertexs_body_is_sniffed():
    assert named_exchange("anthropic-messages", "m").endpoint == MESSAGES
    assert named_exchange("anthropic-count-tokens", "m").endpoint == COUNT_TOKENS
    body = {"anthropic_version": "vertex-2023-10-16", "messages": USER, "max_tokens": 4}
    assert isinstance(sniffed_exchange(body, "m"), AnthropicExchange)
    assert not isinstance(sniffed_exchange({"messages": USER, "max_tokens": 4}, "m"), AnthropicExchange)


def test_a_message_under_the_requested_model_or_the_apps():
    exchange = AnthropicExchange(MESSAGES, "smollm2")
    (instance,) = exchange.parse({"max_tokens": 4, "messages": USER}, SHAPE)
    exchange.begin([prompted(instance)])
    assert (exchange.stream, exchange.content_type, exchange.generates) == (False, JSON, True)
    reply = Message.model_validate_json(exchange.body([(prompted(instance), [Completion("Once", FinishReason.EOS, 2, 2)])]))
    assert reply.model == "smollm2" and reply.content[0].text == "Once" and reply.stop_reason == "end_turn"


def test_count_tokens_does_not_generate():
    exchange = AnthropicExchange(COUNT_TOKENS, "smollm2")
    (instance,) = exchange.parse({"model": "m", "messages": USER}, SHAPE)
    exchange.begin([prompted(instance)])
    assert not exchange.generates and json.loads(exchange.body([])) == {"input_tokens": 2}


def test_later_pipeline_errors_name_anthropic_fields(smollm2_dir):
    from transformers import AutoTokenizer

    from handler.pipeline.prompts import TokenLimits, encode

    exchange = AnthropicExchange(MESSAGES, "smollm2")
    (instance,) = exchange.parse({"messages": USER, "max_tokens": 10}, SHAPE)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    with pytest.raises(RequestError) as caught:
        encode(instance, tokenizer, None, TokenLimits(max_input_tokens=100, max_total_tokens=12))
    assert caught.value.field == "max_tokens" and "10 max_tokens" in caught.value.message
    body = json.loads(exchange.error_body(caught.value))
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"


@pytest.fixture(scope="module", params=["dynamic", "continuous"])
def served(request, tiny_model_dir: Path):
    handler_config = {"warmup": False, "max_total_tokens": 200, "dtype": "float32"}
    if request.param == "dynamic":
        context = make_context("tiny", tiny_model_dir, {"handler": handler_config})
    else:
        config = {"asyncCommunication": True, "handler": {**handler_config, "batching": "continuous", "continuous": CACHE_CONFIG}}
        context = make_context("tiny", tiny_model_dir, config, batch_size=1)
    handler = LLMHandler()
    handler.initialize(context)
    yield handler, context
    handler.service.stop()


def call(served, bodies: list, headers: list[dict[str, str]]):
    handler, context = served
    outputs, chunks = run_raw(handler, context, bodies, headers)
    results = [(context.get_response_status(i)[0], out, context.get_response_content_type(i)) for i, out in enumerate(outputs)]
    return results, chunks


def test_a_message_a_count_and_a_refusal_share_a_batch(served):
    tokenizer = served[0].service.loaded.tokenizer
    bodies = [
        {"model": "tiny", "messages": USER, "max_tokens": 4, "temperature": 0},
        {"model": "tiny", "messages": USER},
        {"model": "tiny", "messages": USER, "max_tokens": 4, "tool_choice": {"type": "any"}},
    ]
    (message, count, refusal), _ = call(served, bodies, [MESSAGES_HEADER, COUNT_HEADER, MESSAGES_HEADER])
    reply = Message.model_validate_json(message[1])
    expected = len(tokenizer.apply_chat_template(USER, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])
    assert (message[0], reply.stop_reason, reply.usage.output_tokens, reply.usage.input_tokens) == (
        200,
        "max_tokens",
        4,
        expected,
    )
    assert (count[0], json.loads(count[1]), count[2]) == (200, {"input_tokens": expected}, JSON)
    assert refusal[0] == 400 and json.loads(refusal[1])["error"]["type"] == "invalid_request_error"
    assert "tool_choice" in json.loads(refusal[1])["error"]["message"]


def test_a_stream_is_anthropics_events_whose_deltas_make_the_text(served):
    body = {"model": "tiny", "messages": USER, "max_tokens": 6, "temperature": 0}
    [(_, whole, _)], _ = call(served, [body], [MESSAGES_HEADER])
    [(status, out, content_type)], chunks = call(served, [{**body, "stream": True}], [MESSAGES_HEADER])
    assert (status, content_type) == (200, SSE)
    stream = "".join(data.decode() for _, data in chunks) + out
    data = [json.loads(event.split("\n")[1].removeprefix("data: ")) for event in stream.split("\n\n") if event]
    assert [d["type"] for d in data[:3]] == ["message_start", "content_block_start", "ping"]
    events = [EVENT.validate_python(d) for d in data if d["type"] != "ping"]  # the SDK's types skip the keep-alive
    assert [e.type for e in events[-3:]] == ["content_block_stop", "message_delta", "message_stop"]
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert text == Message.model_validate_json(whole).content[0].text
    assert events[-2].usage.output_tokens == 6 and events[-2].delta.stop_reason == "max_tokens"
