"""`parameters.response_format`: the shape a request wants its answer in, checked and frozen.

One of
- `{"type": "json_object"}`: any JSON object;
- `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}` (OpenAI's shape);
- `{"type": "regex", "pattern": "..."}`;
- `{"type": "grammar", "grammar": "<EBNF>"}` (xgrammar's GBNF dialect, start rule `root`).

Parsing needs no tokenizer: it checks the shape and the size limit and turns the value into a
`ResponseFormat`, hashable so it can sit on `GenerationParams` and key the compile cache.
Whether the schema, regex or grammar can be followed is known only once `grammars` compiles it.
A schema using a keyword xgrammar 0.2.9 compiles but silently ignores (`IGNORED`) is refused
here, since its answers could fail the schema; vLLM refuses the same ones for xgrammar.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from handler.errors import RequestError, limit_error

KINDS = ("json_object", "json_schema", "regex", "grammar")
# Checked against xgrammar 0.2.9: each compiles, and the grammar accepts values that break it.
IGNORED = ("uniqueItems", "not", "if", "then", "else", "dependentRequired", "dependentSchemas",
           "contains", "minContains", "maxContains", "allOf", "unevaluatedItems")  # fmt: skip
# Where a schema holds subschemas: one subschema, a list of them, or a map of names to them.
ONE = ("items", "additionalProperties", "additionalItems", "propertyNames", "unevaluatedProperties")
MANY = ("anyOf", "oneOf", "prefixItems")
NAMED = ("properties", "patternProperties", "$defs", "definitions")
# The key that carries each kind's source, and the keys it may have besides `type`.
SOURCE_KEYS = {"json_object": None, "json_schema": "json_schema", "regex": "pattern", "grammar": "grammar"}
JSON_SCHEMA_KEYS = ("name", "schema", "description", "strict")


@dataclass(frozen=True)
class ResponseFormat:
    """A kind and its canonical source text (a schema as compact ASCII JSON, key order kept: it
    is the order properties are written in). `where` names the request field for errors found at compile
    time; it takes no part in equality, so one schema from any field is compiled once."""

    kind: str
    source: str = ""
    where: str = field(default="parameters.response_format", compare=False)

    @property
    def source_field(self) -> str:
        """The field that holds the source, for errors about the source itself (a tool-call grammar's: the tools)."""
        if self.kind not in SOURCE_KEYS:
            return self.where
        if self.kind == "json_schema":
            return f"{self.where}.json_schema.schema"
        key = SOURCE_KEYS[self.kind]
        return f"{self.where}.{key}" if key else self.where


def parse_response_format(value: Any, where: str, max_bytes: int) -> ResponseFormat | None:
    """A checked `ResponseFormat`, or None for `null`; 400 for a wrong shape, 422 over `max_bytes`."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RequestError(f'{where} must be an object such as {{"type": "json_object"}}', where)
    kind = value.get("type")
    if kind not in KINDS:
        raise RequestError(f"{where}.type must be one of {', '.join(KINDS)}, got {kind!r}", f"{where}.type")
    source_key = SOURCE_KEYS[kind]
    allowed = ("type",) if source_key is None else ("type", source_key)
    _reject_unknown(value, allowed, where)
    if source_key is not None and source_key not in value:
        raise RequestError(f"{where}.{source_key} is required when type is {kind!r}", f"{where}.{source_key}")
    if kind == "json_object":
        source = ""
    elif kind == "json_schema":
        source = _schema_source(value["json_schema"], f"{where}.json_schema")
    else:
        source = _text_source(value[source_key], f"{where}.{source_key}")
    spec = ResponseFormat(kind, source, where)
    size = len(source.encode("utf-8"))
    if size > max_bytes:
        raise limit_error(f"{spec.source_field} is {size} bytes, at most {max_bytes} allowed", spec.source_field, max_bytes, size)
    return spec


def _schema_source(value: Any, where: str) -> str:
    if not isinstance(value, dict):
        raise RequestError(f"{where} must be an object with 'name' and 'schema'", where)
    _reject_unknown(value, JSON_SCHEMA_KEYS, where)
    for key in ("name", "description"):
        if key in value and not isinstance(value[key], str):
            raise RequestError(f"{where}.{key} must be a string", f"{where}.{key}")
    if "strict" in value and not isinstance(value["strict"], (bool, type(None))):
        raise RequestError(f"{where}.strict must be true or false", f"{where}.strict")
    if "schema" not in value:
        raise RequestError(f"{where}.schema is required", f"{where}.schema")
    schema = value["schema"]
    if not isinstance(schema, dict):
        raise RequestError(f"{where}.schema must be a JSON Schema object, got {type(schema).__name__}", f"{where}.schema")
    keyword = unfollowed(schema)
    if keyword is not None:
        raise RequestError(
            f"{where}.schema uses {keyword}, which this server cannot enforce while generating",
            f"{where}.schema",
        )
    try:
        return json.dumps(schema, separators=(",", ":"), allow_nan=False)
    except RecursionError as error:
        raise RequestError(f"{where}.schema is nested too deeply", f"{where}.schema") from error
    except ValueError as error:
        raise RequestError(f"{where}.schema is not valid JSON: {error}", f"{where}.schema") from error


def unfollowed(schema: dict) -> str | None:
    """The first keyword (with its JSON pointer) that the compiler would ignore, or None."""
    pending: list[tuple[str, Any]] = [("#", schema)]
    while pending:
        pointer, node = pending.pop()
        if not isinstance(node, dict):
            continue
        for keyword in IGNORED:
            if keyword in node and node[keyword] is not False:
                return f"{keyword!r} at {pointer}"
        if "pattern" in node and ("minLength" in node or "maxLength" in node):
            return f"'pattern' with 'minLength' or 'maxLength' at {pointer} (write the length into the pattern)"
        multiple = node.get("multipleOf")
        if multiple is not None and not (node.get("type") == "integer" and isinstance(multiple, int)):
            return f"'multipleOf' on a non-integer at {pointer}"
        pending += [(f"{pointer}/{key}", node[key]) for key in ONE if key in node]
        for key in MANY:
            if isinstance(node.get(key), list):
                pending += [(f"{pointer}/{key}/{i}", item) for i, item in enumerate(node[key])]
        for key in NAMED:
            if isinstance(node.get(key), dict):
                pending += [(f"{pointer}/{key}/{name}", item) for name, item in node[key].items()]
    return None


def _text_source(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise RequestError(f"{where} must be a string, got {type(value).__name__}", where)
    if not value:
        raise RequestError(f"{where} must not be empty", where)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise RequestError(f"{where} is not valid Unicode: lone surrogate at character {error.start}", where) from error
    return value


def _reject_unknown(value: dict, allowed: tuple[str, ...], where: str) -> None:
    for key in value:
        if key not in allowed:
            raise RequestError(f"unknown field {where}.{key}; allowed: {', '.join(allowed)}", f"{where}.{key}")
