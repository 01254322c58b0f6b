"""Anthropic Messages bodies into the pipeline's instances and parameters.

A body is checked field by field, as the OpenAI one is: a field Anthropic defines that this
server does not serve yet (`tools`, `thinking`, image and tool blocks, ...) is refused naming
it, and so is a field Anthropic does not define. The parameters then go through the native
`resolve_params` under Anthropic's names (`max_tokens`, `stop_sequences`), so bounds, limits
and statuses are the native API's, with the precedence it states: the request's value, then
the app's defaults, then the library's. Anthropic's own bounds come first where they are
narrower (temperature in [0, 1]); `max_tokens` is required, as Anthropic requires it.

`count_tokens` bodies are the same conversation without the generation fields: they are
parsed by the same code, so a conversation counts exactly as it would be prompted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from handler.errors import RequestError
from handler.params import resolve_params
from handler.pipeline.shapes import Fields, Instance, RequestShape, prompt_text

MESSAGES = "messages"
COUNT_TOKENS = "count_tokens"
ENDPOINTS = (MESSAGES, COUNT_TOKENS)

# `cache_control` asks Anthropic to cache the prompt's prefix: a hint, harmless to ignore.
CONVERSATION_FIELDS = ("model", "messages", "system", "anthropic_version", "cache_control")
GENERATION_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "stop_sequences", "metadata", "stream")
FIELDS = {MESSAGES: CONVERSATION_FIELDS + GENERATION_FIELDS, COUNT_TOKENS: CONVERSATION_FIELDS}
# Fields Anthropic defines that this server does not serve yet; tool calling will take
# `tools` and `tool_choice` out of here (and `tool_use`/`tool_result` out of the blocks).
UNSUPPORTED = (
    "tools",
    "tool_choice",
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
UNSUPPORTED_BLOCKS = (
    "image",
    "document",
    "search_result",
    "tool_use",
    "tool_result",
    "server_tool_use",
    "web_search_tool_result",
    "thinking",
    "redacted_thinking",
    "container_upload",
)
METADATA_FIELDS = ("user_id",)
MAX_TEMPERATURE = 1.0  # Anthropic's range is [0, 1], narrower than the native one


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
    params = resolve_params([("", layer)], shape.limits, shape.defaults, names)
    instance = Instance(params, Fields("messages", tuple(names.items())), messages=messages, prefill=prefill)
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


def _conversation(body: dict[str, Any], shape: RequestShape) -> tuple[tuple[dict[str, str], ...], bool]:
    """`system` and `messages` as the native `{"role", "content"}` turns; whether the last one is a prefill.

    Consecutive turns of one role are joined into one, as Anthropic combines them."""
    turns: list[dict[str, str]] = []
    system = body.get("system")
    if system is not None:
        text = _text(system, "system", shape, allow_empty=True)
        if text:
            turns.append({"role": "system", "content": text})
    value = body.get("messages")
    if not isinstance(value, list) or not value:
        raise RequestError("messages: must be a non-empty list of {role, content} objects", "messages")
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
        text = _text(message["content"], f"{where}.content", shape)
        if turns and turns[-1]["role"] == role:
            turns[-1] = {"role": role, "content": f"{turns[-1]['content']}\n\n{text}"}
        else:
            turns.append({"role": role, "content": text})
    return tuple(turns), turns[-1]["role"] == "assistant"


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
        if not isinstance(block, dict):
            raise RequestError(f"{field}: must be an object {{'type': 'text', 'text': ...}}", field)
        kind = block.get("type")
        if kind in UNSUPPORTED_BLOCKS:
            raise RequestError(f"{field}.type: {kind!r} blocks are not supported by this server yet", f"{field}.type")
        if kind != "text":
            raise RequestError(f"{field}.type: must be 'text', got {_shown(kind)}", f"{field}.type")
        _check_fields(block, TEXT_BLOCK_FIELDS, f"{field}.")
        texts.append(prompt_text(block.get("text"), f"{field}.text", shape))
    return prompt_text("\n".join(texts), where, shape)


def _shown(value: Any) -> str:
    """A client's value in an error, cut short: a huge one must not come back whole."""
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."
