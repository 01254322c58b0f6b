"""The answer's shape: Vertex-style `{"predictions": [...]}` bodies and the stream's JSON lines.

Another protocol (an OpenAI API) renders the same completions with its own module beside this one.
"""

from __future__ import annotations

import json
from typing import Any

from handler.prompts import Prompt
from handler.sequence import Completion

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
    return result


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
