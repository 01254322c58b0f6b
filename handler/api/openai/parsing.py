"""OpenAI request bodies into the pipeline's instances and parameters.

A body is checked field by field: a field OpenAI defines that this server does not serve
(`audio`, the deprecated `functions`, ...) is refused naming it, as is a field OpenAI does not define; `null`
means "not given", as in OpenAI's API. The parameters then go through the native
`resolve_params`, under OpenAI's names (`max_tokens`, `n`), so bounds, limits and statuses
are the native API's, and its precedence holds: the request's value, then the app's
defaults, then the library's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from handler.errors import RequestError
from handler.params import PARAMETER_NAMES, resolve_params, verify_params
from handler.pipeline.shapes import Fields, Instance, RequestShape, check_count, prompt_text
from handler.structured import tools as calls
from handler.structured.tools import ToolCall, ToolChoice, ToolSpec

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
    CHAT: COMMON_FIELDS
    + ("messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice", "parallel_tool_calls"),
    COMPLETIONS: COMMON_FIELDS + ("prompt", "echo"),
}
UNSUPPORTED = {
    CHAT: (
        "functions",
        "function_call",
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
MESSAGE_FIELDS = {
    "system": ("role", "content"),
    "user": ("role", "content"),
    "assistant": ("role", "content", "tool_calls"),
    "tool": ("role", "content", "tool_call_id"),
}
UNSUPPORTED_MESSAGE_FIELDS = ("name", "function_call", "refusal", "audio")
UNSUPPORTED_ROLES = ("function",)
MAX_TOOLS = 128
TOOL_FIELDS = ("type", "function")
FUNCTION_FIELDS = ("name", "description", "parameters", "strict")
CALL_FIELDS = ("id", "type", "function")
UNSUPPORTED_PARTS = ("image_url", "input_audio", "file", "refusal")
UNKNOWN = "unknown_parameter"
NOT_SERVED = "unsupported_parameter"


@dataclass(frozen=True)
class OpenAIRequest:
    """An OpenAI request as the pipeline sees it."""

    endpoint: str
    model: str | None
    instances: tuple[Instance, ...]
    include_usage: bool = False
    tools: ToolSpec | None = None

    @property
    def stream(self) -> bool:
        return self.instances[0].params.stream


def unsupported(message: str, field: str) -> RequestError:
    return RequestError(message, field, details={"code": NOT_SERVED})


def parse_openai(endpoint: str, body: Any, shape: RequestShape, prefix: str = "") -> OpenAIRequest:
    """A `chat/completions` (CHAT) or `completions` body, already decoded from JSON.

    `prefix` places the body inside a larger one (`instances[1].` for Model Garden's chat
    instances): every field an error names, now or later in the pipeline, carries it."""
    if not isinstance(body, dict):
        kind = "null" if body is None else type(body).__name__
        where = prefix.rstrip(".") or "body"
        raise RequestError(f"{where} must be a JSON object, got {kind}", where)
    body = {key: value for key, value in body.items() if value is not None}
    check_fields(body, FIELDS[endpoint], UNSUPPORTED[endpoint], prefix)
    for name in ("model", "user"):
        if name in body and not isinstance(body[name], str):
            raise RequestError(f"{prefix}{name} must be a string, got {type(body[name]).__name__}", f"{prefix}{name}")
    layer, names = _parameters(endpoint, body, prefix)
    spec = tool_spec(body, prefix) if endpoint == CHAT else None
    if spec is not None and spec.active and "response_format" in layer:
        message = f"{prefix}response_format cannot be combined with tools unless tool_choice is 'none'"
        raise unsupported(message, f"{prefix}response_format")
    grammar = calls.grammar(spec, f"{prefix}tools", shape.limits.max_response_format_bytes) if spec else None
    if grammar is not None:
        names["response_format"] = "tools"
    params = resolve_params([(prefix, layer)], shape.limits, shape.defaults, names)
    if grammar is not None:
        params = replace(params, response_format=grammar)
        verify_params(params, {name: f"{prefix}{native}" for name, native in names.items()})
    if params.return_full_text and params.logprobs:
        message = "echo with logprobs needs the prompt's logprobs, which this server does not compute"
        raise unsupported(message, f"{prefix}echo")
    include_usage = _include_usage(body, params.stream, prefix)
    renamed = tuple((name, f"{prefix}{names.get(name, name)}") for name in PARAMETER_NAMES if prefix or name in names)
    if endpoint == CHAT:
        if "messages" not in body:
            raise RequestError(f"{prefix}messages is required", f"{prefix}messages")
        where = f"{prefix}messages"
        messages = _messages(body["messages"], where, shape)
        instance = Instance(params, Fields(where, renamed), messages=messages, tools=spec)
        return OpenAIRequest(endpoint, body.get("model"), (instance,), include_usage, spec)
    prompts, fields = _prompts(body.get("prompt"), shape, prefix)
    instances = tuple(Instance(params, Fields(f, renamed), text=prompt_text(p, f, shape)) for p, f in zip(prompts, fields))
    return OpenAIRequest(endpoint, body.get("model"), instances, include_usage)


def check_fields(body: dict[str, Any], known: tuple[str, ...], not_served: tuple[str, ...], prefix: str) -> None:
    for key in body:
        if key in not_served:
            raise unsupported(f"{prefix}{key} is not supported by this server", f"{prefix}{key}")
        if key not in known:
            message = f"unknown field {prefix}{key!r}; known fields: {', '.join(known)}"
            raise RequestError(message, f"{prefix}{key}", details={"code": UNKNOWN})


def _parameters(endpoint: str, body: dict[str, Any], prefix: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The native parameter layer, and OpenAI's name for each parameter it renames."""
    layer = {name: body[name] for name in SAME_NAMES if name in body}
    layer["stream"] = body.get("stream", False)
    names = {"max_new_tokens": "max_tokens", "num_return_sequences": "n"}  # OpenAI's names, even when not sent
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise RequestError("give max_tokens or max_completion_tokens, not both", f"{prefix}max_completion_tokens")
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
        response_format = _response_format(body.get("response_format"), f"{prefix}response_format")
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


