"""Which protocol a request speaks, and one exchange per request that parses and renders in it.

The front names the protocol in a header (`X-LLM-Protocol: openai-chat`, `openai-completions`,
`openai-responses`, `anthropic-messages` or `anthropic-count-tokens`, for its `/v1/...` routes);
without one, the body's own shape decides, as Vertex's predict route carries several: the native
shapes (`pipeline.shapes`), an Anthropic body (top-level `anthropic_version`, as Vertex's Anthropic
bodies have it), a bare OpenAI chat body (top-level `messages`), completions body (`model` and
`prompt`) or Responses body (`model` and `input`), and Model Garden's `@requestFormat:
chatCompletions` instances. Every exchange has the same methods,
so the service and the adapter never ask which one they hold.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

from handler.api.anthropic.exchange import AnthropicExchange
from handler.api.anthropic.parsing import COUNT_TOKENS, MESSAGES
from handler.api.native import Answer, NativeExchange
from handler.api.openai.exchange import OpenAIExchange, VertexChatExchange, is_vertex_chat
from handler.api.openai.parsing import CHAT, COMPLETIONS
from handler.api.openai_responses.exchange import ResponsesExchange
from handler.errors import RequestError
from handler.pipeline.prompts import Prompt
from handler.pipeline.shapes import Instance, RequestShape

PROTOCOL_HEADER = "X-LLM-Protocol"
OPENAI_PROTOCOLS = {"openai-chat": CHAT, "openai-completions": COMPLETIONS}
ANTHROPIC_PROTOCOLS = {"anthropic-messages": MESSAGES, "anthropic-count-tokens": COUNT_TOKENS}
PROTOCOLS = {**OPENAI_PROTOCOLS, **ANTHROPIC_PROTOCOLS}
# Vertex's Anthropic bodies carry their API version in the body (the model is in the URL).
ANTHROPIC_VERSION = "anthropic_version"
RESPONSES = "openai-responses"


@runtime_checkable
class Exchange(Protocol):
    """One request in its protocol: `parse`, then `begin` with its prompts, then pieces and a body.

    `parse` gives each instance the fields' names the protocol uses (`pipeline.shapes.Fields`),
    so the pipeline's later errors already name what the client sent. An exchange that does not
    `generate` (Anthropic's `count_tokens`) is answered from its prompts alone. `piece` is called only
    for prompts that stream; `stream_error` only once a piece has gone, when the status line
    has gone with it, so an error is the last part of the stream in the protocol's own form.
    `tests/unit/test_layout.py` checks every exchange against this protocol."""

    @property
    def stream(self) -> bool: ...

    @property
    def content_type(self) -> str: ...

    @property
    def generates(self) -> bool: ...

    def parse(self, body: Any, shape: RequestShape) -> tuple[Instance, ...]: ...

    def error_body(self, error: RequestError) -> str: ...

    def begin(self, prompts: Sequence[Prompt]) -> None: ...

    def piece(self, index: int, text: str) -> str: ...

    def body(self, answer: Answer) -> str: ...

    def stream_error(self, error: RequestError) -> str: ...


def named_exchange(protocol: str | None, model: str) -> Exchange:
    """The exchange a header names, before the body is read (so even a bad body gets its protocol's errors)."""
    if protocol is None:
        return NativeExchange()
    if protocol == RESPONSES:
        return ResponsesExchange(model)
    if protocol not in PROTOCOLS:
        raise RequestError(
            f"{PROTOCOL_HEADER} must be one of {', '.join([*PROTOCOLS, RESPONSES])}, got {protocol[:64]!r}", PROTOCOL_HEADER
        )
    if protocol in ANTHROPIC_PROTOCOLS:
        return AnthropicExchange(ANTHROPIC_PROTOCOLS[protocol], model)
    return OpenAIExchange(OPENAI_PROTOCOLS[protocol], model)


def sniffed_exchange(body: Any, model: str) -> Exchange:
    """Without a header: the protocol the body's shape says, native unless it is plainly OpenAI's."""
    if isinstance(body, dict) and "instances" not in body:
        if ANTHROPIC_VERSION in body:
            return AnthropicExchange(MESSAGES, model)
        if "messages" in body:
            return OpenAIExchange(CHAT, model)
        if "model" in body and "prompt" in body:
            return OpenAIExchange(COMPLETIONS, model)
        if "model" in body and "input" in body:
            return ResponsesExchange(model)
    if is_vertex_chat(body):
        return VertexChatExchange(model)
    return NativeExchange()
