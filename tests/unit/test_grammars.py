"""Compiling response formats with SmolLM2's real tokenizer: once per format, bounded, 4xx for the bad ones.

Each `Grammars` here runs its own real compiler child process.
"""

import json
import threading
from pathlib import Path

import pytest
import xgrammar
from transformers import AutoTokenizer

from handler.errors import RequestError
from handler.response_format import ResponseFormat, parse_response_format
from handler.settings import StructuredOutputSettings
from handler.structured.grammars import Grammars, tokenizer_info

SCHEMAS = json.loads((Path(__file__).parents[1] / "support" / "structured_schemas.json").read_text())["schemas"]
# Ten 3000-character strings: well inside the size limit, yet many seconds of compiling.
SLOW_SCHEMA = {"enum": ["x" * 3000 + str(i) for i in range(10)]}


def spec(value, where: str = "parameters.response_format") -> ResponseFormat:
    return parse_response_format(value, where, 32_768)


def schema(body: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "t", "schema": body}}


@pytest.fixture(scope="module")
def info(smollm2_dir) -> xgrammar.TokenizerInfo:
    return tokenizer_info(AutoTokenizer.from_pretrained(smollm2_dir), 49152, [2])


@pytest.fixture(scope="module")
def grammars(info):
    """The shipped defaults."""
    service = Grammars(info, StructuredOutputSettings())
    yield service
    service.close()


@pytest.fixture(scope="module")
def tight(info):
    """Low limits and a two-entry cache."""
    service = Grammars(info, StructuredOutputSettings(compile_timeout_seconds=1, compile_memory_mb=32, cache_entries=2))
    yield service
    service.close()


def refusal(service: Grammars, value, where: str = "parameters.response_format") -> RequestError:
    with pytest.raises(RequestError) as caught:
        service.compile(spec(value, where))
    return caught.value


@pytest.mark.parametrize(
    "value",
    [
        {"type": "json_object"},
        {"type": "regex", "pattern": "[0-9]{3}-[a-z]+"},
        {"type": "grammar", "grammar": 'root ::= "yes" | "no"'},
        *[schema(entry["schema"]) for entry in SCHEMAS],
    ],
    ids=["json_object", "regex", "grammar", *[entry["name"] for entry in SCHEMAS]],
)
def test_every_kind_and_every_fixture_schema_compiles(grammars, value):
    assert isinstance(grammars.compile(spec(value)), xgrammar.CompiledGrammar)


def test_a_format_is_compiled_once_whichever_field_sent_it(grammars):
    value = {"type": "regex", "pattern": "once[0-9]"}
    before = grammars.compiles
    first = grammars.compile(spec(value, "parameters.response_format"))
    second = grammars.compile(spec(value, "instances[5].response_format"))
    assert first is second and grammars.compiles == before + 1


