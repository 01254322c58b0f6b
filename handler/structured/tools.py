"""Tool calls: one format for the calls a model writes, from the grammar that forces them to the parser that reads them.

Every protocol (OpenAI's chat and Responses APIs, Anthropic's Messages API) parses its own
tool shapes into the neutral `Tool` and `ToolChoice` here, and renders the neutral pieces the
parser gives back (`ToolCall`, `CallEvent`) in its own words. The format is Hermes's, as
Qwen's templates, SmolLM2-1.7B's training and llama.cpp's "generic" handler write calls:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Why one format, and why this one: the grammar (an xgrammar structural tag) and the parser
must agree to the character, so a call that the grammar let through always parses, and its
`arguments` always validate against the tool's schema. `tool_choice: auto` makes the
opening tag the trigger: text stays free until the model writes `<tool_call>`, and from there
the grammar holds it to a known tool's name and schema. `required` and a named tool leave no
free text at all: the answer is calls only. `parallel_tool_calls: false` allows one call.
A template that knows no tools gets `system_block` (the tools listed in `<tools>`, then how to
call them) and the conversation's earlier calls and results written in the same tags.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Iterable

from handler.errors import RequestError, limit_error
from handler.response_format import ResponseFormat, unfollowed

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
BEGIN = OPEN + '\n{"name": "'
MIDDLE = '", "arguments": '
END = "}\n" + CLOSE
TOOL_CALLS = "tool_calls"  # the ResponseFormat kind whose source is a structural tag
MODES = ("auto", "none", "required", "function")
# OpenAI's rule for function names; it also keeps a name from breaking out of the format's quotes and tags.
NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its parameters as compact JSON Schema text, key order kept."""

    name: str
    description: str
    parameters: str

    def listing(self) -> dict[str, Any]:
        """The tool as chat templates and the fallback block show it (OpenAI's chat shape)."""
        function = {"name": self.name, "description": self.description, "parameters": json.loads(self.parameters)}
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolChoice:
    """`mode` is one of MODES; `name` is the forced tool's when `mode` is "function"."""

    mode: str = "auto"
    name: str | None = None
    parallel: bool = True


@dataclass(frozen=True)
class ToolSpec:
    tools: tuple[Tool, ...]
    choice: ToolChoice

    @property
    def active(self) -> bool:
        """Whether the model may call: `none` renders and constrains as if no tools were sent."""
        return bool(self.tools) and self.choice.mode != "none"


@dataclass(frozen=True)
class ToolCall:
    """One call the model wrote; `arguments` is JSON text, complete unless the answer was cut."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class CallEvent:
    """A piece of a streamed answer: `text`, or a call's `start` (id and name), `arguments` piece or `end`."""

    kind: str
    text: str = ""
    index: int = 0
    call: ToolCall | None = None


