"""Anthropic Messages bodies into the pipeline's instances and parameters.

A body is checked field by field, as the OpenAI one is: a field Anthropic defines that this
server does not serve yet (`thinking`, image blocks, server tools, ...) is refused naming it,
and so is a field Anthropic does not define. The parameters then go through the native
`resolve_params` under Anthropic's names (`max_tokens`, `stop_sequences`), so bounds, limits
and statuses are the native API's, with the precedence it states: the request's value, then
the app's defaults, then the library's. Anthropic's own bounds come first where they are
narrower (temperature in [0, 1]); `max_tokens` is required, as Anthropic requires it.

Tools are the neutral `ToolSpec` of `structured.tools`, as OpenAI's are: `tools` (`name`,
`description`, `input_schema`), `tool_choice` (`auto`, `any` as required, `tool` as a named
tool, `none`; `disable_parallel_tool_use`), and in the conversation an assistant's `tool_use`
blocks become its calls and a user's `tool_result` blocks the results of earlier calls, so the
chat template (or the fallback format) renders them as it renders OpenAI's.

`count_tokens` bodies are the same conversation without the generation fields: they are
parsed by the same code, so a conversation counts exactly as it would be prompted.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Any

from handler.errors import RequestError
from handler.params import resolve_params, verify_params
from handler.pipeline.shapes import Fields, Instance, RequestShape, check_count, prompt_text
from handler.structured import tools as calls
from handler.structured.tools import ToolCall, ToolChoice, ToolSpec

MESSAGES = "messages"
COUNT_TOKENS = "count_tokens"
ENDPOINTS = (MESSAGES, COUNT_TOKENS)

# `cache_control` asks Anthropic to cache the prompt's prefix: a hint, harmless to ignore.
# Tools are part of the conversation: they change the prompt, so count_tokens takes them too.
CONVERSATION_FIELDS = ("model", "messages", "system", "anthropic_version", "cache_control", "tools", "tool_choice")
GENERATION_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "stop_sequences", "metadata", "stream")
FIELDS = {MESSAGES: CONVERSATION_FIELDS + GENERATION_FIELDS, COUNT_TOKENS: CONVERSATION_FIELDS}
# Fields Anthropic defines that this server does not serve yet.
UNSUPPORTED = (
    "thinking",
    "service_tier",
    "container",
    "mcp_servers",
    "context_management",
    "output_format",
    "output_config",
    "inference_geo",
    "speed",
    "diagnostics",
    "user_profile_id",
    "workspace_id",
)
ROLES = ("user", "assistant")
MESSAGE_FIELDS = ("role", "content")
# A text block's own fields; `cache_control` is a caching hint, harmless to ignore (clients such
# as Claude Code send it on every request), `citations` is what an earlier answer cited.
TEXT_BLOCK_FIELDS = ("type", "text", "cache_control", "citations")
TOOL_USE_FIELDS = ("type", "id", "name", "input", "cache_control")
TOOL_RESULT_FIELDS = ("type", "tool_use_id", "content", "is_error", "cache_control")
TOOL_BLOCKS = ("tool_use", "tool_result")
# What each role's content may hold besides text.
BLOCKS = {"user": ("text", "tool_result"), "assistant": ("text", "tool_use")}
UNSUPPORTED_BLOCKS = (
    "image",
    "document",
    "search_result",
    "server_tool_use",
    "web_search_tool_result",
    "thinking",
    "redacted_thinking",
    "container_upload",
)
METADATA_FIELDS = ("user_id",)
MAX_TEMPERATURE = 1.0  # Anthropic's range is [0, 1], narrower than the native one
# A custom tool's fields; `type` is "custom" or absent (other types are Anthropic's server tools).
TOOL_FIELDS = ("type", "name", "description", "input_schema", "cache_control", "strict")
MAX_TOOLS = 128
CHOICES = ("auto", "any", "tool", "none")
CHOICE_MODES = {"auto": "auto", "any": "required", "tool": "function", "none": "none"}
CHOICE_FIELDS = {"auto": ("type", "disable_parallel_tool_use"), "any": ("type", "disable_parallel_tool_use"),
                 "tool": ("type", "name", "disable_parallel_tool_use"), "none": ("type",)}  # fmt: skip
CALL_ID_PREFIX = "toolu_"
CALL_ID = re.compile(r"[a-zA-Z0-9_-]{1,128}")  # Anthropic's pattern for a tool_use id, bounded


@dataclass(frozen=True)
class AnthropicRequest:
    """An Anthropic request as the pipeline sees it: one conversation, so one instance."""

    endpoint: str
    model: str | None
    instances: tuple[Instance, ...]

    @property
    def stream(self) -> bool:
        return self.instances[0].params.stream


def parse_anthropic(endpoint: str, body: Any, shape: RequestShape) -> AnthropicRequest:
    """One `/v1/messages` (or `count_tokens`) body checked and turned into its instance."""
    if endpoint not in ENDPOINTS:
        raise AssertionError(f"no Anthropic endpoint {endpoint!r}")
    if not isinstance(body, dict):
        kind = "null" if body is None else type(body).__name__
        raise RequestError(f"the request body must be a JSON object, got {kind}", "body")
    _check_fields(body, FIELDS[endpoint], "")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(f"model must be a string, got {type(model).__name__}", "model")
    version = body.get("anthropic_version")
    if version is not None and not isinstance(version, str):
        raise RequestError("anthropic_version must be a string", "anthropic_version")
    messages, prefill = _conversation(body, shape)
    if endpoint == MESSAGES:
        layer, names = _parameters(body)
    else:  # counting generates nothing: one token keeps the total-token check to the prompt's own size
        layer, names = {"max_new_tokens": 1, "return_full_text": False}, {}
    spec = tool_spec(body)
    grammar = calls.grammar(spec, "tools", shape.limits.max_response_format_bytes) if spec else None
    if grammar is not None:
        names["response_format"] = "tools"
    params = resolve_params([("", layer)], shape.limits, shape.defaults, names)
    if grammar is not None and endpoint == MESSAGES:  # a count needs the prompt, not the grammar
        params = replace(params, response_format=grammar)
        verify_params(params, names)
    fields = Fields("messages", tuple(names.items()))
    instance = Instance(params, fields, messages=messages, prefill=prefill, tools=spec)
    return AnthropicRequest(endpoint, model, (instance,))


def _check_fields(body: dict[str, Any], known: tuple[str, ...], prefix: str) -> None:
    for key in body:
        if key in UNSUPPORTED:
            raise RequestError(f"{prefix}{key}: not supported by this server yet", f"{prefix}{key}")
        if key not in known:
            raise RequestError(f"{prefix}{key}: unknown field; known fields: {', '.join(known)}", f"{prefix}{key}")


def _parameters(body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The native parameter layer, and Anthropic's name for each parameter it renames."""
    if body.get("max_tokens") is None:
        raise RequestError("max_tokens: field required", "max_tokens")
    layer: dict[str, Any] = {"max_new_tokens": body["max_tokens"], "return_full_text": False}
    names = {"max_new_tokens": "max_tokens", "stop": "stop_sequences"}
    for name in ("temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            layer[name] = body[name]
    temperature = layer.get("temperature")
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and not 0 <= temperature <= MAX_TEMPERATURE:
        raise RequestError(f"temperature: must be between 0 and {MAX_TEMPERATURE}, got {temperature}", "temperature")
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list):
            raise RequestError("stop_sequences: must be a list of strings", "stop_sequences")
        if stops:
            layer["stop"] = stops
    layer["stream"] = False if body.get("stream") is None else body["stream"]
    _metadata(body.get("metadata"))
    return layer, names


