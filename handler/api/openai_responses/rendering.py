"""Completions rendered as the Responses API's `response` object, and its stream of typed events.

One `Output` per answer turns the neutral pieces (`structured.tools.CallEvent`: text, a call's
start, its arguments, its end) into output items, `message` with `output_text` and
`function_call` with `call_id`, and, when streaming, into the events the SDK reads, each with
its `sequence_number`: `response.created`, `response.in_progress`, then per item
`response.output_item.added`, (`response.content_part.added`, `response.output_text.delta`...,
`response.output_text.done`, `response.content_part.done`) or
(`response.function_call_arguments.delta`..., `.done`), `response.output_item.done`, and last
`response.completed` (or `response.incomplete` when `max_output_tokens` cut it). The whole
answer is built by the same object, so a streamed answer and a whole one have the same items.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Any

from handler.decoding.stopping import FinishReason
from handler.errors import RequestError
from handler.structured.tools import CallEvent

if TYPE_CHECKING:
    from handler.api.openai_responses.parsing import ResponsesRequest
    from handler.decoding.sequence import Completion
    from handler.pipeline.prompts import Prompt

SSE = "text/event-stream"


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class Output:
    """One response's output items, built from pieces; `events` holds the SSE events not yet sent."""

    def __init__(self, request: ResponsesRequest, model: str, stream: bool):
        self.request = request
        self.id = new_id("resp")
        self.model = request.model or model
        self.created = int(time.time())
        self.stream = stream
        self.items: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None
        self.sequence = 0
        self.events: list[str] = []
        if stream:
            self._emit("response.created", response=self.response("in_progress"))
            self._emit("response.in_progress", response=self.response("in_progress"))

    def feed(self, events: list[CallEvent]) -> None:
        for event in events:
            if event.kind == "text":
                self._text(event.text)
            elif event.kind == "start":
                assert event.call is not None, "a call's start names the call"
                self._close()
                item = {"id": new_id("fc"), "type": "function_call", "status": "in_progress", "call_id": event.call.id,
                        "name": event.call.name, "arguments": ""}  # fmt: skip
                self._add(item)
            elif event.kind == "arguments":
                item = self._current()
                item["arguments"] += event.text
                self._emit("response.function_call_arguments.delta", item_id=item["id"], output_index=self._index(),
                           delta=event.text)  # fmt: skip
            else:
                self._close()

    def finish(self, prompt: Prompt, completion: Completion) -> dict[str, Any]:
        """The whole response; when streaming, its last event is queued too."""
        self._close()
        cut = completion.finish_reason == FinishReason.LENGTH
        status = "incomplete" if cut else "completed"
        usage = {
            "input_tokens": len(prompt.input_ids),
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": completion.generated_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": len(prompt.input_ids) + completion.generated_tokens,
        }
        whole = self.response(status, usage)
        if self.stream:
            self._emit(f"response.{status}", response=whole)
        return whole

    def response(self, status: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        done = status != "in_progress"
        texts = [part["text"] for item in self.items if item["type"] == "message" for part in item["content"]]
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "model": self.model,
            "output": list(self.items) if done else [],
            "output_text": "".join(texts),
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "background": False,
            "truncation": "disabled",
            "usage": usage,
            **self.request.echo,
        }

    def _current(self) -> dict[str, Any]:
        assert self.open is not None, "an item is open once _add has run"
        return self.open

    def _text(self, text: str) -> None:
        if self.open is None or self.open["type"] != "message":
            self._close()
            self._add({"id": new_id("msg"), "type": "message", "status": "in_progress", "role": "assistant", "content": []})
            part = {"type": "output_text", "text": "", "annotations": []}
            self._current()["content"].append(part)
            self._emit("response.content_part.added", item_id=self._current()["id"], output_index=self._index(), content_index=0,
                       part=dict(part))  # fmt: skip
        message = self._current()
        message["content"][0]["text"] += text
        self._emit("response.output_text.delta", item_id=message["id"], output_index=self._index(), content_index=0,
                   delta=text, logprobs=[])  # fmt: skip

    def _add(self, item: dict[str, Any]) -> None:
        self.items.append(item)
        self.open = item
        self._emit(
            "response.output_item.added",
            output_index=self._index(),
            item=dict(item, content=[]) if "content" in item else dict(item),
        )

    def _close(self) -> None:
        item, self.open = self.open, None
        if item is None:
            return
        index = self.items.index(item)
        item["status"] = "completed"
        if item["type"] == "message":
            part = item["content"][0]
            self._emit("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                       text=part["text"], logprobs=[])  # fmt: skip
            self._emit("response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=part)
        else:
            self._emit("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                       name=item["name"], arguments=item["arguments"])  # fmt: skip
        self._emit("response.output_item.done", output_index=index, item=item)

    def _index(self) -> int:
        return len(self.items) - 1

    def _emit(self, kind: str, **fields: Any) -> None:
        if self.stream:
            self.events.append(sse(kind, {"type": kind, "sequence_number": self.sequence, **fields}))
            self.sequence += 1

    def take(self) -> str:
        events, self.events = self.events, []
        return "".join(events)


def sse(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


def error_event(error: RequestError, sequence: int) -> str:
    """A failure once the stream began: the SDK raises on an `error` event."""
    code = error.details.get("code") or ("server_error" if error.status >= 500 else "invalid_request_error")
    data = {"type": "error", "sequence_number": sequence, "code": code, "message": error.message, "param": error.field}
    return sse("error", data)