def test_concurrent_askers_for_one_format_share_one_compile(grammars):
    value = schema({"type": "object", "properties": {"shared": {"type": "integer"}}})
    before = grammars.compiles
    results = []
    threads = [threading.Thread(target=lambda: results.append(grammars.compile(spec(value)))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and all(result is results[0] for result in results)
    assert grammars.compiles == before + 1


@pytest.mark.parametrize(
    "value, field, words",
    [
        (schema({"type": "objectx"}), "json_schema.schema", "Unsupported type"),
        (schema({"type": "integer", "minimum": 5, "maximum": 1}), "json_schema.schema", "minimum greater than maximum"),
        (schema({"type": "array", "minItems": 5, "maxItems": 2}), "json_schema.schema", "minItems is greater"),
        (schema({"properties": {"a": {"$ref": "#/nope"}}}), "json_schema.schema", "nope"),
        (schema({"$ref": "#"}), "json_schema.schema", "Circular $ref"),
        (
            schema({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}),
            "json_schema.schema",
            "Circular $ref",
        ),
        ({"type": "regex", "pattern": "(unclosed"}, "pattern", "parenthesis is not closed"),
        ({"type": "regex", "pattern": "(?<=a)b"}, "pattern", "Lookbehind"),
        ({"type": "regex", "pattern": "a**"}, "pattern", "repetition"),
        ({"type": "grammar", "grammar": 'start ::= "a"'}, "grammar", "root"),
        ({"type": "grammar", "grammar": "root ::= missing"}, "grammar", "not defined"),
        ({"type": "grammar", "grammar": 'root ::= "a" |'}, "grammar", "EBNF"),
    ],
)
def test_what_the_compiler_cannot_follow_is_a_400_naming_the_field(grammars, value, field, words):
    error = refusal(grammars, value)
    assert (error.status, error.field) == (400, f"parameters.response_format.{field}")
    assert words in error.message and "/project/cpp" not in error.message


def test_a_refusal_is_cached_and_names_each_askers_own_field(grammars):
    value = {"type": "regex", "pattern": "(twice"}
    refusal(grammars, value)
    before = grammars.compiles
    error = refusal(grammars, value, "instances[1].response_format")
    assert error.field == "instances[1].response_format.pattern" and grammars.compiles == before


def test_a_recursive_schema_with_finite_answers_compiles(grammars):
    tree = {
        "$defs": {"node": {"type": "object", "properties": {"children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
        "$ref": "#/$defs/node",
    }
    assert isinstance(grammars.compile(spec(schema(tree))), xgrammar.CompiledGrammar)


@pytest.mark.parametrize("pattern", ["(a+)+$", "(a|aa)*b", "^(([a-z])+.)+[A-Z]([a-z])+$"])
def test_regexes_catastrophic_for_backtracking_compile(grammars, pattern):
    """xgrammar does not backtrack: these compile in milliseconds (following them is bounded by max_mask_ms)."""
    assert isinstance(grammars.compile(spec({"type": "regex", "pattern": pattern})), xgrammar.CompiledGrammar)


def test_a_compile_over_the_time_limit_is_a_422_and_the_compiler_serves_after(tight):
    error = refusal(tight, schema(SLOW_SCHEMA))
    assert (error.status, error.field) == (422, "parameters.response_format.json_schema.schema")
    assert error.details == {"limit": 1, "limit_name": "structured_output.compile_timeout_seconds"}
    assert isinstance(tight.compile(spec({"type": "regex", "pattern": "after[0-9]"})), xgrammar.CompiledGrammar)


def test_a_compile_over_the_memory_limit_is_a_422_and_the_compiler_serves_after(info):
    service = Grammars(info, StructuredOutputSettings(compile_timeout_seconds=120, compile_memory_mb=32))
    try:
        error = refusal(service, {"type": "regex", "pattern": "((a{1,1000}){1,1000}){1,1000}"})
        assert (error.status, error.field) == (422, "parameters.response_format.pattern")
        assert error.details == {"limit": 32, "limit_name": "structured_output.compile_memory_mb"}
        assert isinstance(service.compile(spec({"type": "json_object"})), xgrammar.CompiledGrammar)
    finally:
        service.close()


def test_the_cache_holds_at_most_its_entries(tight):
    values = [{"type": "regex", "pattern": f"lru{i}"} for i in range(3)]
    for value in values:
        tight.compile(spec(value))
    before = tight.compiles
    tight.compile(spec(values[2]))
    assert tight.compiles == before
    tight.compile(spec(values[0]))
    assert tight.compiles == before + 1


def test_a_grammar_compiled_in_the_child_follows_this_tokenizer(grammars, info):
    grammar = grammars.compile(spec({"type": "grammar", "grammar": 'root ::= "yes" | "no"'}))
    matcher = xgrammar.GrammarMatcher(grammar)
    assert matcher.accept_string("yes") and matcher.is_completed()
    assert grammar.tokenizer_info.vocab_size == info.vocab_size and grammar.tokenizer_info.stop_token_ids == [2]


@pytest.mark.parametrize(
    "keyword, schema, breaking",
    [
        ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1, 1]"),
        ("not", {"not": {"type": "string"}}, '"x"'),
        (
            "if",
            {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "if": {"properties": {"a": {"const": 1}}},
                "then": {"required": ["b"]},
            },
            '{"a": 1}',
        ),
        (
            "dependentRequired",
            {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "dependentRequired": {"a": ["b"]},
            },
            '{"a": 1}',
        ),
        ("contains", {"type": "array", "items": {"type": "integer"}, "contains": {"const": 5}}, "[1]"),
        ("allOf", {"allOf": [{"type": "integer", "minimum": 0}, {"maximum": 5}]}, "9"),
        ("multipleOf", {"type": "number", "multipleOf": 0.5}, "0.3"),
        ("pattern", {"type": "string", "pattern": "^[a-z]+$", "maxLength": 3}, '"abcdef"'),
    ],  # fmt: skip
)
def test_the_keywords_refused_at_parse_time_are_ones_xgrammar_ignores(info, keyword, schema, breaking):
    """Why `response_format.IGNORED` exists; a failure here means xgrammar now enforces the keyword."""
    grammar = xgrammar.GrammarCompiler(info).compile_json_schema(json.dumps(schema), any_whitespace=False)
    matcher = xgrammar.GrammarMatcher(grammar)
    assert matcher.accept_string(breaking) and matcher.is_completed()