def _metadata(value: Any) -> None:
    """Anthropic's `metadata.user_id`: checked, then unused (it names an end user for abuse tracking)."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise RequestError("metadata: must be an object", "metadata")
    _check_fields(value, METADATA_FIELDS, "metadata.")
    user = value.get("user_id")
    if user is not None and not isinstance(user, str):
        raise RequestError("metadata.user_id: must be a string", "metadata.user_id")


def tool_spec(body: dict[str, Any]) -> ToolSpec | None:
    """`tools` and `tool_choice` into the neutral `ToolSpec`; None without tools (an empty list is none)."""
    value = body.get("tools")
    if value is None or value == []:
        if body.get("tool_choice") is not None:
            raise RequestError("tool_choice: may only be given with tools", "tool_choice")
        return None
    if not isinstance(value, list):
        raise RequestError("tools: must be a list of tools {name, description, input_schema}", "tools")
    check_count(len(value), "tools", MAX_TOOLS)
    found = tuple(_tool(item, f"tools[{i}]") for i, item in enumerate(value))
    calls.check_unique(found, "tools")
    spec = ToolSpec(found, _tool_choice(body.get("tool_choice")))
    calls.check_choice(spec, "tool_choice")
    return spec


def _tool(value: Any, where: str) -> calls.Tool:
    if not isinstance(value, dict):
        raise RequestError(f"{where}: must be an object {{'name', 'description', 'input_schema'}}", where)
    kind = value.get("type")
    if kind is not None and kind != "custom":
        message = f"{where}.type: {_shown(kind)} tools (Anthropic's server tools) are not supported; give custom tools"
        raise RequestError(message, f"{where}.type")
    _check_fields(value, TOOL_FIELDS, f"{where}.")
    if "input_schema" not in value:
        raise RequestError(f"{where}.input_schema: field required", f"{where}.input_schema")
    if value.get("strict") is not None and not isinstance(value["strict"], bool):
        raise RequestError(f"{where}.strict: must be true or false", f"{where}.strict")
    names = {"name": f"{where}.name", "description": f"{where}.description", "parameters": f"{where}.input_schema"}
    return calls.tool(value.get("name"), value.get("description"), value["input_schema"], names)


def _tool_choice(value: Any) -> ToolChoice:
    """Anthropic's `{"type": auto|any|tool|none}` as the neutral choice: `any` is OpenAI's `required`."""
    if value is None:
        return ToolChoice("auto")
    if not isinstance(value, dict) or value.get("type") not in CHOICES:
        shown = value.get("type") if isinstance(value, dict) else value
        raise RequestError(f"tool_choice.type: must be one of {', '.join(CHOICES)}, got {_shown(shown)}", "tool_choice.type")
    kind = value["type"]
    _check_fields(value, CHOICE_FIELDS[kind], "tool_choice.")
    disable = value.get("disable_parallel_tool_use", False)
    if not isinstance(disable, bool):
        where = "tool_choice.disable_parallel_tool_use"
        raise RequestError(f"{where}: must be true or false", where)
    name = value.get("name")
    if kind == "tool" and not isinstance(name, str):
        raise RequestError("tool_choice.name: the name of one of the tools is required with type 'tool'", "tool_choice.name")
    return ToolChoice(CHOICE_MODES[kind], name, parallel=not disable)


def _conversation(body: dict[str, Any], shape: RequestShape) -> tuple[tuple[dict[str, Any], ...], bool]:
    """`system` and `messages` as the pipeline's turns; whether the last one is a prefill.

    Consecutive turns of one role are joined into one, as Anthropic combines them. An assistant's
    `tool_use` blocks are its turn's calls; a user's `tool_result` blocks become `tool` turns (each
    naming an earlier call), before the text of the same message."""
    turns: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None:
        text = _text(system, "system", shape, allow_empty=True)
        if text:
            turns.append({"role": "system", "content": text})
    value = body.get("messages")
    if not isinstance(value, list) or not value:
        raise RequestError("messages: must be a non-empty list of {role, content} objects", "messages")
    called: set[str] = set()
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where}: must be an object with 'role' and 'content'", where)
        _check_fields(message, MESSAGE_FIELDS, f"{where}.")
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role: must be one of {', '.join(ROLES)}, got {_shown(role)}", f"{where}.role")
        if "content" not in message:
            raise RequestError(f"{where}.content: field required", f"{where}.content")
        content = message["content"]
        if isinstance(content, list) and any(isinstance(b, dict) and b.get("type") in TOOL_BLOCKS for b in content):
            _tool_turn(turns, role, content, f"{where}.content", shape, called)
            continue
        text = _text(content, f"{where}.content", shape)
        _add_text(turns, role, text)
    last = turns[-1]
    if last["role"] == "assistant" and last.get("tool_calls"):
        where = f"messages[{len(value) - 1}].content"
        raise RequestError(f"{where}: a last assistant message with tool_use blocks needs its tool_result next", where)
    return tuple(turns), last["role"] == "assistant"


def _add_text(turns: list[dict[str, Any]], role: str, text: str) -> None:
    if turns and turns[-1]["role"] == role:
        joined = f"{turns[-1]['content']}\n\n{text}" if turns[-1]["content"] else text
        turns[-1] = {**turns[-1], "content": joined}
    else:
        turns.append({"role": role, "content": text})


def _tool_turn(
    turns: list[dict[str, Any]], role: str, blocks: list[Any], where: str, shape: RequestShape, called: set[str]
) -> None:
    """A message holding `tool_use` (assistant) or `tool_result` (user) blocks, with any text beside them."""
    texts: list[str] = []
    made: list[ToolCall] = []
    for j, block in enumerate(blocks):
        field = f"{where}[{j}]"
        kind = _block_kind(block, field, BLOCKS[role])
        if kind == "text":
            _check_fields(block, TEXT_BLOCK_FIELDS, f"{field}.")
            texts.append(prompt_text(block.get("text"), f"{field}.text", shape))
        elif kind == "tool_use":
            call = _tool_use(block, field)
            if call.id in called or call.id in {c.id for c in made}:
                raise RequestError(f"{field}.id: repeats the id {_shown(call.id)} of an earlier tool_use", f"{field}.id")
            made.append(call)
        else:
            turns.append(_tool_result(block, field, shape, called))
    text = prompt_text("\n".join(texts), where, shape) if texts else ""
    if role == "user":
        if text:
            _add_text(turns, role, text)
        return
    called.update(c.id for c in made)
    last = turns[-1] if turns else None
    if last is not None and last["role"] == "assistant":  # consecutive assistant turns are one
        joined = "\n\n".join(t for t in (last["content"], text) if t)
        turns[-1] = {"role": "assistant", "content": joined, "tool_calls": last.get("tool_calls", ()) + tuple(made)}
    else:
        turns.append({"role": "assistant", "content": text, "tool_calls": tuple(made)})


def _tool_use(block: dict[str, Any], where: str) -> ToolCall:
    _check_fields(block, TOOL_USE_FIELDS, f"{where}.")
    call_id, name, arguments = block.get("id"), block.get("name"), block.get("input")
    if not isinstance(call_id, str) or not CALL_ID.fullmatch(call_id):
        raise RequestError(f"{where}.id: must be an id of letters, digits, _ and -, got {_shown(call_id)}", f"{where}.id")
    if not isinstance(name, str) or not calls.NAME.fullmatch(name):
        raise RequestError(f"{where}.name: must be a tool's name, got {_shown(name)}", f"{where}.name")
    if not isinstance(arguments, dict):
        raise RequestError(f"{where}.input: must be an object, got {_shown(arguments)}", f"{where}.input")
    try:
        text = json.dumps(arguments, separators=(",", ":"), allow_nan=False)
    except (RecursionError, ValueError) as error:
        raise RequestError(f"{where}.input: is not valid JSON: {error}", f"{where}.input") from error
    return ToolCall(call_id, name, text)


def _tool_result(block: dict[str, Any], where: str, shape: RequestShape, called: set[str]) -> dict[str, Any]:
    """A `tool` turn: the result's text (its text blocks joined), marked when `is_error` says the call failed."""
    _check_fields(block, TOOL_RESULT_FIELDS, f"{where}.")
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or call_id not in called:
        message = f"{where}.tool_use_id: must name the id of an earlier tool_use block, got {_shown(call_id)}"
        raise RequestError(message, f"{where}.tool_use_id")
    is_error = block.get("is_error", False)
    if not isinstance(is_error, bool):
        raise RequestError(f"{where}.is_error: must be true or false", f"{where}.is_error")
    content = block.get("content", "")
    if content in ("", []):
        text = "(empty)"
    else:
        text = _text(content, f"{where}.content", shape)
    return {"role": "tool", "content": f"Error: {text}" if is_error else text, "tool_call_id": call_id}