def _response_format(value: Any, where: str) -> Any:
    """OpenAI's `text`, `json_object` and `json_schema`: the last two are the native structured
    output's own shapes (validated there); `text` means no constraint."""
    if value is None or value == {"type": "text"}:
        return None
    if isinstance(value, dict) and value.get("type") in ("json_object", "json_schema"):
        return value
    raise unsupported(
        "response_format must be {'type': 'text'}, {'type': 'json_object'} or {'type': 'json_schema', 'json_schema': {...}}",
        where,
    )


def _include_usage(body: dict[str, Any], stream: bool, prefix: str) -> bool:
    options, where = body.get("stream_options"), f"{prefix}stream_options"
    if options is None:
        return False
    if not stream:
        raise RequestError(f"{where} is only allowed with stream: true", where)
    if not isinstance(options, dict):
        raise RequestError(f"{where} must be an object", where)
    check_fields(options, ("include_usage",), (), f"{where}.")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise RequestError(f"{where}.include_usage must be true or false", f"{where}.include_usage")
    return include


def _messages(value: Any, field: str, shape: RequestShape) -> tuple[dict[str, Any], ...]:
    """OpenAI's messages as the pipeline's: text content, an assistant's calls as `ToolCall`s, and each
    tool result tied to a call an earlier assistant message made."""
    if not isinstance(value, list) or not value:
        raise RequestError(f"{field} must be a non-empty list of message objects", field)
    messages: list[dict[str, Any]] = []
    open_calls: set[str] = set()
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with 'role' and 'content'", where)
        message = {key: item for key, item in message.items() if item is not None}
        role = message.get("role")
        if role in UNSUPPORTED_ROLES:
            raise unsupported(f"{where}.role {role!r} is not supported by this server; use 'tool'", f"{where}.role")
        role = "system" if role == "developer" else role  # OpenAI's newer name for the system role
        if role not in MESSAGE_FIELDS:
            roles = ", ".join(["developer", *MESSAGE_FIELDS])
            raise RequestError(f"{where}.role must be one of {roles}, got {str(role)[:64]!r}", f"{where}.role")
        check_fields(message, MESSAGE_FIELDS[role], UNSUPPORTED_MESSAGE_FIELDS, f"{where}.")
        if role == "assistant" and "tool_calls" in message:
            made = _tool_calls(message["tool_calls"], f"{where}.tool_calls")
            open_calls |= {call.id for call in made}
            content = message.get("content")
            text = "" if content in (None, "", []) else _text(content, f"{where}.content", shape)
            messages.append({"role": role, "content": text, "tool_calls": made})
            continue
        entry = {"role": role, "content": _text(message.get("content"), f"{where}.content", shape)}
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in open_calls:
                raise RequestError(
                    f"{where}.tool_call_id must name a call of an earlier assistant message, got {str(call_id)[:64]!r}",
                    f"{where}.tool_call_id",
                )
            entry["tool_call_id"] = call_id
        messages.append(entry)
    return tuple(messages)


def _text(value: Any, where: str, shape: RequestShape) -> str:
    return prompt_text(_content(value, where), where, shape)


def _tool_calls(value: Any, where: str) -> tuple[ToolCall, ...]:
    if not isinstance(value, list) or not value:
        raise RequestError(f"{where} must be a non-empty list of tool calls", where)
    made = []
    for j, call in enumerate(value):
        at = f"{where}[{j}]"
        if not isinstance(call, dict):
            raise RequestError(f"{at} must be an object with 'id', 'type' and 'function'", at)
        check_fields(call, CALL_FIELDS, (), f"{at}.")
        if call.get("type", "function") != "function":
            raise RequestError(f"{at}.type must be 'function', got {str(call.get('type'))[:64]!r}", f"{at}.type")
        if not isinstance(call.get("id"), str) or not call["id"]:
            raise RequestError(f"{at}.id must be a non-empty string", f"{at}.id")
        function = call.get("function")
        if not isinstance(function, dict):
            raise RequestError(f"{at}.function must be an object with 'name' and 'arguments'", f"{at}.function")
        check_fields(function, ("name", "arguments"), (), f"{at}.function.")
        name = function.get("name")
        if not isinstance(name, str) or not calls.NAME.fullmatch(name):
            raise RequestError(f"{at}.function.name must be a tool's name, got {str(name)[:80]!r}", f"{at}.function.name")
        made.append(ToolCall(call["id"], name, _arguments(function.get("arguments"), f"{at}.function.arguments")))
    return tuple(made)


