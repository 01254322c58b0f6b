"""The answer's shape: Vertex-style `{"predictions": [...]}` bodies and the stream's JSON lines.

The OpenAI API renders the same completions with its own package beside this one (`handler.api.openai`).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from handler.decoding.logprobs import TokenLogprob
from handler.decoding.sequence import Completion
from handler.errors import RequestError
from handler.pipeline.prompts import Prompt
from handler.pipeline.shapes import Instance, RequestShape, parse_body

JSON = "application/json"
# One request's answer: each prompt with its completions, in order.
Answer = list[tuple[Prompt, list[Completion]]]


def prediction(completion: Completion, prompt: Prompt) -> dict[str, Any]:
    text = prompt.text + completion.text if prompt.params.return_full_text else completion.text
    result: dict[str, Any] = {"generated_text": text}
    if prompt.params.details:
        result.update(
            finish_reason=completion.finish_reason.value,
            prompt_tokens=completion.prompt_tokens,
            generated_tokens=completion.generated_tokens,
        )
    if prompt.params.logprobs:
        result["logprobs"] = [_token(token) for token in completion.logprobs]
    return result


def _token(token: TokenLogprob) -> dict[str, Any]:
    top = [{"id": t.token_id, "text": t.text, "logprob": t.logprob} for t in token.top]
    return {"id": token.token_id, "text": token.text, "logprob": token.logprob, "top_logprobs": top}


def body(answer: Answer) -> str:
    return json.dumps({"predictions": [prediction(c, prompt) for prompt, completions in answer for c in completions]})


def chunk(prediction_index: int, text: str) -> str:
    """One piece of a streaming request's text; `index` is its prediction's position in `predictions`."""
    return json.dumps({"index": prediction_index, "text": text}) + "\n"


def prediction_offsets(prompts: list[Prompt]) -> list[int]:
    """Where each prompt's first sequence sits in its request's `predictions`."""
    offsets, total = [], 0
    for prompt in prompts:
        offsets.append(total)
        total += prompt.params.num_return_sequences
    return offsets


class NativeExchange:
    """The Vertex, TGI and plain-text shapes; a stream is JSON lines ending with the usual body."""

    stream = False
    content_type = JSON
    generates = True

    def parse(self, body: Any, shape: RequestShape) -> tuple[Instance, ...]:
        return parse_body(body, shape)

    def error_body(self, error: RequestError) -> str:
        return error.json()

    def begin(self, prompts: Sequence[Prompt]) -> None:
        """Nothing to open: the pieces are self-contained JSON lines."""

    def piece(self, index: int, text: str) -> str:
        return chunk(index, text)

    def body(self, answer: Answer) -> str:
        return body(answer)

    def stream_error(self, error: RequestError) -> str:
        """The error as the stream's last line, in the shape of every native error body."""
        return error.json()
