"""Completions rendered as Anthropic's objects: the `message`, its SSE events, `count_tokens`, errors.

A stream is the event sequence Anthropic sends and its SDK's `messages.stream` reads:
`message_start`, then per content block `content_block_start` (the first followed by `ping`),
its `content_block_delta`s (`text_delta` for text, `input_json_delta` with `partial_json` for a
`tool_use` block's input), `content_block_stop`; last `message_delta` (stop reason, output
tokens) and `message_stop`. Each event is `event: NAME` and `data: {...}` whose `type` repeats
the name. An error once the stream has begun is an `event: error` with the same body as an
error answer.

A prompt that may call tools has its text split by `structured.tools` (whole, or piece by piece
through a `CallSplitter`): text becomes `text` blocks, calls `tool_use` blocks (`toolu_` ids,
`input` an object), and an answer that ended after calling stops with `tool_use`.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from handler.api.anthropic.parsing import CALL_ID_PREFIX
from handler.decoding.stopping import FinishReason
from handler.errors import RequestError
from handler.pipeline.prompts import Prompt
from handler.structured.tools import CallEvent, CallSplitter, ToolCall, split_calls

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


def stop_reason(completion: Completion, called: bool = False) -> str:
    """`end_turn` when the model ended (`tool_use` when it ended after calling), `stop_sequence` at a
    stop string, `max_tokens` at the limit (or the app's deadline, which cuts a generation as the limit does)."""
    if completion.finish_reason == FinishReason.LENGTH:
        return "max_tokens"
    if completion.finish_reason == FinishReason.STOP and completion.stop_sequence is not None:
        return "stop_sequence"
    return "tool_use" if called else "end_turn"


def tool_input(arguments: str) -> dict[str, Any]:
    """A call's `input`: its arguments, which the grammar kept to an object. A call cut by `max_tokens`
    has arguments that do not parse: its input is `{}` (a stream has sent the pieces as written)."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def tool_use(call: ToolCall, whole: bool = True) -> dict[str, Any]:
    """A `tool_use` block; a stream opens it with an empty input and sends the input as `input_json_delta`s."""
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": tool_input(call.arguments) if whole else {}}


def only(answer: Answer) -> tuple[Prompt, Completion]:
    """An Anthropic request's one completion: one conversation, never `n` choices."""
    [(prompt, [completion])] = answer
    return prompt, completion


def response(reply: Reply, answer: Answer) -> dict[str, Any]:
    prompt, completion = only(answer)
    usage = {"input_tokens": len(prompt.input_ids), "output_tokens": completion.generated_tokens}
    text, calls = split_calls(completion.text, CALL_ID_PREFIX) if prompt.may_call else (completion.text, ())
    content = [{"type": "text", "text": text}] if text or not calls else []
    content += [tool_use(call) for call in calls]
    return reply.message(content, stop_reason(completion, bool(calls)), completion.stop_sequence, usage)


def token_count(prompts: Sequence[Prompt]) -> dict[str, int]:
    """`count_tokens`'s answer: the tokens the conversation is prompted with, chat template included."""
    return {"input_tokens": sum(len(prompt.input_ids) for prompt in prompts)}


def event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n"


class StreamRenderer:
    """One streaming request's events: the message's opening with its first block, each block's
    start, deltas and stop, and the closing with the stop reason and the output tokens. A stream
    that sent no block has one empty text block, as Anthropic's has."""

    def __init__(self, reply: Reply, prompts: Sequence[Prompt]):
        self.reply = reply
        self.input_tokens = sum(len(prompt.input_ids) for prompt in prompts)
        self.splitter = CallSplitter(CALL_ID_PREFIX) if prompts[0].may_call else None
        self.blocks = 0  # blocks opened so far; the open one is the last
        self.open: str | None = None  # the open block's type

    def piece(self, index: int, text: str) -> str:
        return self._events(self.splitter.feed(text) if self.splitter else [CallEvent("text", text)])

    def end(self, answer: Answer) -> str:
        _, completion = only(answer)
        out = self._events(self.splitter.finish()) if self.splitter else ""
        if not self.blocks:
            out += self._start({"type": "text", "text": ""})
        out += self._stop()
        called = self.splitter is not None and bool(self.splitter.calls)
        delta = {"stop_reason": stop_reason(completion, called), "stop_sequence": completion.stop_sequence}
        out += event("message_delta", {"delta": delta, "usage": {"output_tokens": completion.generated_tokens}})
        return out + event("message_stop", {})

    def error(self, error: RequestError) -> str:
        return event("error", {"error": error_body(error)["error"]})

    def _events(self, events: list[CallEvent]) -> str:
        out = []
        for item in events:
            if item.kind == "text" and item.text:
                if self.open != "text":
                    out.append(self._stop() + self._start({"type": "text", "text": ""}))
                out.append(self._delta({"type": "text_delta", "text": item.text}))
            elif item.kind == "start":
                assert item.call is not None, "a call's start names the call"
                out.append(self._stop() + self._start(tool_use(item.call, whole=False)))
            elif item.kind == "arguments":
                out.append(self._delta({"type": "input_json_delta", "partial_json": item.text}))
            elif item.kind == "end":
                out.append(self._stop())
        return "".join(out)

    def _start(self, block: dict[str, Any]) -> str:
        """A block's start; the first also opens the message and is followed by a `ping`, as Anthropic's is."""
        first = not self.blocks
        opening = ""
        if first:
            usage = {"input_tokens": self.input_tokens, "output_tokens": 0}
            opening = event("message_start", {"message": self.reply.message([], None, None, usage)})
        self.blocks += 1
        self.open = block["type"]
        started = event("content_block_start", {"index": self.blocks - 1, "content_block": block})
        return opening + started + (event("ping", {}) if first else "")

    def _delta(self, delta: dict[str, Any]) -> str:
        return event("content_block_delta", {"index": self.blocks - 1, "delta": delta})

    def _stop(self) -> str:
        if self.open is None:
            return ""
        self.open = None
        return event("content_block_stop", {"index": self.blocks - 1})


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