def new_call_id(prefix: str = "call_") -> str:
    """A call's id in its protocol's words: OpenAI's `call_...`, Anthropic's `toolu_...`."""
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def tool(name: Any, description: Any, parameters: Any, where: dict[str, str]) -> Tool:
    """One tool, checked; `where` names its `name`, `description` and `parameters` fields as the protocol does."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise RequestError(
            f"{where['name']} must be 1 to 64 letters, digits, underscores or dashes, got {str(name)[:80]!r}",
            where["name"],
        )
    if description is not None and not isinstance(description, str):
        raise RequestError(f"{where['description']} must be a string", where["description"])
    if parameters is None:
        parameters = EMPTY_PARAMETERS
    if not isinstance(parameters, dict):
        raise RequestError(f"{where['parameters']} must be a JSON Schema object", where["parameters"])
    if parameters.get("type", "object") != "object":
        raise RequestError(f"{where['parameters']} must describe an object (type: object)", where["parameters"])
    keyword = unfollowed(parameters)
    if keyword is not None:
        message = f"{where['parameters']} uses {keyword}, which this server cannot enforce while generating"
        raise RequestError(message, where["parameters"])
    try:
        source = json.dumps(parameters, separators=(",", ":"), allow_nan=False)
    except RecursionError as error:
        raise RequestError(f"{where['parameters']} is nested too deeply", where["parameters"]) from error
    except (TypeError, ValueError) as error:
        raise RequestError(f"{where['parameters']} is not valid JSON: {error}", where["parameters"]) from error
    return Tool(name, description or "", source)


def check_unique(tools: Iterable[Tool], field: str) -> None:
    seen: set[str] = set()
    for i, item in enumerate(tools):
        if item.name in seen:
            raise RequestError(f"{field}[{i}] repeats the tool name {item.name!r}", f"{field}[{i}]")
        seen.add(item.name)


def check_choice(spec: ToolSpec, field: str) -> None:
    """A choice that needs tools has some, and a named tool is one of them."""
    choice = spec.choice
    if choice.mode in ("required", "function") and not spec.tools:
        raise RequestError(f"{field} {choice.mode!r} needs tools, and the request has none", field)
    if choice.mode == "function" and choice.name not in {t.name for t in spec.tools}:
        known = ", ".join(t.name for t in spec.tools)
        raise RequestError(f"{field} names the tool {choice.name!r}, which is not among the tools ({known})", field)


def grammar(spec: ToolSpec, where: str, max_bytes: int) -> ResponseFormat | None:
    """The structural tag that holds the model to the format and the tools' schemas, as a response format
    (compiled, cached and bounded by `structured.grammars` as every format is); None when no call is possible."""
    if not spec.active:
        return None
    tools = spec.tools
    if spec.choice.mode == "function":
        tools = tuple(t for t in tools if t.name == spec.choice.name)
    tags = [_tag(t) for t in tools]
    if spec.choice.mode == "auto":
        shape = {"type": "triggered_tags", "triggers": [OPEN], "tags": tags, "stop_after_first": not spec.choice.parallel}
    elif spec.choice.mode == "function" or not spec.choice.parallel:
        shape = tags[0] if len(tags) == 1 else {"type": "or", "elements": tags}
    else:
        shape = {"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True}
    source = json.dumps({"type": "structural_tag", "format": shape}, separators=(",", ":"))
    size = len(source.encode("utf-8"))
    if size > max_bytes:
        raise limit_error(f"{where} take {size} bytes as a grammar, at most {max_bytes} allowed", where, max_bytes, size)
    return ResponseFormat(TOOL_CALLS, source, where)


def _tag(item: Tool) -> dict[str, Any]:
    content = {"type": "json_schema", "json_schema": json.loads(item.parameters)}  # compiled compact (grammar_worker)
    return {"type": "tag", "begin": BEGIN + item.name + MIDDLE, "content": content, "end": END}


def call_text(name: str, arguments: str) -> str:
    """A call as the model writes it, for earlier calls in a conversation rendered without the template's help."""
    return f"{BEGIN}{name}{MIDDLE}{arguments}{END}"


def result_text(content: str) -> str:
    """A tool's result as Hermes's templates show it to the model."""
    return f"<tool_response>\n{content}\n</tool_response>"


def system_block(tools: Iterable[Tool]) -> str:
    """The fallback prompt for templates that know no tools: the tools, then the one way to call them."""
    listed = "\n".join(json.dumps(t.listing()) for t in tools)
    return (
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{listed}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n"
        f'{OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{CLOSE}'
    )


