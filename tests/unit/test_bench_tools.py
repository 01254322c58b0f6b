"""The tool benchmark's requests: the same question with and without a named tool, and its table."""

from __future__ import annotations

import json

from bench.tools import body, markdown

ENTRY = {
    "name": "person",
    "prompt": "Describe a person.",
    "schema": {"type": "object", "properties": {"age": {"type": "integer"}}},
}


def test_a_tool_row_differs_from_its_plain_row_only_by_the_named_tool():
    plain, tools = body("smollm2", ENTRY, 64, tools=False), body("smollm2", ENTRY, 64, tools=True)
    assert plain["stream"] and plain["stream_options"] == {"include_usage": True} and plain["temperature"] == 0
    assert tools.pop("tools") == [{"type": "function", "function": {"name": "person", "parameters": ENTRY["schema"]}}]
    assert tools.pop("tool_choice") == {"type": "function", "function": {"name": "person"}}
    assert tools == plain


def test_the_table_names_the_cpu_and_each_row_kind():
    env = {
        "time_utc": "2026-12-06T18:00:00Z",
        "git_commit": "abc1234",
        "cpu": "Test CPU (avx2)",
        "cpu_count": 2,
        "load_average": [0.5],
    }
    row = {"target": "smollm2-continuous", "concurrency": 16, "ok": 16, "sent": 16, "tokens": 640, "wall_s": 10.0, "tok_s": 64.0}
    text = markdown(
        [{**row, "tools": False, "valid": None, "mean_ttft_s": 0.5}, {**row, "tools": True, "valid": 16, "mean_ttft_s": 0.7}], env
    )
    assert "Test CPU (avx2)" in text and "load 0.5" in text
    assert "| smollm2-continuous | 16 | plain | 16/16 | – |" in text
    assert "| smollm2-continuous | 16 | named tool | 16/16 | 16 |" in text


def test_only_object_schemas_become_tool_parameters():
    from bench.tools import SCHEMAS, tool_schemas

    entries = json.loads(SCHEMAS.read_text())["schemas"]
    kept = tool_schemas(entries)
    assert kept and all(entry["schema"]["type"] == "object" for entry in kept)
    assert {entry["name"] for entry in entries} - {entry["name"] for entry in kept} >= {"top_level_enum", "score_array"}
