"""A Responses API body (`POST /v1/responses`) into the pipeline's instance, statelessly.

`input` (a string, or items: messages, `function_call`s and `function_call_output`s) and
`instructions` become chat messages; `max_output_tokens`, `temperature` and `top_p` go through
the native `resolve_params` under these names; `text.format` becomes a response format and
`tools` the neutral `ToolSpec` (`structured.tools`), as chat's do. This server keeps no
responses: `store: true`, `previous_response_id`, `background: true` and `conversation` are
refused naming the field, so a client that needs them learns it at once, not from a missing
response later. OpenAI stores by default; here leaving `store` out means not stored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from handler.api.openai.parsing import check_fields, unsupported
from handler.errors import RequestError
from handler.params import PARAMETER_NAMES, resolve_params, verify_params
from handler.pipeline.shapes import Fields, Instance, RequestShape, check_count, prompt_text
from handler.structured import tools as calls
from handler.structured.tools import ToolCall, ToolChoice, ToolSpec

FIELDS = (
    "model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "tools", "tool_choice",
    "parallel_tool_calls", "text", "metadata", "stream", "store", "user", "truncation", "background", "include",
    "prompt_cache_key", "safety_identifier",  # hints for OpenAI's own caching and abuse checks: accepted, not needed
)  # fmt: skip
UNSUPPORTED = (
    "previous_response_id", "conversation", "prompt", "reasoning", "max_tool_calls", "top_logprobs", "service_tier",
    "stream_options",
)  # fmt: skip
STATELESS = "this server is stateless: it keeps no responses"
ROLES = ("user", "system", "developer", "assistant")
MESSAGE_KEYS = ("type", "role", "content", "id", "status")
CALL_KEYS = ("type", "call_id", "name", "arguments", "id", "status")
OUTPUT_KEYS = ("type", "call_id", "output", "id", "status")
TEXT_PARTS = {"user": "input_text", "system": "input_text", "developer": "input_text", "assistant": "output_text"}
MAX_ITEMS = 1024
MAX_METADATA = 16
MAX_TOOLS = 128


@dataclass(frozen=True)
class ResponsesRequest:
    """What the answer echoes back besides the output."""

    model: str | None
    instance: Instance
    echo: dict[str, Any]

    @property
    def stream(self) -> bool:
        return self.instance.params.stream

    @property
    def tools(self) -> ToolSpec | None:
        return self.instance.tools


def parse_responses(body: Any, shape: RequestShape) -> ResponsesRequest:
    if not isinstance(body, dict):
        raise RequestError(f"body must be a JSON object, got {'null' if body is None else type(body).__name__}", "body")
    body = {key: value for key, value in body.items() if value is not None}
    _stateless(body)
    check_fields(body, FIELDS, UNSUPPORTED, "")
    for name in ("model", "user", "instructions", "prompt_cache_key", "safety_identifier"):
        if name in body and not isinstance(body[name], str):
            raise RequestError(f"{name} must be a string, got {type(body[name]).__name__}", name)
    if body.get("truncation", "disabled") != "disabled":
        raise unsupported("truncation must be 'disabled': this server refuses an input over the context", "truncation")
    if body.get("include", []) != []:
        raise unsupported("include is not supported by this server (it returns no extra output data)", "include")
    layer, names = _parameters(body)
    spec = _tool_spec(body)
    if spec is not None and spec.active and "response_format" in layer:
        raise unsupported("text.format cannot be combined with tools unless tool_choice is 'none'", "text.format")
    grammar = calls.grammar(spec, "tools", shape.limits.max_response_format_bytes) if spec else None
    if grammar is not None:
        names["response_format"] = "tools"
    params = resolve_params([("", layer)], shape.limits, shape.defaults, names)
    if grammar is not None:
        params = replace(params, response_format=grammar)
        verify_params(params, names)
    if "input" not in body:
        raise RequestError("input is required", "input")
    messages = _messages(body["input"], body.get("instructions"), shape)
    renamed = tuple((name, names[name]) for name in PARAMETER_NAMES if name in names)
    instance = Instance(params, Fields("input", renamed), messages=messages, tools=spec)
    echo = {
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": _metadata(body.get("metadata", {})),
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "temperature": params.temperature,
        "top_p": params.top_p,
        "text": {"format": body.get("text", {}).get("format", {"type": "text"})},
        "tool_choice": body.get("tool_choice", "auto" if spec else "none"),
        "tools": body.get("tools", []),
        "user": body.get("user"),
    }
    return ResponsesRequest(body.get("model"), instance, echo)


def _stateless(body: dict[str, Any]) -> None:
    for name in ("previous_response_id", "conversation"):
        if name in body:
            raise unsupported(f"{name} is not supported: {STATELESS}; send the whole conversation as input", name)
    if body.get("store", False) is not False:
        raise unsupported(f"store must be false or left out: {STATELESS}; send the whole conversation as input", "store")
    if body.get("background", False) is not False:
        raise unsupported(f"background must be false or left out: {STATELESS}, so it cannot answer later", "background")


def _parameters(body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    layer: dict[str, Any] = {name: body[name] for name in ("temperature", "top_p") if name in body}
    layer["stream"] = body.get("stream", False)
    layer["return_full_text"] = False
    names = {"max_new_tokens": "max_output_tokens"}
    if "max_output_tokens" in body:
        layer["max_new_tokens"] = body["max_output_tokens"]
    response_format = _text_format(body.get("text"))
    if response_format is not None:
        layer["response_format"] = response_format
        names["response_format"] = "text.format"
    return layer, names


def _text_format(value: Any) -> dict[str, Any] | None:
    """`text.format`: `text` is no constraint; `json_object` and `json_schema` are the native formats,
    the schema's fields flattened as the Responses API has them (`name`, `schema`, `strict`)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RequestError("text must be an object such as {'format': {'type': 'json_schema', ...}}", "text")
    check_fields(value, ("format", "verbosity"), (), "text.")
    form = value.get("format", {"type": "text"})
    if not isinstance(form, dict):
        raise RequestError("text.format must be an object with a 'type'", "text.format")
    kind = form.get("type")
    if kind == "text":
        check_fields(form, ("type",), (), "text.format.")
        return None
    if kind == "json_object":
        check_fields(form, ("type",), (), "text.format.")
        return {"type": "json_object"}
    if kind == "json_schema":
        check_fields(form, ("type", "name", "schema", "description", "strict"), (), "text.format.")
        if "schema" not in form:
            raise RequestError("text.format.schema is required when type is 'json_schema'", "text.format.schema")
        if not isinstance(form["schema"], dict):
            raise RequestError("text.format.schema must be a JSON Schema object", "text.format.schema")
        schema = {key: form[key] for key in ("name", "schema", "description", "strict") if key in form}
        return {"type": "json_schema", "json_schema": schema}
    raise RequestError(f"text.format.type must be text, json_object or json_schema, got {str(kind)[:64]!r}", "text.format.type")


