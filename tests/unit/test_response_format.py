"""`response_format` parsing: shapes, field names in errors, the size limit, and its place on GenerationParams."""

import json

import pytest

from handler.errors import RequestError
from handler.params import GenerationParams, ParamLimits, resolve_params
from handler.response_format import ResponseFormat, parse_response_format
from handler.settings import HandlerSettings, SettingsError, StructuredOutputSettings

WHERE = "parameters.response_format"
SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}, "required": ["b"]}


def parse(value, max_bytes: int = 32_768) -> ResponseFormat | None:
    return parse_response_format(value, WHERE, max_bytes)


def rejects(value, max_bytes: int = 32_768) -> RequestError:
    with pytest.raises(RequestError) as caught:
        parse(value, max_bytes)
    return caught.value


def test_null_means_no_format():
    assert parse(None) is None


def test_json_object_has_no_source():
    assert parse({"type": "json_object"}) == ResponseFormat("json_object", "")


def test_json_schema_keeps_its_property_order_in_compact_json():
    spec = parse({"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}})
    assert spec.kind == "json_schema"
    assert spec.source == json.dumps(SCHEMA, separators=(",", ":"))
    assert spec.source.index('"b"') < spec.source.index('"a"')


def test_non_ascii_in_a_schema_is_escaped_so_its_size_is_its_bytes():
    spec = parse({"type": "json_schema", "json_schema": {"schema": {"enum": ["café"]}}})
    assert spec.source == '{"enum":["caf\\u00e9"]}'


def test_regex_and_grammar_keep_their_text():
    assert parse({"type": "regex", "pattern": "[0-9]+"}) == ResponseFormat("regex", "[0-9]+")
    assert parse({"type": "grammar", "grammar": 'root ::= "a"'}) == ResponseFormat("grammar", 'root ::= "a"')


def test_the_same_format_from_another_field_is_equal_and_hashes_alike():
    one = parse_response_format({"type": "regex", "pattern": "a+"}, "parameters.response_format", 100)
    two = parse_response_format({"type": "regex", "pattern": "a+"}, "instances[3].response_format", 100)
    assert one == two and hash(one) == hash(two)
    assert two.source_field == "instances[3].response_format.pattern"


@pytest.mark.parametrize(
    "value, field",
    [
        ("json", WHERE),
        ({}, f"{WHERE}.type"),
        ({"type": "xml"}, f"{WHERE}.type"),
        ({"type": "json_object", "schema": {}}, f"{WHERE}.schema"),
        ({"type": "json_schema"}, f"{WHERE}.json_schema"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, f"{WHERE}.json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"schema": "{}"}}, f"{WHERE}.json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"schema": True}}, f"{WHERE}.json_schema.schema"),
        ({"type": "json_schema", "json_schema": []}, f"{WHERE}.json_schema"),
        ({"type": "json_schema", "json_schema": {"schema": {}, "name": 3}}, f"{WHERE}.json_schema.name"),
        ({"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}, f"{WHERE}.json_schema.strict"),
        ({"type": "json_schema", "json_schema": {"schema": {}, "format": 1}}, f"{WHERE}.json_schema.format"),
        ({"type": "regex"}, f"{WHERE}.pattern"),
        ({"type": "regex", "pattern": ""}, f"{WHERE}.pattern"),
        ({"type": "regex", "pattern": ["a"]}, f"{WHERE}.pattern"),
        ({"type": "regex", "pattern": "\ud800"}, f"{WHERE}.pattern"),
        ({"type": "grammar", "grammar": 5}, f"{WHERE}.grammar"),
        ({"type": "grammar", "grammar": "root ::= 'a'", "pattern": "a"}, f"{WHERE}.pattern"),
    ],
)
def test_a_wrong_shape_is_a_400_naming_the_field(value, field):
    error = rejects(value)
    assert (error.status, error.field) == (400, field)


def test_a_schema_nested_deeper_than_json_can_encode_is_a_400():
    schema: dict = {"type": "integer"}
    for _ in range(5000):
        schema = {"type": "array", "items": schema}
    error = rejects({"type": "json_schema", "json_schema": {"schema": schema}})
    assert (error.status, error.field) == (400, f"{WHERE}.json_schema.schema")


def test_a_source_over_the_size_limit_is_a_422_with_the_limit():
    error = rejects({"type": "json_schema", "json_schema": {"schema": {"enum": ["x" * 200]}}}, max_bytes=100)
    assert (error.status, error.field) == (422, f"{WHERE}.json_schema.schema")
    assert error.details == {"limit": 100, "value": len('{"enum":["' + "x" * 200 + '"]}')}


def test_the_size_limit_counts_bytes():
    assert rejects({"type": "regex", "pattern": "é" * 60}, max_bytes=100).details["value"] == 120


def test_it_sits_on_generation_params_and_keeps_them_hashable():
    params = resolve_params([("parameters.", {"response_format": {"type": "regex", "pattern": "a+"}})], ParamLimits())
    assert params.response_format == ResponseFormat("regex", "a+")
    assert hash(params) == hash(GenerationParams(response_format=ResponseFormat("regex", "a+")))


def test_an_instance_override_names_its_own_field():
    with pytest.raises(RequestError) as caught:
        resolve_params([("instances[2].", {"response_format": {"type": "regex"}})], ParamLimits())
    assert caught.value.field == "instances[2].response_format.pattern"


def test_the_size_limit_is_an_app_limit():
    limits = ParamLimits(max_response_format_bytes=10)
    with pytest.raises(RequestError) as caught:
        resolve_params([("parameters.", {"response_format": {"type": "regex", "pattern": "a" * 11}})], limits)
    assert caught.value.status == 422 and caught.value.details["limit"] == 10


@pytest.mark.parametrize(
    "clash, field",
    [({"num_beams": 2}, "num_beams"), ({"min_new_tokens": 1}, "min_new_tokens"), ({"bad_words": ["x"]}, "bad_words")],
)
def test_parameters_a_grammar_cannot_share_a_row_with_are_refused(clash, field):
    with pytest.raises(RequestError) as caught:
        resolve_params([("parameters.", {"response_format": {"type": "json_object"}, **clash})], ParamLimits())
    assert (caught.value.status, caught.value.field) == (400, field)


def test_structured_output_settings_come_from_the_app_config():
    settings = HandlerSettings.from_config(
        {"handler": {"structured_output": {"compile_timeout_seconds": 2, "cache_entries": 8}}}, {}
    )
    assert settings.structured_output == StructuredOutputSettings(compile_timeout_seconds=2, cache_entries=8)
    assert HandlerSettings.from_config({}, {}).structured_output == StructuredOutputSettings()


@pytest.mark.parametrize("section", [{"compile_timeout_seconds": 0}, {"cache_entries": "many"}, {"compile_time": 5}])
def test_a_wrong_structured_output_setting_stops_the_worker(section):
    with pytest.raises(SettingsError, match="handler.structured_output"):
        HandlerSettings.from_config({"handler": {"structured_output": section}}, {})


@pytest.mark.parametrize(
    "schema, words",
    [
        ({"type": "array", "uniqueItems": True}, "'uniqueItems' at #"),
        ({"not": {"type": "string"}}, "'not' at #"),
        ({"if": {"required": ["a"]}, "then": {"required": ["b"]}}, "at #"),
        ({"type": "object", "dependentRequired": {"a": ["b"]}}, "'dependentRequired' at #"),
        ({"type": "array", "contains": {"const": 5}}, "'contains' at #"),
        ({"allOf": [{"type": "integer"}, {"maximum": 5}]}, "'allOf' at #"),
        ({"type": "number", "multipleOf": 0.5}, "'multipleOf' on a non-integer at #"),
        (
            {"type": "object", "properties": {"a": {"type": "string", "pattern": "^x+$", "maxLength": 3}}},
            "'pattern' with 'minLength' or 'maxLength' at #/properties/a",
        ),
        ({"type": "array", "items": {"anyOf": [{"type": "integer"}, {"uniqueItems": True}]}}, "at #/items/anyOf/1"),
        ({"$defs": {"x": {"not": {}}}, "$ref": "#/$defs/x"}, "'not' at #/$defs/x"),
    ],
)
def test_a_keyword_the_compiler_would_ignore_is_a_400_naming_it(schema, words):
    error = rejects({"type": "json_schema", "json_schema": {"schema": schema}})
    assert (error.status, error.field) == (400, f"{WHERE}.json_schema.schema")
    assert words in error.message and "cannot enforce" in error.message


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "array", "uniqueItems": False},
        {"type": "integer", "multipleOf": 5},
        {"type": "object", "properties": {"not": {"type": "string"}, "if": {"type": "integer"}}},
        {"enum": [{"not": 1}]},
        {"type": "string", "pattern": "^[a-z]{3,8}$"},
    ],
)
def test_what_the_compiler_enforces_passes(schema):
    assert parse({"type": "json_schema", "json_schema": {"schema": schema}}).kind == "json_schema"
