"""Request shapes: turn one TorchServe request into instances with their parameters.

Accepted bodies:
- Vertex AI: `{"instances": [...], "parameters": {...}}`, an instance being a string or an
  object holding one of `prompt`, `inputs` or `messages`, plus its own parameter overrides;
- TGI: `{"inputs" | "prompt": str | [str], "parameters": {...}}`;
- a plain text body, taken as one prompt.
Nothing here needs the model; token limits are checked in `prompts`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

from handler.errors import RequestError, limit_error
from handler.params import PARAMETER_NAMES, GenerationParams, ParamLimits, require_text, resolve_params
from handler.structured.tools import ToolSpec

CHAT_ROLES = ("system", "user", "assistant")
PROMPT_KEYS = ("prompt", "inputs", "messages")
VERTEX_KEYS = ("instances", "parameters")
# TorchServe's frontend splits a form-encoded body (curl -d without a content type) into
# fields, and drops it entirely when it holds no '=': the handler never sees the text.
FORM_BODY_HINT = (
    "form-encoded bodies are not accepted: send JSON with -H 'Content-Type: application/json', "
    "or plain text with -H 'Content-Type: text/plain'"
)


@dataclass(frozen=True)
class Fields:
    """What the client's protocol calls one prompt's fields, for the errors found after parsing (token
    limits, the chat template, a response format's compile): the prompt as sent (`instances[0]`,
    `messages`, `prompt[1]`) and each parameter the protocol names otherwise (OpenAI's `max_tokens`
    for `max_new_tokens`). The protocol that parsed the prompt sets them; nothing renames an error later."""

    prompt: str
    renamed: tuple[tuple[str, str], ...] = ()

    def parameter(self, name: str) -> str:
        return dict(self.renamed).get(name, name)


@dataclass(frozen=True)
class Instance:
    """One prompt to complete: plain text or chat messages, with its resolved parameters and its fields' names.

    `prefill`: the last message is the assistant's answer begun, to be continued rather than
    followed by a new turn (Anthropic's meaning of a conversation that ends with the assistant).
    Messages are `{"role", "content"}`; in a conversation with tools an assistant message may also
    hold `tool_calls` (`structured.tools.ToolCall`s) and a `tool` message its `tool_call_id` and `name`.
    `tools` are the ones the model may call, rendered into the prompt by `pipeline.prompts`."""

    params: GenerationParams
    fields: Fields = dataclass_field(compare=False)
    text: str | None = None
    messages: tuple[dict[str, Any], ...] | None = None
    prefill: bool = False
    tools: ToolSpec | None = None


@dataclass(frozen=True)
class RequestShape:
    """What the handler needs to know to parse a request, taken from the app's settings."""

    defaults: GenerationParams
    limits: ParamLimits
    max_instances: int
    max_prompt_chars: int


def request_body(item: Any) -> Any:
    """The body TorchServe hands over: decoded JSON, text, or raw bytes when decoding failed."""
    if isinstance(item, dict) and ("body" in item or "data" in item):
        body = item.get("body")
        return item.get("data") if body is None else body
    raise RequestError(FORM_BODY_HINT, "body")


def read_body(item: Any) -> Any:
    """The request's body decoded: a JSON value, or text when it is not JSON."""
    return _decode(request_body(item))


def parse_request(item: Any, shape: RequestShape) -> tuple[Instance, ...]:
    return parse_body(read_body(item), shape)


def parse_body(body: Any, shape: RequestShape) -> tuple[Instance, ...]:
    """A decoded body in one of the native shapes."""
    if isinstance(body, str):
        params = resolve_params([], shape.limits, shape.defaults)
        return (Instance(params, Fields("body"), text=prompt_text(body, "body", shape)),)
    if not isinstance(body, dict):
        kind = "null" if body is None else type(body).__name__
        raise RequestError(f'request body must be a JSON object such as {{"instances": [...]}} or plain text, got {kind}', "body")
    if "instances" in body:
        return _vertex_instances(body, shape)
    return _tgi_instances(body, shape)


def _decode(body: Any) -> Any:
    if not isinstance(body, (bytes, bytearray)):
        return body
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as error:
        raise RequestError(f"request body is not valid UTF-8 (byte {error.start})", "body") from error
    if text.lstrip()[:1] not in ("{", "[", '"'):
        return text
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError as error:
        raise RequestError("request body is nested too deeply", "body") from error
    except json.JSONDecodeError as error:
        raise RequestError(f"malformed JSON: {error.msg} at line {error.lineno} column {error.colno}", "body") from error
    except ValueError as error:  # e.g. an integer of over 4300 digits
        raise RequestError(f"malformed JSON: {str(error).split(':')[0]}", "body") from error


def _reject_constant(name: str) -> None:
    raise RequestError(f"{name} is not a valid JSON number", "body")


def _vertex_instances(body: dict[str, Any], shape: RequestShape) -> tuple[Instance, ...]:
    _reject_unknown_keys(body, VERTEX_KEYS, "")
    instances = body["instances"]
    if not isinstance(instances, list):
        raise RequestError("instances must be a list", "instances")
    if not instances:
        raise RequestError("instances must not be empty", "instances")
    check_count(len(instances), "instances", shape.max_instances)
    request_layer = ("parameters.", body.get("parameters") or {})
    return tuple(_instance(value, f"instances[{i}]", request_layer, shape) for i, value in enumerate(instances))


def _tgi_instances(body: dict[str, Any], shape: RequestShape) -> tuple[Instance, ...]:
    present = [key for key in ("inputs", "prompt") if key in body]
    if len(present) != 1:
        raise RequestError("request needs exactly one of 'instances', 'inputs' or 'prompt'", "body")
    key = present[0]
    _reject_unknown_keys(body, (key, "parameters"), "")
    prompts = body[key]
    if isinstance(prompts, str):
        prompts = [prompts]
    elif not isinstance(prompts, list) or not prompts:
        raise RequestError(f"{key} must be a string or a non-empty list of strings", key)
    check_count(len(prompts), key, shape.max_instances)
    params = resolve_params([("parameters.", body.get("parameters") or {})], shape.limits, shape.defaults)
    return tuple(
        Instance(params, Fields(f"{key}[{i}]"), text=prompt_text(p, f"{key}[{i}]", shape)) for i, p in enumerate(prompts)
    )


def _instance(value: Any, where: str, request_layer: tuple[str, Any], shape: RequestShape) -> Instance:
    if isinstance(value, str):
        params = resolve_params([request_layer], shape.limits, shape.defaults)
        return Instance(params, Fields(where), text=prompt_text(value, where, shape))
    if not isinstance(value, dict):
        raise RequestError(f"{where} must be a string or an object with 'prompt', 'inputs' or 'messages'", where)
    present = [key for key in PROMPT_KEYS if key in value]
    if len(present) != 1:
        raise RequestError(f"{where} needs exactly one of 'prompt', 'inputs' or 'messages'", where)
    key = present[0]
    overrides = {name: v for name, v in value.items() if name != key}
    params = resolve_params([request_layer, (f"{where}.", overrides)], shape.limits, shape.defaults)
    if key == "messages":
        return Instance(params, Fields(f"{where}.messages"), messages=chat_messages(value[key], f"{where}.messages", shape))
    return Instance(params, Fields(where), text=prompt_text(value[key], f"{where}.{key}", shape))


def prompt_text(value: Any, where: str, shape: RequestShape) -> str:
    """A prompt string, checked as every protocol's prompts are: non-empty, valid Unicode, within max_prompt_chars."""
    if not isinstance(value, str):
        raise RequestError(f"{where} must be a string, got {type(value).__name__}", where)
    if not value.strip():
        raise RequestError(f"{where} must not be empty", where)
    require_text(value, where)
    if len(value) > shape.max_prompt_chars:
        raise limit_error(
            f"{where} has {len(value)} characters, at most {shape.max_prompt_chars} allowed",
            where,
            shape.max_prompt_chars,
            len(value),
        )
    return value


def chat_messages(value: Any, where: str, shape: RequestShape) -> tuple[dict[str, str], ...]:
    """Chat messages as `{"role", "content"}` objects with a known role and a valid prompt string each."""
    if not isinstance(value, list) or not value:
        raise RequestError(f"{where} must be a non-empty list of {{'role', 'content'}} objects", where)
    messages = []
    for i, message in enumerate(value):
        field = f"{where}[{i}]"
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise RequestError(f"{field} must be an object with exactly 'role' and 'content'", field)
        if message["role"] not in CHAT_ROLES:
            raise RequestError(f"{field}.role must be one of {', '.join(CHAT_ROLES)}, got {message['role']!r}", f"{field}.role")
        messages.append({"role": message["role"], "content": prompt_text(message["content"], f"{field}.content", shape)})
    return tuple(messages)


def _reject_unknown_keys(body: dict[str, Any], allowed: tuple[str, ...], prefix: str) -> None:
    for key in body:
        if key not in allowed:
            hint = " (generation parameters go inside 'parameters')" if key in PARAMETER_NAMES else ""
            raise RequestError(f"unknown field {prefix}{key!r}{hint}; allowed: {', '.join(allowed)}", f"{prefix}{key}")


def check_count(count: int, field: str, maximum: int) -> None:
    if count > maximum:
        raise limit_error(f"{field} has {count} entries, at most {maximum} allowed per request", field, maximum, count)