def _metadata(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise RequestError("metadata must be an object of string keys and string values", "metadata")
    if len(value) > MAX_METADATA or any(len(k) > 64 or len(v) > 512 for k, v in value.items()):
        raise RequestError(f"metadata holds at most {MAX_METADATA} keys of 64 characters, values of 512", "metadata")
    return value


def _tool_spec(body: dict[str, Any]) -> ToolSpec | None:
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise RequestError("parallel_tool_calls must be true or false", "parallel_tool_calls")
    if "tools" not in body:
        if "tool_choice" in body:
            raise RequestError("tool_choice is only allowed when tools are given", "tool_choice")
        return None
    value = body["tools"]
    if not isinstance(value, list) or not value:
        raise RequestError("tools must be a non-empty list of function tools", "tools")
    check_count(len(value), "tools", MAX_TOOLS)
    found = tuple(_tool(item, f"tools[{i}]") for i, item in enumerate(value))
    calls.check_unique(found, "tools")
    spec = ToolSpec(found, _tool_choice(body.get("tool_choice", "auto"), parallel))
    calls.check_choice(spec, "tool_choice")
    return spec


def _tool(value: Any, where: str) -> calls.Tool:
    """The Responses API's flat function tool: `{"type": "function", "name", "description", "parameters", "strict"}`."""
    if not isinstance(value, dict):
        raise RequestError(f"{where} must be an object {{'type': 'function', 'name': ...}}", where)
    if value.get("type") != "function":
        raise unsupported(
            f"{where}.type must be 'function' (built-in tools are not served), got {str(value.get('type'))[:64]!r}",
            f"{where}.type",
        )
    value = {key: item for key, item in value.items() if item is not None}
    check_fields(value, ("type", "name", "description", "parameters", "strict"), (), f"{where}.")
    if "strict" in value and not isinstance(value["strict"], bool):
        raise RequestError(f"{where}.strict must be true or false", f"{where}.strict")
    names = {key: f"{where}.{key}" for key in ("name", "description", "parameters")}
    return calls.tool(value.get("name"), value.get("description"), value.get("parameters"), names)


def _tool_choice(value: Any, parallel: bool) -> ToolChoice:
    if value in ("auto", "none", "required"):
        return ToolChoice(value, parallel=parallel)
    if isinstance(value, dict) and value.get("type") == "function":
        check_fields(value, ("type", "name"), (), "tool_choice.")
        if not isinstance(value.get("name"), str):
            raise RequestError("tool_choice.name must be a tool's name", "tool_choice.name")
        return ToolChoice("function", value["name"], parallel)
    raise RequestError("tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'name': ...}", "tool_choice")


def _messages(value: Any, instructions: str | None, shape: RequestShape) -> tuple[dict[str, Any], ...]:
    """`input` as the pipeline's messages; consecutive `function_call` items are one assistant turn's calls."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": prompt_text(instructions, "instructions", shape)})
    if isinstance(value, str):
        messages.append({"role": "user", "content": prompt_text(value, "input", shape)})
        return tuple(messages)
    if not isinstance(value, list) or not value:
        raise RequestError("input must be a string or a non-empty list of items", "input")
    check_count(len(value), "input", MAX_ITEMS)
    called: set[str] = set()
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise RequestError(f"{where} must be an object (a message, function_call or function_call_output)", where)
        item = {key: v for key, v in item.items() if v is not None}
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(item, where, shape))
        elif kind == "function_call":
            call = _call(item, where)
            called.add(call.id)
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"] += (call,)
            elif last is not None and last["role"] == "assistant":
                last["tool_calls"] = (call,)  # text then calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": (call,)})
        elif kind == "function_call_output":
            check_fields(item, OUTPUT_KEYS, (), f"{where}.")
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or call_id not in called:
                message = f"{where}.call_id must name an earlier function_call's call_id, got {str(call_id)[:64]!r}"
                raise RequestError(message, f"{where}.call_id")
            output = _output(item.get("output"), f"{where}.output", shape)
            messages.append({"role": "tool", "content": output, "tool_call_id": call_id})
        else:
            message = f"{where}.type {str(kind)[:64]!r} is not supported; use message, function_call or function_call_output"
            raise unsupported(message, f"{where}.type")
    if not any(m["role"] != "system" for m in messages):
        raise RequestError("input holds no user or assistant item", "input")
    return tuple(messages)


def _message(item: dict[str, Any], where: str, shape: RequestShape) -> dict[str, Any]:
    check_fields(item, MESSAGE_KEYS, (), f"{where}.")
    role = item.get("role")
    if role not in ROLES:
        raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}, got {str(role)[:64]!r}", f"{where}.role")
    content = item.get("content")
    if isinstance(content, list):
        content = _parts(content, f"{where}.content", TEXT_PARTS[role])
    text = prompt_text(content, f"{where}.content", shape)
    return {"role": "system" if role == "developer" else role, "content": text}


def _parts(parts: list[Any], where: str, part_type: str) -> str:
    if not parts:
        raise RequestError(f"{where} must not be an empty list", where)
    texts = []
    for j, part in enumerate(parts):
        field = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise RequestError(f"{field} must be an object {{'type': {part_type!r}, 'text': ...}}", field)
        kind = part.get("type")
        if kind not in ("input_text", "output_text"):
            raise unsupported(f"{field}.type {str(kind)[:64]!r} is not supported by this server (text only)", f"{field}.type")
        check_fields(part, ("type", "text", "annotations", "logprobs"), (), f"{field}.")
        if not isinstance(part.get("text"), str):
            raise RequestError(f"{field}.text must be a string", f"{field}.text")
        texts.append(part["text"])
    return "\n".join(texts)


def _call(item: dict[str, Any], where: str) -> ToolCall:
    check_fields(item, CALL_KEYS, (), f"{where}.")
    call_id, name = item.get("call_id"), item.get("name")
    if not isinstance(call_id, str) or not call_id:
        raise RequestError(f"{where}.call_id must be a non-empty string", f"{where}.call_id")
    if not isinstance(name, str) or not calls.NAME.fullmatch(name):
        raise RequestError(f"{where}.name must be a tool's name, got {str(name)[:80]!r}", f"{where}.name")
    arguments = item.get("arguments")
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else None
    except (ValueError, RecursionError):
        parsed = None
    if not isinstance(parsed, dict):
        raise RequestError(f"{where}.arguments must be a string holding a JSON object", f"{where}.arguments")
    return ToolCall(call_id, name, json.dumps(parsed, separators=(",", ":")))


def _output(value: Any, where: str, shape: RequestShape) -> str:
    if isinstance(value, list):
        value = _parts(value, where, "input_text")
    if not isinstance(value, str):
        raise RequestError(f"{where} must be a string", where)
    return prompt_text(value, where, shape) if value.strip() else "(empty)"
