"""The grammar compiler's own process, so a compile can be stopped at its time and memory limits.

xgrammar compiles in C++ and cannot be interrupted, and a hostile schema (nested repetition,
huge bounds) can take minutes and gigabytes. Run here, a compile that overruns is killed
without touching the TorchServe worker or the requests it is generating. `grammars.Grammars`
starts this file as a script (it imports nothing from `handler`, so it runs from wherever
the handler was unpacked) and speaks to it over two pipes: it sends the tokenizer's
vocabulary once, then one request per compile, each answered with the serialized grammar or
the compiler's error.
"""

from __future__ import annotations

import json
import re
import resource
import sys
from multiprocessing.connection import Connection
from typing import Any

# xgrammar's errors start with a timestamp, its C++ source file and line, and a check's text.
NOISE = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: |Check failed: \(.*?\) is false: ")
OUT_OF_MEMORY = ("bad_alloc", "MemoryError", "Cannot allocate memory")


def clean(message: str) -> str:
    return NOISE.sub("", message).strip()


def compile_source(compiler, kind: str, source: str):
    if kind == "json_object":
        return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
    if kind == "json_schema":
        return compiler.compile_json_schema(source, any_whitespace=False)
    if kind == "regex":
        return compiler.compile_regex(source)
    if kind == "grammar":
        return compiler.compile_grammar(source)
    if kind == "tool_calls":  # a structural tag (handler.structured.tools)
        return compiler.compile_structural_tag(json.dumps(compact_arguments(json.loads(source))))
    raise ValueError(f"unknown kind {kind!r}")


def compact_arguments(tag: Any) -> Any:
    """The tag with each `json_schema` content replaced by its grammar as compact JSON (`,` and `:`, no
    whitespace between tokens). A structural tag's own `json_schema` content lets whitespace in
    everywhere (`max_whitespace_cnt` must be at least 1), and a small model spends its tokens on it:
    a call to a one-string tool ran out of 40 tokens. Converted here, in the child, because a schema's
    conversion can be as costly as its compile."""
    import xgrammar

    if isinstance(tag, list):
        return [compact_arguments(item) for item in tag]
    if not isinstance(tag, dict):
        return tag
    if tag.get("type") == "json_schema":
        schema = json.dumps(tag["json_schema"])
        grammar = xgrammar.Grammar.from_json_schema(schema, any_whitespace=False, separators=(",", ":"))
        return {"type": "grammar", "grammar": str(grammar)}
    return {key: compact_arguments(value) for key, value in tag.items()}


def answer(compiler, request: dict) -> dict:
    try:
        grammar = compile_source(compiler, request["kind"], request["source"])
        return {"grammar": grammar.serialize_json()}
    except MemoryError:
        return {"out_of_memory": True}
    except (RuntimeError, ValueError, TypeError) as error:
        message = clean(str(error))
        if any(mark in message for mark in OUT_OF_MEMORY):
            return {"out_of_memory": True}
        return {"error": message}


def limit_memory(extra_mb: int) -> None:
    """Address space: what the imports took, plus the compile budget."""
    with open("/proc/self/status") as status:
        used_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    limit = used_kb * 1024 + extra_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def main(argv: list[str]) -> None:
    requests = Connection(int(argv[0]), writable=False)
    replies = Connection(int(argv[1]), readable=False)
    memory_mb, threads = int(argv[2]), int(argv[3])
    import xgrammar

    info = xgrammar.TokenizerInfo.deserialize_json(requests.recv_bytes().decode("utf-8"))
    compiler = xgrammar.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
    limit_memory(memory_mb)
    replies.send_bytes(b'{"ready": true}')
    while True:
        try:
            request = json.loads(requests.recv_bytes())
        except EOFError:
            return
        replies.send_bytes(json.dumps(answer(compiler, request)).encode("utf-8"))


if __name__ == "__main__":
    main(sys.argv[1:])
