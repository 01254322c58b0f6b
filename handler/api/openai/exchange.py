"""One OpenAI request's way through the pipeline: parsed at the edge, answered in OpenAI's shapes.

An exchange is made per request, once its protocol is known (a header from the front, or
the body's own shape on Vertex's predict route). It parses the body into instances, each
naming its fields as OpenAI does (`messages`, `max_tokens`) for the pipeline's later errors,
and renders the answer: a JSON
object, or, when streaming, SSE events piece by piece and then the end of the stream.
`VertexChatExchange` serves Model Garden's `{"instances": [{"@requestFormat":
"chatCompletions", ...}]}`: each instance a chat body, each prediction a `chat.completion`.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from handler.api.openai.parsing import CHAT, OpenAIRequest, parse_openai
from handler.api.openai.rendering import SSE, Answer, Reply, StreamRenderer, error_json, response
from handler.errors import RequestError
from handler.pipeline.prompts import Prompt
from handler.pipeline.shapes import Instance, RequestShape, check_count

JSON = "application/json"
REQUEST_FORMAT = "@requestFormat"
CHAT_FORMAT = "chatCompletions"


class OpenAIExchange:
    def __init__(self, endpoint: str, model: str):
        self.endpoint = endpoint
        self.model = model
        self.request: OpenAIRequest | None = None
        self.renderer: StreamRenderer | None = None

    @property
    def stream(self) -> bool:
        return self.request is not None and self.request.stream

    generates = True

    @property
    def content_type(self) -> str:
        return SSE if self.stream else JSON

    def parse(self, body: Any, shape: RequestShape) -> tuple[Instance, ...]:
        self.request = parse_openai(self.endpoint, body, shape)
        return self.request.instances

    def error_body(self, error: RequestError) -> str:
        return error_json(error)

    def begin(self, prompts: Sequence[Prompt]) -> None:
        """Called once the prompts are ready, before any piece."""
        if self.stream:
            self.renderer = StreamRenderer(self._reply(), prompts, self._parsed().include_usage)

    def piece(self, index: int, text: str) -> str:
        assert self.renderer is not None, "piece before begin: only a streaming request gets pieces"
        return self.renderer.piece(index, text)

    def body(self, answer: Answer) -> str:
        """The whole answer, or, for a stream, its end."""
        if self.renderer is not None:
            return self.renderer.end(answer)
        return json.dumps(response(self._reply(), answer))

    def stream_error(self, error: RequestError) -> str:
        """An error once the stream has begun: an SSE event, since the status line has gone."""
        assert self.renderer is not None, "stream_error before begin: only a begun stream has one"
        return self.renderer.error(error)

    def _parsed(self) -> OpenAIRequest:
        assert self.request is not None, "the exchange renders only what it parsed"
        return self.request

    def _reply(self) -> Reply:
        return Reply.new(self.endpoint, self._parsed().model or self.model)


class VertexChatExchange:
    """Model Garden's chat instances through `predict`: one chat request per instance, never streamed."""

    stream = False
    content_type = JSON
    generates = True

    def __init__(self, model: str):
        self.model = model
        self.requests: list[OpenAIRequest] = []

    def parse(self, body: dict[str, Any], shape: RequestShape) -> tuple[Instance, ...]:
        instances = body["instances"]
        check_count(len(instances), "instances", shape.max_instances)
        unknown = sorted(set(body) - {"instances", "parameters"})
        if unknown or body.get("parameters"):
            field = unknown[0] if unknown else "parameters"
            message = f"{field} is not used with {REQUEST_FORMAT} instances: each instance is a whole chat body"
            raise RequestError(message, field)
        for i, instance in enumerate(instances):
            where = f"instances[{i}]"
            chat = {key: value for key, value in instance.items() if key != REQUEST_FORMAT}
            request = parse_openai(CHAT, chat, shape, f"{where}.")
            if request.stream:
                message = f"{where}.stream is not available through predict; use streamRawPredict"
                raise RequestError(message, f"{where}.stream")
            self.requests.append(request)
        return tuple(request.instances[0] for request in self.requests)

    def error_body(self, error: RequestError) -> str:
        return error_json(error)

    def begin(self, prompts: Sequence[Prompt]) -> None:
        """Never streamed: nothing to open."""

    def piece(self, index: int, text: str) -> str:
        raise RuntimeError("Model Garden chat instances never stream: parse refuses `stream`")

    def stream_error(self, error: RequestError) -> str:
        raise RuntimeError("Model Garden chat instances never stream: parse refuses `stream`")

    def body(self, answer: Answer) -> str:
        predictions = [
            response(Reply.new(CHAT, request.model or self.model), [one]) for request, one in zip(self.requests, answer)
        ]
        return json.dumps({"predictions": predictions})


def is_vertex_chat(body: Any) -> bool:
    """`instances` tagged `"@requestFormat": "chatCompletions"`; every instance must say so if one does."""
    if not isinstance(body, dict) or not isinstance(body.get("instances"), list) or not body["instances"]:
        return False
    tagged = [isinstance(i, dict) and i.get(REQUEST_FORMAT) == CHAT_FORMAT for i in body["instances"]]
    if any(tagged) and not all(tagged):
        untagged = tagged.index(False)
        raise RequestError(
            f"instances[{untagged}] lacks {REQUEST_FORMAT}: {CHAT_FORMAT!r} while others have it; shapes do not mix",
            f"instances[{untagged}]",
        )
    if not any(tagged):
        formats = [(n, i[REQUEST_FORMAT]) for n, i in enumerate(body["instances"]) if isinstance(i, dict) and REQUEST_FORMAT in i]
        if formats:
            n, other = formats[0]
            message = f"{REQUEST_FORMAT} {other!r} is not served; only {CHAT_FORMAT!r}"
            raise RequestError(message, f"instances[{n}].{REQUEST_FORMAT}")
    return all(tagged)
