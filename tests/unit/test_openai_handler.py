"""The OpenAI API through the adapter, on both batching paths, with TorchServe's own Context and a tiny model.

Penalties and logit bias are checked token for token against a reference written from
OpenAI's definition (greedy, so the text is exact); logprobs against the model's own
log-softmax.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from openai.types import Completion as SDKCompletion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from handler.api.openai.rendering import SSE
from handler.torchserve_handler import LLMHandler
from tests.support.context import make_context, run_raw

CHAT = {"X-LLM-Protocol": "openai-chat"}
COMPLETIONS = {"x-llm-protocol": "openai-completions"}  # any case, as HTTP allows
USER = [{"role": "user", "content": "Tell me a story"}]
CACHE_CONFIG = {"num_blocks": 48, "page_size": 16, "max_batch_tokens": 256}


@pytest.fixture(scope="module", params=["dynamic", "continuous"])
def served(request, tiny_model_dir: Path):
    if request.param == "dynamic":
        config = {"handler": {"warmup": False, "max_total_tokens": 200, "dtype": "float32"}}
        context = make_context("tiny", tiny_model_dir, config)
    else:
        handler_config = {
            "batching": "continuous",
            "continuous": CACHE_CONFIG,
            "max_total_tokens": 200,
            "warmup": False,
            "dtype": "float32",
        }
        context = make_context("tiny", tiny_model_dir, {"asyncCommunication": True, "handler": handler_config}, batch_size=1)
    handler = LLMHandler()
    handler.initialize(context)
    yield handler, context
    handler.service.stop()


def call(served, bodies: list, headers: list[dict[str, str]]):
    """Each request's (status, last output, content type) and the chunks sent for the batch."""
    handler, context = served
    outputs, chunks = run_raw(handler, context, bodies, headers)
    results = [(context.get_response_status(i)[0], out, context.get_response_content_type(i)) for i, out in enumerate(outputs)]
    return results, chunks


def one(served, body: dict, headers: dict[str, str]):
    [(status, out, content_type)], chunks = call(served, [body], [headers])
    return status, out, content_type, chunks


def chat_ids(served, messages=USER) -> list[int]:
    tokenizer = served[0].service.loaded.tokenizer
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def reference(served, ids: list[int], steps: int, presence=0.0, frequency=0.0, bias=None) -> str:
    """Greedy decoding with OpenAI's penalties, written from their definition."""
    loaded = served[0].service.loaded
    generated: list[int] = []
    with torch.inference_mode():
        for _ in range(steps):
            logits = loaded.model(torch.tensor([ids + generated])).logits[0, -1].float()
            for token in set(generated):
                logits[token] -= frequency * generated.count(token) + presence
            for token, value in (bias or {}).items():
                logits[int(token)] += value
            token = int(logits.argmax())
            if token in loaded.eos_token_ids:
                break
            generated.append(token)
    return loaded.tokenizer.decode(generated, skip_special_tokens=True)


def test_chat_answers_a_chat_completion_with_the_tokenizers_usage(served):
    status, out, content_type, _ = one(served, {"model": "tiny", "messages": USER, "max_tokens": 5, "temperature": 0}, CHAT)
    reply = ChatCompletion.model_validate_json(out)
    assert (status, content_type, reply.model, reply.object) == (200, "application/json", "tiny", "chat.completion")
    assert reply.choices[0].message.content == reference(served, chat_ids(served), 5)
    assert reply.usage.prompt_tokens == len(chat_ids(served))
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 5


def test_completions_answer_text_completions(served):
    status, out, _, _ = one(
        served, {"model": "tiny", "prompt": ["Once", "Twice"], "max_tokens": 3, "temperature": 0}, COMPLETIONS
    )
    reply = SDKCompletion.model_validate_json(out)
    assert status == 200 and [c.index for c in reply.choices] == [0, 1]
    tokenizer = served[0].service.loaded.tokenizer
    assert reply.choices[1].text == reference(served, tokenizer("Twice")["input_ids"], 3)


@pytest.mark.honours("dynamic", "seed")
def test_n_with_a_seed_gives_the_same_choices_again(served):
    body = {"prompt": "Once", "model": "tiny", "max_tokens": 6, "n": 2, "seed": 11, "temperature": 1.0}
    first = SDKCompletion.model_validate_json(one(served, body, COMPLETIONS)[1])
    again = SDKCompletion.model_validate_json(one(served, body, COMPLETIONS)[1])
    assert [c.text for c in first.choices] == [c.text for c in again.choices] and len(first.choices) == 2