def _arguments(value: Any, where: str) -> str:
    """A call's arguments as compact JSON text: OpenAI sends a JSON string, which must hold an object."""
    try:
        parsed = json.loads(value) if isinstance(value, str) else None
    except (ValueError, RecursionError):
        parsed = None
    if not isinstance(parsed, dict):
        raise RequestError(f"{where} must be a string holding a JSON object", where)
    return json.dumps(parsed, separators=(",", ":"))


def tool_spec(body: dict[str, Any], prefix: str = "") -> ToolSpec | None:
    """`tools`, `tool_choice` and `parallel_tool_calls` into the neutral `ToolSpec`; None without tools."""
    tools_field, choice_field = f"{prefix}tools", f"{prefix}tool_choice"
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise RequestError(f"{prefix}parallel_tool_calls must be true or false", f"{prefix}parallel_tool_calls")
    if "tools" not in body:
        if "tool_choice" in body:
            raise RequestError(f"{choice_field} is only allowed when tools are given", choice_field)
        return None
    value = body["tools"]
    if not isinstance(value, list) or not value:
        raise RequestError(f"{tools_field} must be a non-empty list of function tools", tools_field)
    check_count(len(value), tools_field, MAX_TOOLS)
    tools = tuple(_tool(item, f"{tools_field}[{i}]") for i, item in enumerate(value))
    calls.check_unique(tools, tools_field)
    spec = ToolSpec(tools, _tool_choice(body.get("tool_choice", "auto"), choice_field, parallel))
    calls.check_choice(spec, choice_field)
    return spec


def _tool(value: Any, where: str) -> calls.Tool:
    if not isinstance(value, dict):
        raise RequestError(f"{where} must be an object {{'type': 'function', 'function': {{...}}}}", where)
    check_fields(value, TOOL_FIELDS, (), f"{where}.")
    if value.get("type") != "function":
        raise unsupported(f"{where}.type must be 'function', got {str(value.get('type'))[:64]!r}", f"{where}.type")
    function = value.get("function")
    if not isinstance(function, dict):
        raise RequestError(f"{where}.function must be an object with 'name'", f"{where}.function")
    function = {key: item for key, item in function.items() if item is not None}
    check_fields(function, FUNCTION_FIELDS, (), f"{where}.function.")
    if "strict" in function and not isinstance(function["strict"], bool):
        raise RequestError(f"{where}.function.strict must be true or false", f"{where}.function.strict")
    names = {key: f"{where}.function.{key}" for key in ("name", "description", "parameters")}
    return calls.tool(function.get("name"), function.get("description"), function.get("parameters"), names)


def _tool_choice(value: Any, where: str, parallel: bool) -> ToolChoice:
    if value in ("auto", "none", "required"):
        return ToolChoice(value, parallel=parallel)
    if isinstance(value, dict) and value.get("type") == "function":
        check_fields(value, ("type", "function"), (), f"{where}.")
        function = value.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RequestError(f"{where}.function must be an object with a 'name'", f"{where}.function")
        check_fields(function, ("name",), (), f"{where}.function.")
        return ToolChoice("function", function["name"], parallel)
    raise RequestError(
        f"{where} must be 'auto', 'none', 'required' or {{'type': 'function', 'function': {{'name': ...}}}}", where
    )


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
        check_fields(part, ("type", "text"), (), f"{field}.")
        if not isinstance(part.get("text"), str):
            raise RequestError(f"{field}.text must be a string", f"{field}.text")
        texts.append(part["text"])
    return "\n".join(texts)


def _prompts(value: Any, shape: RequestShape, prefix: str) -> tuple[list[Any], tuple[str, ...]]:
    field = f"{prefix}prompt"
    if value is None:
        raise RequestError(f"{field} is required", field)
    if isinstance(value, str):
        return [value], (field,)
    if isinstance(value, list) and value and all(isinstance(p, int) and not isinstance(p, bool) for p in value):
        raise unsupported(f"{field} as token ids is not supported by this server; send text", field)
    if isinstance(value, list) and value and all(isinstance(p, list) for p in value):
        raise unsupported(f"{field} as token ids is not supported by this server; send text", field)
    if not isinstance(value, list) or not value:
        raise RequestError(f"{field} must be a string or a non-empty list of strings", field)
    check_count(len(value), field, shape.max_instances)
    return value, tuple(f"{field}[{i}]" for i in range(len(value)))
