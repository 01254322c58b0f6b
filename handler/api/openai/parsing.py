"""OpenAI request bodies into the pipeline's instances and parameters.

A body is checked field by field: a field OpenAI defines that this server does not serve
(`tools`, `audio`, ...) is refused naming it, as is a field OpenAI does not define; `null`
means "not given", as in OpenAI's API. The parameters then go through the native
`resolve_params`, under OpenAI's names (`max_tokens`, `n`), so bounds, limits and statuses
are the native API's, and its precedence holds: the request's value, then the app's
defaults, then the library's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from handler.errors import RequestError
from handler.params import resolve_params
from handler.pipeline.shapes import Instance, RequestShape, chat_messages, check_count, prompt_text

CHAT = "chat.completions"
COMPLETIONS = "completions"
ENDPOINTS = (CHAT, COMPLETIONS)

COMMON_FIELDS = (
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "stream",
    "stream_options",
    "user",
)
FIELDS = {
    CHAT: COMMON_FIELDS + ("messages", "max_completion_tokens", "top_logprobs", "response_format"),
    COMPLETIONS: COMMON_FIELDS + ("prompt", "echo"),
}
UNSUPPORTED = {
    CHAT: (
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "parallel_tool_calls",
        "audio",
        "modalities",
        "prediction",
        "reasoning_effort",
        "web_search_options",
        "store",
        "metadata",
        "service_tier",
    ),
    COMPLETIONS: ("suffix", "best_of"),
}
# Parameters OpenAI and the native API name alike.
SAME_NAMES = ("temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty", "logit_bias")
MESSAGE_FIELDS = ("role", "content")
UNSUPPORTED_MESSAGE_FIELDS = ("name", "tool_calls", "tool_call_id", "function_call", "refusal", "audio")
UNSUPPORTED_ROLES = ("tool", "function")
UNSUPPORTED_PARTS = ("image_url", "input_audio", "file", "refusal")
UNKNOWN = "unknown_parameter"
NOT_SERVED = "unsupported_parameter"


@dataclass(frozen=True)
class OpenAIRequest:
    """An OpenAI request as the pipeline sees it; `fields` says which body field each instance came from."""

    endpoint: str
    model: str | None
    instances: tuple[Instance, ...]
    fields: tuple[str, ...]
    include_usage: bool = False
    length_field: str = "max_tokens"

    @property
    def stream(self) -> bool:
        return self.instances[0].params.stream


def unsupported(message: str, field: str) -> RequestError:
    return RequestError(message, field, details={"code": NOT_SERVED})


def parse_openai(endpoint: str, body: Any, shape: RequestShape) -> OpenAIRequest:
    """A `chat/completions` (CHAT) or `completions` body, already decoded from JSON."""
    if not isinstance(body, dict):
        kind = "null" if body is None else type(body).__name__
        raise RequestError(f"request body must be a JSON object, got {kind}", "body")
    body = {key: value for key, value in body.items() if value is not None}
    _check_fields(body, FIELDS[endpoint], UNSUPPORTED[endpoint], "")
    for name in ("model", "user"):
        if name in body and not isinstance(body[name], str):
            raise RequestError(f"{name} must be a string, got {type(body[name]).__name__}", name)
    layer, names = _parameters(endpoint, body)
    params = resolve_params([("", layer)], shape.limits, shape.defaults, names)
    if params.return_full_text and params.logprobs:
        raise unsupported("echo with logprobs needs the prompt's logprobs, which this server does not compute", "echo")
    include_usage = _include_usage(body, params.stream)
    length_field = names.get("max_new_tokens", "max_tokens")
    if endpoint == CHAT:
        if "messages" not in body:
            raise RequestError("messages is required", "messages")
        messages = chat_messages(_messages(body["messages"]), "messages", shape)
        instance = Instance(params, messages=messages)
        return OpenAIRequest(endpoint, body.get("model"), (instance,), ("messages",), include_usage, length_field)
    prompts, fields = _prompts(body.get("prompt"), shape)
    instances = tuple(Instance(params, text=prompt_text(p, f, shape)) for p, f in zip(prompts, fields))
    return OpenAIRequest(endpoint, body.get("model"), instances, fields, include_usage, length_field)


def in_openai_terms(error: RequestError, request: OpenAIRequest) -> RequestError:
    """A pipeline error raised after parsing (token limits, chat template), naming OpenAI's fields.

    The pipeline names a prompt `instances[i]` and the length `max_new_tokens`; the client
    sent `messages` or `prompt[i]`, and `max_tokens` or `max_completion_tokens`.
    """
    renames = {"max_new_tokens": request.length_field}
    for i, field in enumerate(request.fields):
        renames[f"instances[{i}].messages"] = field
        renames[f"instances[{i}]"] = field
    return renamed(error, renames)


def renamed(error: RequestError, renames: dict[str, str]) -> RequestError:
    """The error under its field's new name, in its message too."""
    new = renames.get(error.field) if error.field is not None else None
    if new is None:
        return error
    return replace(error, message=error.message.replace(error.field, new), field=new)


