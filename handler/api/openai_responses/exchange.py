"""One Responses API request (`POST /v1/responses`) through the pipeline: parsed at the edge, answered as a `response`.

Its errors are OpenAI's `{"error": {...}}`, as chat's are; a stream's are an `error` event.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from handler.api.openai.rendering import Answer, error_json
from handler.api.openai_responses.parsing import ResponsesRequest, parse_responses
from handler.api.openai_responses.rendering import SSE, Output, error_event
from handler.errors import RequestError
from handler.pipeline.prompts import Prompt
from handler.pipeline.shapes import Instance, RequestShape
from handler.structured.tools import CallEvent, CallSplitter

JSON = "application/json"


class ResponsesExchange:
    generates = True

    def __init__(self, model: str):
        self.model = model
        self.request: ResponsesRequest | None = None
        self.output: Output | None = None
        self.splitter: CallSplitter | None = None

    @property
    def stream(self) -> bool:
        return self.request is not None and self.request.stream

    @property
    def content_type(self) -> str:
        return SSE if self.stream else JSON

    def parse(self, body: Any, shape: RequestShape) -> tuple[Instance, ...]:
        self.request = parse_responses(body, shape)
        return (self.request.instance,)

    def error_body(self, error: RequestError) -> str:
        return error_json(error)

    def begin(self, prompts: Sequence[Prompt]) -> None:
        """Called once the prompt is ready: the answer's items start here, streamed or not."""
        assert self.request is not None, "begin comes after parse"
        self.output = Output(self.request, self.model, self.stream)
        self.splitter = CallSplitter() if prompts[0].may_call else None

    def piece(self, index: int, text: str) -> str:
        output = self._begun()
        output.feed(self._events(text))
        return output.take()

    def body(self, answer: Answer) -> str:
        """The whole `response`, or, for a stream, its last events."""
        [(prompt, [completion])] = answer
        output = self._begun()
        if not self.stream:
            output.feed(self._events(completion.text))
        if self.splitter is not None:
            output.feed(self.splitter.finish())
        whole = output.finish(prompt, completion)
        return output.take() if self.stream else json.dumps(whole)

    def stream_error(self, error: RequestError) -> str:
        return error_event(error, self.output.sequence if self.output else 0)

    def _begun(self) -> Output:
        assert self.output is not None, "pieces and the body come after begin"
        return self.output

    def _events(self, text: str) -> list[CallEvent]:
        if self.splitter is not None:
            return self.splitter.feed(text)
        return [CallEvent("text", text)] if text else []