@pytest.mark.honours("dynamic", "stream")
@pytest.mark.honours("continuous", "stream")
def test_a_streamed_chat_is_sse_whose_deltas_make_the_greedy_text(served):
    body = {"messages": USER, "max_tokens": 8, "temperature": 0}
    whole = ChatCompletion.model_validate_json(one(served, body, CHAT)[1]).choices[0].message.content
    status, out, content_type, chunks = one(served, {**body, "stream": True, "stream_options": {"include_usage": True}}, CHAT)
    assert (status, content_type) == (200, SSE)
    events = "".join(data.decode() for _, data in chunks) + out
    data = [event[len("data: ") :] for event in events.split("\n\n") if event]
    assert data[-1] == "[DONE]" and all(event.startswith("data: ") for event in events.split("\n\n") if event)
    parsed = [ChatCompletionChunk.model_validate_json(d) for d in data[:-1]]
    assert parsed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in parsed if c.choices) == whole
    assert parsed[-1].usage.completion_tokens == 8


@pytest.mark.parametrize(
    "penalties",
    [{"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"presence_penalty": -1.0, "frequency_penalty": 0.5}],
)
@pytest.mark.honours("dynamic", "presence_penalty", "frequency_penalty")
@pytest.mark.honours("continuous", "presence_penalty", "frequency_penalty")
def test_penalties_apply_as_openai_defines_them_beside_a_neighbour_without(served, penalties):
    ids = chat_ids(served)
    bodies = [
        {"messages": USER, "max_tokens": 12, "temperature": 0, **penalties},
        {"messages": USER, "max_tokens": 12, "temperature": 0},
    ]
    results, _ = call(served, bodies, [CHAT, CHAT])
    texts = [ChatCompletion.model_validate_json(out).choices[0].message.content for _, out, _ in results]
    presence, frequency = penalties.get("presence_penalty", 0.0), penalties.get("frequency_penalty", 0.0)
    assert texts[0] == reference(served, ids, 12, presence, frequency)
    assert texts[1] == reference(served, ids, 12)


@pytest.mark.honours("dynamic", "logit_bias")
@pytest.mark.honours("continuous", "logit_bias")
def test_logit_bias_applies_per_row(served):
    tokenizer = served[0].service.loaded.tokenizer
    token = tokenizer(" omelette", add_special_tokens=False)["input_ids"][0]
    bias = {str(token): 100}
    status, out, _, _ = one(served, {"messages": USER, "max_tokens": 4, "temperature": 0, "logit_bias": bias}, CHAT)
    text = ChatCompletion.model_validate_json(out).choices[0].message.content
    assert status == 200 and text == reference(served, chat_ids(served), 4, bias=bias) == tokenizer.decode([token] * 4)


@pytest.mark.honours("dynamic", "logprobs", "top_logprobs")
def test_logprobs_are_the_models_log_softmax_on_either_path(served):
    body = {"messages": USER, "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    reply = ChatCompletion.model_validate_json(one(served, body, CHAT)[1])
    tokens = reply.choices[0].logprobs.content
    assert len(tokens) == 4 and "".join(t.token for t in tokens) == reply.choices[0].message.content
    loaded = served[0].service.loaded
    ids = chat_ids(served)
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([ids])).logits[0, -1].float()
    expected = torch.log_softmax(logits, -1)
    first = tokens[0]
    assert math.isclose(first.logprob, float(expected.max()), abs_tol=1e-4)
    assert [t.logprob for t in first.top_logprobs] == sorted((t.logprob for t in first.top_logprobs), reverse=True)
    assert first.top_logprobs[0].token == first.token and len(first.top_logprobs) == 3


def test_errors_take_openai_shape_and_name_the_field(served):
    results, _ = call(
        served,
        [{"messages": USER, "tools": [{"type": "function"}]}, {"messages": USER, "max_tokens": 1000}, b"{not json"],
        [CHAT, CHAT, CHAT],
    )
    bodies = [json.loads(out)["error"] for _, out, _ in results]
    assert [status for status, _, _ in results] == [400, 422, 400]
    assert [b["param"] for b in bodies] == ["tools[0].function", "max_tokens", "body"]
    assert bodies[1]["message"].startswith("input tokens + max_tokens must be <= 200")
    assert all(set(b) == {"message", "type", "param", "code"} for b in bodies)


def test_an_unknown_protocol_header_is_refused_naming_it(served):
    status, out, _, _ = one(served, {"messages": USER}, {"X-LLM-Protocol": "openai-embeddings"})
    assert status == 400 and json.loads(out)["field"] == "X-LLM-Protocol"


def test_a_bare_openai_chat_body_on_the_predict_route_is_recognised(served):
    status, out, _, _ = one(served, {"messages": USER, "max_tokens": 2, "temperature": 0}, {})
    assert status == 200 and ChatCompletion.model_validate_json(out).choices[0].message.content == reference(
        served, chat_ids(served), 2
    )


def test_a_bare_completions_body_with_a_model_is_recognised(served):
    status, out, _, _ = one(served, {"model": "tiny", "prompt": "Once", "max_tokens": 2, "temperature": 0}, {})
    assert status == 200 and json.loads(out)["object"] == "text_completion"


def test_model_garden_chat_instances_answer_a_chat_completion_each(served):
    body = {"instances": [{"@requestFormat": "chatCompletions", "messages": USER, "max_tokens": 2, "temperature": 0}] * 2}
    status, out, _, _ = one(served, body, {})
    predictions = json.loads(out)["predictions"]
    expected = reference(served, chat_ids(served), 2)
    assert status == 200 and [ChatCompletion.model_validate(p).choices[0].message.content for p in predictions] == [expected] * 2


def test_native_requests_are_answered_as_before(served):
    status, out, content_type, _ = one(served, {"instances": ["Once"], "parameters": {"max_new_tokens": 2, "temperature": 0}}, {})
    assert (status, content_type) == (200, "application/json") and "generated_text" in json.loads(out)["predictions"][0]


@pytest.mark.honours("dynamic", "frequency_penalty", "logprobs")
def test_native_requests_get_penalties_and_logprobs_too(served):
    parameters = {"max_new_tokens": 3, "temperature": 0, "frequency_penalty": 1.5, "logprobs": True}
    status, out, _, _ = one(served, {"inputs": "Once", "parameters": parameters}, {})
    prediction = json.loads(out)["predictions"][0]
    tokenizer = served[0].service.loaded.tokenizer
    assert status == 200 and prediction["generated_text"] == reference(served, tokenizer("Once")["input_ids"], 3, frequency=1.5)
    assert len(prediction["logprobs"]) == 3


@pytest.mark.honours("dynamic", "details", "return_full_text")
@pytest.mark.honours("dynamic-beams", "details", "return_full_text")
@pytest.mark.honours("continuous", "details", "return_full_text")
def test_details_and_full_text_shape_the_predictions_of_rows_and_beams(served):
    """On the continuous app, "Once" runs in the manager and the beam prompt beside it."""
    instances = ["Once", {"prompt": "Twice", "num_beams": 2}]
    plain = {"instances": instances, "parameters": {"max_new_tokens": 3, "temperature": 0}}
    shaped = {"instances": instances, "parameters": {**plain["parameters"], "details": True, "return_full_text": True}}
    results, _ = call(served, [plain, shaped], [{}, {}])
    [bare, full] = [json.loads(out)["predictions"] for _, out, _ in results]
    assert [status for status, _, _ in results] == [200, 200]
    assert [set(p) for p in bare] == [{"generated_text"}] * 2
    for prompt, short, long in zip(["Once", "Twice"], bare, full):
        assert long["generated_text"] == prompt + short["generated_text"]
        assert (long["finish_reason"], long["generated_tokens"]) == ("length", 3) and long["prompt_tokens"] > 0


def test_the_penalty_cases_above_change_the_greedy_text(served):
    """Guards the penalty test against passing vacuously: each case's reference differs from plain greedy."""
    ids = chat_ids(served)
    plain = reference(served, ids, 12)
    assert all(reference(served, ids, 12, p, f) != plain for p, f in [(0.0, 2.0), (2.0, 0.0), (-1.0, 0.5)])


def test_a_stream_with_logprobs_sends_them_with_each_choices_last_chunk(served):
    body = {"messages": USER, "max_tokens": 4, "temperature": 0, "logprobs": True, "stream": True}
    _, out, _, chunks = one(served, body, CHAT)
    events = "".join(data.decode() for _, data in chunks) + out
    parsed = [ChatCompletionChunk.model_validate_json(e[6:]) for e in events.split("\n\n") if e.startswith("data: {")]
    last = parsed[-1].choices[0]
    assert last.finish_reason == "length" and len(last.logprobs.content) == 4
    assert "".join(t.token for t in last.logprobs.content) == "".join(c.choices[0].delta.content or "" for c in parsed)


class FailsAfterStreaming:
    """The real scheduler, then a failure: what a generation that breaks after its first pieces looks like."""

    def __init__(self, real):
        self.real = real
        self.honours = real.honours

    async def complete(self, prompts, sink=None):
        await self.real.complete(prompts, sink)
        raise RuntimeError("injected after the stream began")


def test_an_error_after_the_stream_began_is_an_sse_error_event(served):
    handler = served[0]
    real = handler.service.scheduler
    handler.service.scheduler = FailsAfterStreaming(real)
    try:
        status, out, content_type, chunks = one(
            served, {"messages": USER, "max_tokens": 6, "temperature": 0, "stream": True}, CHAT
        )
    finally:
        handler.service.scheduler = real
    assert chunks and (status, content_type) == (200, SSE)
    events = [e for e in out.split("\n\n") if e]
    assert json.loads(events[0][len("data: ") :])["error"]["type"] == "server_error" and events[-1] == "data: [DONE]"