def _block_kind(block: Any, field: str, kinds: tuple[str, ...]) -> str:
    if not isinstance(block, dict):
        raise RequestError(f"{field}: must be an object {{'type': 'text', 'text': ...}}", field)
    kind = block.get("type")
    if kind in UNSUPPORTED_BLOCKS:
        raise RequestError(f"{field}.type: {kind!r} blocks are not supported by this server yet", f"{field}.type")
    if kind not in kinds:
        allowed = " or ".join(repr(k) for k in kinds)
        raise RequestError(f"{field}.type: must be {allowed} here, got {_shown(kind)}", f"{field}.type")
    return kind


def _text(value: Any, where: str, shape: RequestShape, allow_empty: bool = False) -> str:
    """A string, or a list of text blocks joined by newlines; other block types are refused by name."""
    if isinstance(value, str):
        return value if allow_empty and not value else prompt_text(value, where, shape)
    if not isinstance(value, list):
        raise RequestError(f"{where}: must be a string or a list of content blocks", where)
    if not value:
        raise RequestError(f"{where}: must not be an empty list", where)
    texts = []
    for j, block in enumerate(value):
        field = f"{where}[{j}]"
        _block_kind(block, field, ("text",))
        _check_fields(block, TEXT_BLOCK_FIELDS, f"{field}.")
        texts.append(prompt_text(block.get("text"), f"{field}.text", shape))
    return prompt_text("\n".join(texts), where, shape)


def _shown(value: Any) -> str:
    """A client's value in an error, cut short: a huge one must not come back whole."""
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."
