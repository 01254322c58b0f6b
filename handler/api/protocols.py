"""Which protocol a request speaks, and one exchange per request that parses and renders in it.

The front names the protocol in a header (`X-LLM-Protocol: openai-chat` or
`openai-completions`, for its `/v1/...` routes); without one, the body's own shape decides,
as Vertex's predict route carries several: the native shapes (`requests`), a bare OpenAI
chat body (top-level `messages`) or completions body (`model` and `prompt`), and Model
Garden's `@requestFormat: chatCompletions` instances. Every exchange has the same methods,
so the service and the adapter never ask which one they hold.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

from handler.errors import RequestError
from handler.api.openai.exchange import OpenAIExchange, VertexChatExchange, is_vertex_chat
from handler.api.openai.parsing import CHAT, COMPLETIONS
from handler.pipeline.prompts import Prompt
from handler.pipeline.shapes import Instance, RequestShape, parse_body
from handler.api.native import Answer, NativeExchange

PROTOCOL_HEADER = "X-LLM-Protocol"
PROTOCOLS = {"openai-chat": CHAT, "openai-completions": COMPLETIONS}


class Exchange(Protocol):
    """One request in its protocol: `parse`, then `begin` with its prompts, then pieces and a body.

    `piece` is called only for prompts that stream; `stream_error` only when `stream` is true:
    the pieces are then the protocol's own stream (SSE), so an error after the first is an
    event of it rather than a status."""

    stream: bool
    content_type: str

    def parse(self, body: Any, shape: RequestShape) -> tuple[Instance, ...]: ...

    def rename(self, error: RequestError) -> RequestError: ...

    def error_body(self, error: RequestError) -> str: ...

    def begin(self, prompts: Sequence[Prompt]) -> None: ...

    def body(self, answer: Answer) -> str: ...


def named_exchange(protocol: str | None, model: str) -> Exchange:
    """The exchange a header names, before the body is read (so even a bad body gets its protocol's errors)."""
    if protocol is None:
        return NativeExchange()
    if protocol not in PROTOCOLS:
        raise RequestError(
            f"{PROTOCOL_HEADER} must be one of {', '.join(PROTOCOLS)}, got {protocol[:64]!r}", PROTOCOL_HEADER
        )
    return OpenAIExchange(PROTOCOLS[protocol], model)


def sniffed_exchange(body: Any, model: str) -> Exchange:
    """Without a header: the protocol the body's shape says, native unless it is plainly OpenAI's."""
    if isinstance(body, dict) and "instances" not in body:
        if "messages" in body:
            return OpenAIExchange(CHAT, model)
        if "model" in body and "prompt" in body:
            return OpenAIExchange(COMPLETIONS, model)
    if is_vertex_chat(body):
        return VertexChatExchange(model)
    return NativeExchange()
