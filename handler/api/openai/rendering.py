"""Completions rendered as OpenAI's objects: `chat.completion`, `text_completion`, their SSE chunks, errors.

A `Reply` holds what every part of one answer shares (id, created, model); `response`
renders a whole answer, `StreamRenderer` a stream of pieces then its end, and
`error_body` any `RequestError` in OpenAI's `{"error": {message, type, param, code}}`.
A prompt that may call tools has its text split into content and calls by
`structured.tools`, whole or piece by piece; the calls become `tool_calls` here.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from handler.api.openai.parsing import CHAT
from handler.decoding.stopping import FinishReason
from handler.errors import RequestError
from handler.pipeline.prompts import Prompt
from handler.structured.tools import CallEvent, CallSplitter, ToolCall, split_calls

if TYPE_CHECKING:
    from handler.decoding.logprobs import TokenLogprob
    from handler.decoding.sequence import Completion

SSE = "text/event-stream"
DONE = "data: [DONE]\n\n"
FINISH_REASONS = {FinishReason.EOS: "stop", FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}
ERROR_CODES = {404: "model_not_found", 422: "limit_exceeded"}
# One request's answer: each prompt with its completions, in order.
Answer = Sequence[tuple[Prompt, Sequence["Completion"]]]


@dataclass(frozen=True)
class Reply:
    endpoint: str
    model: str
    id: str
    created: int

    @classmethod
    def new(cls, endpoint: str, model: str) -> Reply:
        prefix = "chatcmpl" if endpoint == CHAT else "cmpl"
        return cls(endpoint, model, f"{prefix}-{uuid.uuid4().hex}", int(time.time()))

    @property
    def chat(self) -> bool:
        return self.endpoint == CHAT

    def head(self, chunk: bool = False) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def choices(answer: Answer) -> list[tuple[Prompt, Completion]]:
    """Every completion with its prompt, in choice order (prompt by prompt, `n` each)."""
    return [(prompt, completion) for prompt, completions in answer for completion in completions]


def usage(answer: Answer) -> dict[str, int]:
    """The tokenizer's counts: each prompt once, however many choices it has, and every generated token."""
    prompt_tokens = sum(len(prompt.input_ids) for prompt, _ in answer)
    completion_tokens = sum(c.generated_tokens for _, completions in answer for c in completions)
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}


def finish_reason(completion: Completion, called: bool) -> str:
    """`tool_calls` when the answer ended on its own after calling; a cut answer stays `length`."""
    reason = FINISH_REASONS[completion.finish_reason]
    return "tool_calls" if called and reason == "stop" else reason


def tool_call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def response(reply: Reply, answer: Answer) -> dict[str, Any]:
    rendered = []
    for index, (prompt, completion) in enumerate(choices(answer)):
        reason = FINISH_REASONS[completion.finish_reason]
        if reply.chat:
            message: dict[str, Any] = {"role": "assistant", "content": completion.text}
            if prompt.may_call:
                content, calls = split_calls(completion.text)
                if calls:
                    message = {"role": "assistant", "content": content or None, "tool_calls": [tool_call(c) for c in calls]}
                    reason = finish_reason(completion, True)
            logprobs = _chat_logprobs(prompt, completion)
            rendered.append({"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason})
        else:
            echo = prompt.text if prompt.params.return_full_text else ""
            logprobs = _completion_logprobs(prompt, completion, len(echo))
            text = echo + completion.text
            rendered.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason})
    return {**reply.head(), "choices": rendered, "usage": usage(answer)}


def _chat_logprobs(prompt: Prompt, completion: Completion) -> dict[str, Any] | None:
    if not prompt.params.logprobs:
        return None
    return {"content": [_chat_token(t) for t in completion.logprobs], "refusal": None}


def _chat_token(token: TokenLogprob) -> dict[str, Any]:
    top = [{"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode("utf-8"))} for t in token.top]
    own = {"token": token.text, "logprob": token.logprob, "bytes": list(token.text.encode("utf-8"))}
    return {**own, "top_logprobs": top}


def _completion_logprobs(prompt: Prompt, completion: Completion, offset: int) -> dict[str, Any] | None:
    if not prompt.params.logprobs:
        return None
    tokens = list(completion.logprobs)
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token.text)
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{top.text: top.logprob for top in t.top} for t in tokens],
        "text_offset": offsets,
    }


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


