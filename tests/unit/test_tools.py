"""The tool-call format: its parser, whole and piece by piece; its grammar, compiled by xgrammar; its prompt.

The grammar is checked with xgrammar's own matcher on SmolLM2's vocabulary: what it accepts
the parser reads back, and arguments that break a tool's schema, an unknown name, or text
where a call is required are refused.
"""

from __future__ import annotations

import json

import pytest
import xgrammar
from transformers import AutoTokenizer

from handler.errors import RequestError
from handler.params import GenerationParams
from handler.pipeline.prompts import chat_input, render
from handler.pipeline.shapes import Fields, Instance
from handler.structured import tools as calls
from handler.structured.grammar_worker import compile_source
from handler.structured.tools import CallSplitter, ToolCall, ToolChoice, ToolSpec, split_calls

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
}
WHERE = {
    "name": "tools[0].function.name",
    "description": "tools[0].function.description",
    "parameters": "tools[0].function.parameters",
}


def weather_tool(name: str = "get_weather"):
    return calls.tool(name, "Weather for a city", WEATHER, WHERE)


def call(name: str, arguments: str) -> str:
    return calls.call_text(name, arguments)


def test_plain_text_is_all_content():
    assert split_calls("Hello, a < b and <tool not a call") == ("Hello, a < b and <tool not a call", ())


def test_calls_are_split_from_the_text_around_them():
    text = "Let me check.\n" + call("get_weather", '{"city": "Paris", "days": 2}') + "\n" + call("get_time", "{}")
    content, found = split_calls(text)
    assert content == "Let me check."
    assert [(c.name, c.arguments) for c in found] == [("get_weather", '{"city": "Paris", "days": 2}'), ("get_time", "{}")]
    assert all(c.id.startswith("call_") for c in found) and found[0].id != found[1].id


def test_a_stream_fed_one_character_at_a_time_gives_the_same_calls():
    text = "Sure " + call("get_weather", '{"city": "a}b", "days": 2}') + "\n" + call("get_weather", '{"city": "x", "days": 1}')
    splitter = CallSplitter()
    events = [event for character in text for event in splitter.feed(character)] + splitter.finish()
    starts = [e.call.name for e in events if e.kind == "start"]
    arguments = {}
    for event in events:
        if event.kind == "arguments":
            arguments[event.index] = arguments.get(event.index, "") + event.text
    assert starts == ["get_weather", "get_weather"]
    assert arguments == {0: '{"city": "a}b", "days": 2}', 1: '{"city": "x", "days": 1}'}
    assert "".join(e.text for e in events if e.kind == "text") == "Sure"  # whitespace before a call is not text


def test_text_that_may_open_a_call_is_held_until_it_cannot():
    splitter = CallSplitter()
    assert [e.text for e in splitter.feed("Hi <tool")] == ["Hi "]
    assert [e.text for e in splitter.feed("box>")] == ["<toolbox>"]


def test_a_call_cut_by_the_token_limit_keeps_its_arguments_without_the_closing():
    splitter = CallSplitter()
    splitter.feed(calls.BEGIN + 'get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool')
    [end] = splitter.finish()
    assert (end.kind, end.call.arguments) == ("end", '{"city": "Paris", "days": 2}')


def test_a_call_cut_before_its_name_is_no_text():
    """The grammar opened it, so it never was text: a second call cut by the limit leaves the first alone."""
    text = call("get_weather", '{"city":"Paris"}') + "\n" + calls.BEGIN[:-3]
    content, found = split_calls(text)
    assert content == "" and [c.arguments for c in found] == ['{"city":"Paris"}']
    assert split_calls(calls.BEGIN + "get_wea") == ("", ())


def test_call_ids_are_in_the_protocols_words():
    [found] = split_calls(call("get_time", "{}"), id_prefix="toolu_")[1]
    assert found.id.startswith("toolu_") and len(found.id) > len("toolu_")


def compiled(spec: ToolSpec, tokenizer_info: xgrammar.TokenizerInfo) -> xgrammar.CompiledGrammar:
    grammar = calls.grammar(spec, "tools", 32768)
    compiler = xgrammar.GrammarCompiler(tokenizer_info, cache_enabled=False)
    return compile_source(compiler, grammar.kind, grammar.source)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def tokenizer_info(tokenizer) -> xgrammar.TokenizerInfo:
    return xgrammar.TokenizerInfo.from_huggingface(tokenizer, stop_token_ids=[tokenizer.eos_token_id])


def accepts(grammar: xgrammar.CompiledGrammar, text: str, eos: int) -> bool:
    matcher = xgrammar.GrammarMatcher(grammar)
    return matcher.accept_string(text) and matcher.accept_token(eos)


GOOD = call("get_weather", '{"city":"Paris","days":2}')