class CallSplitter:
    """Splits a model's text, piece by piece, into free text and calls (`CallEvent`s).

    It holds back only what may still become a tag: the tail of free text that could start
    `<tool_call>`, and the tail of arguments that could start the closing `}\\n</tool_call>`
    (raw newlines cannot occur inside JSON strings, so that closing never appears within the
    arguments). Whitespace between calls is not text. `finish` releases what is held: a call
    cut by the token limit ends with the arguments written so far; one cut before its name is
    nothing (the grammar opened it, so it was never text). `id_prefix` starts each call's id."""

    def __init__(self, id_prefix: str = "call_") -> None:
        self.id_prefix = id_prefix
        self.buffer = ""
        self.state = "text"
        self.calls: list[ToolCall] = []
        self.name = ""
        self.call_id = ""
        self.arguments = ""
        self.text = ""

    @property
    def complete_calls(self) -> int:
        return len(self.calls)

    def feed(self, piece: str) -> list[CallEvent]:
        self.buffer += piece
        events: list[CallEvent] = []
        while True:
            before = (self.state, len(self.buffer))
            events += getattr(self, f"_{self.state}")()
            if (self.state, len(self.buffer)) == before:
                return events

    def finish(self) -> list[CallEvent]:
        events: list[CallEvent] = []
        if self.state == "text":
            if self.buffer.strip() or (self.buffer and not self.calls):
                events.append(self._emit_text(self.buffer))
        elif self.state == "header":
            pass  # a call cut before its name: `_header` already gave back as text whatever left the format
        else:  # a call cut short: what is held is the start of its closing, or more arguments
            if self.buffer and not END.startswith(self.buffer):
                events.append(CallEvent("arguments", self.buffer, len(self.calls)))
                self.arguments += self.buffer
            events.append(self._end())
        self.buffer = ""
        return events

    def _emit_text(self, text: str) -> CallEvent:
        self.text += text
        return CallEvent("text", text)

    def _text(self) -> list[CallEvent]:
        at = self.buffer.find(OPEN)
        if at >= 0:
            before, self.buffer = self.buffer[:at], self.buffer[at + len(OPEN) :]
            self.state = "header"
            return [self._emit_text(before)] if before.strip() else []
        keep = _partial_suffix(self.buffer, OPEN)
        ready = self.buffer[: len(self.buffer) - keep]
        if not ready.strip():  # whitespace waits for text to follow it: between calls it is not text
            return []
        self.buffer = self.buffer[len(ready) :]
        return [self._emit_text(ready)]

    def _header(self) -> list[CallEvent]:
        prefix = BEGIN[len(OPEN) :]
        at = self.buffer.find(MIDDLE)
        if not self.buffer.startswith(prefix[: len(self.buffer)]) or (at < 0 and len(self.buffer) > 200):
            text, self.buffer, self.state = OPEN + self.buffer, "", "text"  # not the format: it was text
            return [self._emit_text(text)]
        if at < 0:
            return []
        self.name, self.buffer = self.buffer[len(prefix) : at], self.buffer[at + len(MIDDLE) :]
        self.call_id, self.arguments, self.state = new_call_id(self.id_prefix), "", "arguments"
        return [CallEvent("start", index=len(self.calls), call=ToolCall(self.call_id, self.name, ""))]

    def _arguments(self) -> list[CallEvent]:
        at = self.buffer.find(END)
        if at >= 0:
            piece, self.buffer = self.buffer[:at], self.buffer[at + len(END) :]
            self.arguments += piece
            events = [CallEvent("arguments", piece, len(self.calls))] if piece else []
            self.state = "text"
            return events + [self._end()]
        keep = _partial_suffix(self.buffer, END)
        piece = self.buffer[: len(self.buffer) - keep]
        if not piece:
            return []
        self.buffer = self.buffer[len(piece) :]
        self.arguments += piece
        return [CallEvent("arguments", piece, len(self.calls))]

    def _end(self) -> CallEvent:
        call = ToolCall(self.call_id, self.name, self.arguments)
        self.calls.append(call)
        self.state = "text"
        return CallEvent("end", index=len(self.calls) - 1, call=call)


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


def split_calls(text: str, id_prefix: str = "call_") -> tuple[str, tuple[ToolCall, ...]]:
    """A whole answer's free text and calls; with calls, the text around them stripped."""
    splitter = CallSplitter(id_prefix)
    splitter.feed(text)
    splitter.finish()
    if not splitter.calls:
        return splitter.text, ()
    return splitter.text.strip(), tuple(splitter.calls)