class StreamRenderer:
    """One streaming request's SSE events: a chat choice's first chunk carries the role; the end
    sends each choice's finish reason, the usage when asked (`stream_options.include_usage`), and `[DONE]`."""

    def __init__(self, reply: Reply, prompts: Sequence[Prompt], include_usage: bool):
        self.reply = reply
        self.include_usage = include_usage
        self.prefixes = [
            prompt.text if prompt.params.return_full_text else ""
            for prompt in prompts
            for _ in range(prompt.params.num_return_sequences)
        ]
        self.started: set[int] = set()
        self.splitters = {
            index: CallSplitter()
            for index, prompt in enumerate(p for p in prompts for _ in range(p.params.num_return_sequences))
            if reply.chat and prompt.may_call
        }

    def piece(self, index: int, text: str) -> str:
        """The events for new text of choice `index`, preceded by its opening when it is the first."""
        if index in self.splitters:
            return self._open(index) + self._calls(index, self.splitters[index].feed(text))
        return self._open(index) + self._chunk(index, text, None)

    def _calls(self, index: int, events: list[CallEvent]) -> str:
        """A tool-calling choice's pieces: text as `content`, each call's id, type and name once, then
        its arguments in pieces, in OpenAI's `delta.tool_calls` shape."""
        out = []
        for event in events:
            if event.kind == "text":
                delta: dict[str, Any] = {"content": event.text}
            elif event.kind == "start":
                assert event.call is not None, "a call's start names the call"
                function = {"name": event.call.name, "arguments": ""}
                delta = {"tool_calls": [{"index": event.index, "id": event.call.id, "type": "function", "function": function}]}
            elif event.kind == "arguments":
                delta = {"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]}
            else:
                continue
            out.append(self._event({"index": index, "delta": delta, "logprobs": None, "finish_reason": None}))
        return "".join(out)

    def end(self, answer: Answer) -> str:
        """Each choice's last chunk, with its finish reason and, when asked, the logprobs of all its tokens
        (pieces are cut where text is safe to send, not at token boundaries, so they carry none)."""
        events = []
        for index, (prompt, completion) in enumerate(choices(answer)):
            reason = FINISH_REASONS[completion.finish_reason]
            if self.reply.chat:
                logprobs = _chat_logprobs(prompt, completion)
            else:
                logprobs = _completion_logprobs(prompt, completion, len(self.prefixes[index]))
            splitter = self.splitters.get(index)
            if splitter is not None:
                events.append(self._open(index) + self._calls(index, splitter.finish()))
                reason = finish_reason(completion, bool(splitter.calls))
            events.append(self._open(index) + self._chunk(index, "", reason, logprobs))
        if self.include_usage:
            events.append(sse({**self.reply.head(chunk=True), "choices": [], "usage": usage(answer)}))
        return "".join(events) + DONE

    def error(self, error: RequestError) -> str:
        """An error after the stream began: an event the SDKs raise on, then the end of the stream."""
        return sse(error_body(error)) + DONE

    def _open(self, index: int) -> str:
        if index in self.started:
            return ""
        self.started.add(index)
        if self.reply.chat:
            delta = {"role": "assistant", "content": ""}
            return self._event({"index": index, "delta": delta, "logprobs": None, "finish_reason": None})
        prefix = self.prefixes[index]
        return self._chunk(index, prefix, None) if prefix else ""

    def _chunk(self, index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None = None) -> str:
        if self.reply.chat:
            delta = {"content": text} if text else {}
            return self._event({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason})
        return self._event({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason})

    def _event(self, choice: dict[str, Any]) -> str:
        data = {**self.reply.head(chunk=True), "choices": [choice]}
        if self.include_usage:
            data["usage"] = None
        return sse(data)


def error_body(error: RequestError) -> dict[str, Any]:
    """OpenAI's error shape; `code` is OpenAI's where one applies (`unknown_parameter`, `unsupported_parameter`)."""
    kind = "server_error" if error.status >= 500 else "invalid_request_error"
    code = error.details.get("code", ERROR_CODES.get(error.status))
    return {"error": {"message": error.message, "type": kind, "param": error.field, "code": code}}


def error_json(error: RequestError) -> str:
    return json.dumps(error_body(error))