@pytest.mark.parametrize(
    "choice, text, accepted",
    [
        (ToolChoice("auto"), "It is sunny.", True),
        (ToolChoice("auto"), "Let me look. " + GOOD, True),
        (ToolChoice("auto"), GOOD + "\n" + GOOD, True),
        (ToolChoice("auto", parallel=False), GOOD + "\n" + GOOD, False),
        (ToolChoice("auto"), call("get_weather", '{"city":"Paris","days":9}'), False),
        (ToolChoice("auto"), call("get_weather", '{"city":"Paris"}'), False),
        (ToolChoice("auto"), call("launch", "{}"), False),
        (ToolChoice("required"), "It is sunny.", False),
        (ToolChoice("required"), GOOD, True),
        (ToolChoice("required"), GOOD + "\n" + call("get_time", "{}"), True),
        (ToolChoice("required", parallel=False), GOOD + "\n" + GOOD, False),
        (ToolChoice("function", "get_time"), GOOD, False),
        (ToolChoice("function", "get_time"), call("get_time", "{}"), True),
        (ToolChoice("required"), call("get_weather", '{"city":"Paris","days":2,"extra":1}'), False),
        # arguments are compact JSON: no whitespace for a small model to spend its tokens on
        (ToolChoice("required"), call("get_weather", '{"city": "Paris","days":2}'), False),
        (ToolChoice("required"), call("get_weather", '{ "city":"Paris","days":2}'), False),
        (ToolChoice("auto"), call("get_weather", '{"city":"Paris",\n"days":2}'), False),
    ],
)
def test_the_grammar_allows_exactly_the_calls_the_choice_allows(tokenizer, tokenizer_info, choice, text, accepted):
    spec = ToolSpec((weather_tool(), calls.tool("get_time", None, None, WHERE)), choice)
    assert accepts(compiled(spec, tokenizer_info), text, tokenizer.eos_token_id) is accepted


def test_what_the_grammar_accepts_the_parser_reads_back_and_it_validates(tokenizer_info, tokenizer):
    import jsonschema

    spec = ToolSpec((weather_tool(),), ToolChoice("required"))
    text = call("get_weather", '{"city":"Oslo","days":7}')
    assert accepts(compiled(spec, tokenizer_info), text, tokenizer.eos_token_id)
    [found] = split_calls(text)[1]
    jsonschema.validate(json.loads(found.arguments), WEATHER)


def test_none_or_no_tools_needs_no_grammar():
    assert calls.grammar(ToolSpec((weather_tool(),), ToolChoice("none")), "tools", 32768) is None
    assert calls.grammar(ToolSpec((), ToolChoice("auto")), "tools", 32768) is None


def test_a_grammar_over_the_size_limit_is_refused_naming_the_tools():
    with pytest.raises(RequestError) as caught:
        calls.grammar(ToolSpec((weather_tool(),), ToolChoice("required")), "tools", 100)
    assert (caught.value.status, caught.value.field) == (422, "tools")


@pytest.mark.parametrize("name", ["", "a b", 'x"y', "a<b>", "f" * 65, 5, None, "naïve"])
def test_names_that_could_break_the_format_are_refused(name):
    with pytest.raises(RequestError) as caught:
        weather_tool(name)
    assert caught.value.field == "tools[0].function.name"


@pytest.mark.parametrize(
    "parameters",
    [[], "object", {"type": "string"}, {"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}],
)
def test_parameters_that_are_no_object_schema_or_cannot_be_enforced_are_refused(parameters):
    with pytest.raises(RequestError) as caught:
        calls.tool("f", None, parameters, WHERE)
    assert caught.value.field == "tools[0].function.parameters"


def test_choices_must_name_a_tool_that_exists():
    with pytest.raises(RequestError, match="not among the tools"):
        calls.check_choice(ToolSpec((weather_tool(),), ToolChoice("function", "nope")), "tool_choice")
    with pytest.raises(RequestError, match="needs tools"):
        calls.check_choice(ToolSpec((), ToolChoice("required")), "tool_choice")
    with pytest.raises(RequestError, match="repeats"):
        calls.check_unique((weather_tool(), weather_tool()), "tools")


HISTORY = (
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": (ToolCall("call_1", "get_weather", '{"city":"Paris","days":1}'),)},
    {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    {"role": "tool", "content": "18 C", "tool_call_id": "call_1"},
)


def instance(choice: str = "auto", messages=HISTORY) -> Instance:
    return Instance(
        GenerationParams(), Fields("messages"), messages=messages, tools=ToolSpec((weather_tool(),), ToolChoice(choice))
    )


def test_a_template_without_tools_gets_the_fallback_block_and_tags(tokenizer):
    text, _ = render(instance(), tokenizer, None)
    assert "<tools>\n" + json.dumps(weather_tool().listing()) + "\n</tools>" in text
    assert call("get_weather", '{"city":"Paris","days":1}') in text
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\n18 C\n</tool_response><|im_end|>" in text
    assert text.index("<tools>") < text.index("Weather in Paris?")


def test_tool_choice_none_shows_no_tools_but_keeps_the_history(tokenizer):
    text, _ = render(instance("none"), tokenizer, None)
    assert "<tools>" not in text and call("get_weather", '{"city":"Paris","days":1}') in text


def test_a_template_that_knows_tools_renders_them_itself(tokenizer):
    own = (
        "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
        "{% for m in messages %}{{ m.role }}:{{ m.content }}"
        "{% for c in m.tool_calls or [] %}[{{ c.function.name }}({{ c.function.arguments.city }})]{% endfor %}\n{% endfor %}"
    )
    knowing = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    knowing.chat_template = own
    messages, listed = chat_input(instance(), knowing)
    assert listed == [weather_tool().listing()]
    text, _ = render(instance(), knowing, None)
    assert text.startswith("TOOLS:get_weather;user:Weather in Paris?assistant:[get_weather(Paris)]tool:sunny")  # trim_blocks
    fallback, _ = render(instance(), knowing, None, tool_prompt="fallback")
    assert "<tools>" in fallback and "TOOLS:" not in fallback