def _check_fields(body: dict[str, Any], known: tuple[str, ...], not_served: tuple[str, ...], prefix: str) -> None:
    for key in body:
        if key in not_served:
            raise unsupported(f"{prefix}{key} is not supported by this server", f"{prefix}{key}")
        if key not in known:
            message = f"unknown field {prefix}{key!r}; known fields: {', '.join(known)}"
            raise RequestError(message, f"{prefix}{key}", details={"code": UNKNOWN})


def _parameters(endpoint: str, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The native parameter layer, and OpenAI's name for each parameter it renames."""
    layer = {name: body[name] for name in SAME_NAMES if name in body}
    layer["stream"] = body.get("stream", False)
    names: dict[str, str] = {}
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise RequestError("give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
    for name in ("max_tokens", "max_completion_tokens"):
        if name in body:
            layer["max_new_tokens"] = body[name]
            names["max_new_tokens"] = name
    if "n" in body:
        layer["num_return_sequences"] = body["n"]
        names["num_return_sequences"] = "n"
    if endpoint == CHAT:
        layer.update({name: body[name] for name in ("logprobs", "top_logprobs") if name in body})
        layer["return_full_text"] = False
        response_format = _response_format(body.get("response_format"))
        if response_format is not None:
            layer["response_format"] = response_format
    else:
        if "logprobs" in body:  # completions: an integer, how many top tokens to report
            layer["logprobs"] = True
            layer["top_logprobs"] = body["logprobs"]
            names["top_logprobs"] = "logprobs"
        layer["return_full_text"] = body.get("echo", False)
        names["return_full_text"] = "echo"
    return layer, names


def _response_format(value: Any) -> Any:
    """OpenAI's `text`, `json_object` and `json_schema`: the last two are the native structured
    output's own shapes (validated there); `text` means no constraint."""
    if value is None or value == {"type": "text"}:
        return None
    if isinstance(value, dict) and value.get("type") in ("json_object", "json_schema"):
        return value
    raise unsupported(
        "response_format must be {'type': 'text'}, {'type': 'json_object'} or {'type': 'json_schema', "
        "'json_schema': {...}}",
        "response_format",
    )


def _include_usage(body: dict[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise RequestError("stream_options is only allowed with stream: true", "stream_options")
    if not isinstance(options, dict):
        raise RequestError("stream_options must be an object", "stream_options")
    _check_fields(options, ("include_usage",), (), "stream_options.")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise RequestError("stream_options.include_usage must be true or false", "stream_options.include_usage")
    return include


def _messages(value: Any) -> list[dict[str, Any]]:
    """OpenAI's message forms reduced to the native `{"role", "content"}` with text content."""
    if not isinstance(value, list) or not value:
        raise RequestError("messages must be a non-empty list of message objects", "messages")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with 'role' and 'content'", where)
        message = {key: item for key, item in message.items() if item is not None}
        _check_fields(message, MESSAGE_FIELDS, UNSUPPORTED_MESSAGE_FIELDS, f"{where}.")
        role = message.get("role")
        if role in UNSUPPORTED_ROLES:
            raise unsupported(f"{where}.role {role!r} is not supported by this server (no tool calls)", f"{where}.role")
        role = "system" if role == "developer" else role  # OpenAI's newer name for the system role
        messages.append({"role": role, "content": _content(message.get("content"), f"{where}.content")})
    return messages


def _content(value: Any, where: str) -> Any:
    """A string, or a list of text parts joined by newlines (as vLLM joins them)."""
    if not isinstance(value, list):
        if value is None:
            raise RequestError(f"{where} must be a string or a list of text parts", where)
        return value
    if not value:
        raise RequestError(f"{where} must not be an empty list", where)
    texts = []
    for j, part in enumerate(value):
        field = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise RequestError(f"{field} must be an object {{'type': 'text', 'text': ...}}", field)
        kind = part.get("type")
        if kind in UNSUPPORTED_PARTS:
            raise unsupported(f"{field}.type {kind!r} is not supported by this server (text only)", f"{field}.type")
        if kind != "text":
            raise RequestError(f"{field}.type must be 'text', got {kind!r}", f"{field}.type")
        _check_fields(part, ("type", "text"), (), f"{field}.")
        if not isinstance(part.get("text"), str):
            raise RequestError(f"{field}.text must be a string", f"{field}.text")
        texts.append(part["text"])
    return "\n".join(texts)


def _prompts(value: Any, shape: RequestShape) -> tuple[list[Any], tuple[str, ...]]:
    if value is None:
        raise RequestError("prompt is required", "prompt")
    if isinstance(value, str):
        return [value], ("prompt",)
    if isinstance(value, list) and value and all(isinstance(p, int) and not isinstance(p, bool) for p in value):
        raise unsupported("prompt as token ids is not supported by this server; send text", "prompt")
    if isinstance(value, list) and value and all(isinstance(p, list) for p in value):
        raise unsupported("prompt as token ids is not supported by this server; send text", "prompt")
    if not isinstance(value, list) or not value:
        raise RequestError("prompt must be a string or a non-empty list of strings", "prompt")
    check_count(len(value), "prompt", shape.max_instances)
    return value, tuple(f"prompt[{i}]" for i in range(len(value)))

