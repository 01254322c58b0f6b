"""One Anthropic request's way through the pipeline: parsed at the edge, answered in Anthropic's shapes.

`AnthropicExchange` serves `POST /v1/messages` (a `message`, or its SSE events) and
`POST /v1/messages/count_tokens` (`{"input_tokens": N}`). Counting needs the chat template and
the tokenizer, as a prompt does, and nothing else: its exchange does not generate
(`generates` is False), so the service answers it from its prompts alone, with the same
parsing, template and limits a real request meets.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from handler.api.anthropic.parsing import COUNT_TOKENS, MESSAGES, AnthropicRequest, parse_anthropic
from handler.api.anthropic.rendering import SSE, Answer, Reply, StreamRenderer, error_json, response, token_count
from handler.errors import RequestError
from handler.pipeline.prompts import Prompt
from handler.pipeline.shapes import Instance, RequestShape

JSON = "application/json"


class AnthropicExchange:
    def __init__(self, endpoint: str, model: str):
        self.endpoint = endpoint
        self.model = model
        self.request: AnthropicRequest | None = None
        self.prompts: Sequence[Prompt] = ()
        self.renderer: StreamRenderer | None = None

    @property
    def stream(self) -> bool:
        return self.request is not None and self.endpoint == MESSAGES and self.request.stream

    @property
    def generates(self) -> bool:
        return self.endpoint != COUNT_TOKENS

    @property
    def content_type(self) -> str:
        return SSE if self.stream else JSON

    def parse(self, body: Any, shape: RequestShape) -> tuple[Instance, ...]:
        self.request = parse_anthropic(self.endpoint, body, shape)
        return self.request.instances

    def error_body(self, error: RequestError) -> str:
        return error_json(error)

    def begin(self, prompts: Sequence[Prompt]) -> None:
        """Keeps the prompts (their token counts answer `count_tokens` and open a stream)."""
        self.prompts = prompts
        if self.stream:
            self.renderer = StreamRenderer(self._reply(), prompts)

    def piece(self, index: int, text: str) -> str:
        assert self.renderer is not None, "piece before begin: only a streaming request gets pieces"
        return self.renderer.piece(index, text)

    def body(self, answer: Answer) -> str:
        """The whole answer, the token count, or, for a stream, its end."""
        if not self.generates:
            return json.dumps(token_count(self.prompts))
        if self.renderer is not None:
            return self.renderer.end(answer)
        return json.dumps(response(self._reply(), answer))

    def stream_error(self, error: RequestError) -> str:
        """An error once the stream has begun: an `error` event, since the status line has gone."""
        assert self.renderer is not None, "stream_error before begin: only a begun stream has one"
        return self.renderer.error(error)

    def _reply(self) -> Reply:
        assert self.request is not None, "the exchange renders only what it parsed"
        return Reply.new(self.request.model or self.model)
