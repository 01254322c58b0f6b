"""Completions rendered as Anthropic's objects: the `message`, its SSE events, `count_tokens`, errors.

A stream is the event sequence Anthropic sends and its SDK's `messages.stream` reads:
`message_start`, `content_block_start`, `ping`, then one `content_block_delta` (`text_delta`)
per piece, `content_block_stop`, `message_delta` (stop reason, output tokens), `message_stop`.
Each event is `event: NAME` and `data: {...}` whose `type` repeats the name. An error once the
stream has begun is an `event: error` with the same body as an error answer.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from handler.decoding.stopping import FinishReason
from handler.errors import RequestError
from handler.pipeline.prompts import Prompt

if TYPE_CHECKING:
    from handler.decoding.sequence import Completion

SSE = "text/event-stream"
# Anthropic's error types by status; any other 4xx is an invalid request, any other 5xx an api_error.
ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
# One request's answer: each prompt with its completions, in order (an Anthropic request has one).
Answer = Sequence[tuple[Prompt, Sequence["Completion"]]]


@dataclass(frozen=True)
class Reply:
    """What every part of one answer shares."""

    model: str
    id: str

    @classmethod
    def new(cls, model: str) -> Reply:
        return cls(model, f"msg_{uuid.uuid4().hex}")

    def message(
        self, content: list[dict[str, Any]], stop_reason: str | None, stop_sequence: str | None, usage: dict[str, int]
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": usage,
        }


def stop_reason(completion: Completion) -> str:
    """`end_turn` when the model ended, `stop_sequence` at a stop string, `max_tokens` at the limit
    (or the app's deadline, which cuts a generation as the limit does)."""
    if completion.finish_reason == FinishReason.LENGTH:
        return "max_tokens"
    if completion.finish_reason == FinishReason.STOP and completion.stop_sequence is not None:
        return "stop_sequence"
    return "end_turn"


def only(answer: Answer) -> tuple[Prompt, Completion]:
    """An Anthropic request's one completion: one conversation, never `n` choices."""
    [(prompt, [completion])] = answer
    return prompt, completion


def response(reply: Reply, answer: Answer) -> dict[str, Any]:
    prompt, completion = only(answer)
    usage = {"input_tokens": len(prompt.input_ids), "output_tokens": completion.generated_tokens}
    content = [{"type": "text", "text": completion.text}]
    return reply.message(content, stop_reason(completion), completion.stop_sequence, usage)


def token_count(prompts: Sequence[Prompt]) -> dict[str, int]:
    """`count_tokens`'s answer: the tokens the conversation is prompted with, chat template included."""
    return {"input_tokens": sum(len(prompt.input_ids) for prompt in prompts)}


def event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n"


class StreamRenderer:
    """One streaming request's events: the opening with the first piece (or at the end, when no
    text came), a delta per piece, and the closing with the stop reason and the output tokens."""

    def __init__(self, reply: Reply, prompts: Sequence[Prompt]):
        self.reply = reply
        self.input_tokens = sum(len(prompt.input_ids) for prompt in prompts)
        self.opened = False

    def piece(self, index: int, text: str) -> str:
        delta = {"index": 0, "delta": {"type": "text_delta", "text": text}}
        return self._open() + event("content_block_delta", delta)

    def end(self, answer: Answer) -> str:
        _, completion = only(answer)
        closing = [
            event("content_block_stop", {"index": 0}),
            event(
                "message_delta",
                {
                    "delta": {"stop_reason": stop_reason(completion), "stop_sequence": completion.stop_sequence},
                    "usage": {"output_tokens": completion.generated_tokens},
                },
            ),
            event("message_stop", {}),
        ]
        return self._open() + "".join(closing)

    def error(self, error: RequestError) -> str:
        return event("error", {"error": error_body(error)["error"]})

    def _open(self) -> str:
        if self.opened:
            return ""
        self.opened = True
        usage = {"input_tokens": self.input_tokens, "output_tokens": 0}
        return (
            event("message_start", {"message": self.reply.message([], None, None, usage)})
            + event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
            + event("ping", {})
        )


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(error: RequestError) -> dict[str, Any]:
    """Anthropic's error shape. It has no slot for the field at fault, so the message leads with it,
    as Anthropic's own messages do (`max_tokens: Field required`), unless it already does."""
    message = error.message
    if error.field is not None and not message.startswith(error.field):
        message = f"{error.field}: {message}"
    return {"type": "error", "error": {"type": error_type(error.status), "message": message}}


def error_json(error: RequestError) -> str:
    return json.dumps(error_body(error))
