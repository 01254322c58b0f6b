"""Structured output benchmark: compile time per schema, and tokens/s constrained against unconstrained.

    python -m bench.structured                   # compile figures, then both batching paths, started here
    python -m bench.structured --compile-only
    python -m bench.structured --server-url dynamic=http://127.0.0.1:7080/predictions/smollm2

Compile: every schema of tests/support/structured_schemas.json through `handler.structured.grammars`
(the child process, started beforehand, plus the transfer back), cold and then cached, and
xgrammar's own compile in this process for comparison. Serving: the same chat prompts, greedy,
sent `--requests` at a time with at most `concurrency` in flight, once with their schema as
`response_format` and once without; tok/s is generated tokens (from `details`) over the wall
time. Constrained answers end when their JSON does, so they are shorter: compare tok/s, not
wall time. Writes bench/results/structured.md|json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema

from bench.report import environment, markdown_table, write_results

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "tests" / "support" / "structured_schemas.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.structured", description=__doc__.split("\n\n")[0])
    parser.add_argument("--app", default="smollm2")
    parser.add_argument("--server-url", action="append", default=None, metavar="LABEL=URL")
    parser.add_argument("--requests", type=int, default=16, help="requests per measurement (default 16)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--compile-only", action="store_true")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    return parser.parse_args(argv)


def compile_figures(app: str, schemas: list[dict]) -> list[dict]:
    import xgrammar
    from transformers import AutoConfig, AutoTokenizer

    from handler.response_format import parse_response_format
    from handler.settings import StructuredOutputSettings
    from handler.structured.grammars import Grammars, tokenizer_info

    model_dir = ROOT / "models" / app
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    info = tokenizer_info(tokenizer, AutoConfig.from_pretrained(model_dir).vocab_size, [tokenizer.eos_token_id])
    grammars = Grammars(info, StructuredOutputSettings())
    grammars.start()
    in_process = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    rows = []
    try:
        for entry in schemas:
            value = {"type": "json_schema", "json_schema": {"name": entry["name"], "schema": entry["schema"]}}
            spec = parse_response_format(value, "response_format", 1 << 20)
            started = time.perf_counter()
            grammars.compile(spec)
            cold = time.perf_counter() - started
            started = time.perf_counter()
            grammars.compile(spec)
            cached = time.perf_counter() - started
            started = time.perf_counter()
            in_process.compile_json_schema(spec.source, any_whitespace=False)
            local = time.perf_counter() - started
            times = {"cold_ms": cold * 1000, "cached_ms": cached * 1000, "xgrammar_ms": local * 1000}
            rows.append({"schema": entry["name"], **times})
    finally:
        grammars.close()
    return rows


def body(entry: dict, max_new_tokens: int, constrained: bool) -> dict:
    parameters = {"max_new_tokens": max_new_tokens, "temperature": 0, "details": True, "repetition_penalty": 1.0}
    if constrained:
        parameters["response_format"] = {
            "type": "json_schema", "json_schema": {"name": entry["name"], "schema": entry["schema"]},
        }  # fmt: skip
    return {"instances": [{"messages": [{"role": "user", "content": entry["prompt"]}]}], "parameters": parameters}


def serve_figures(urls: dict[str, str], schemas: list[dict], args: argparse.Namespace) -> list[dict]:
    from bench.launcher import post

    rows = []
    entries = [schemas[i % len(schemas)] for i in range(args.requests)]
    for label, url in urls.items():
        post(url, body(entries[0], 4, True), timeout=600)
        for concurrency in args.concurrency:
            for constrained in (False, True):

                def send(entry: dict, url: str = url, constrained: bool = constrained) -> tuple[int, int, bool]:
                    status, answer = post(url, body(entry, args.max_new_tokens, constrained), timeout=1800)
                    if status != 200:
                        return status, 0, False
                    prediction = answer["predictions"][0]
                    valid = True
                    if constrained:
                        try:
                            jsonschema.validate(json.loads(prediction["generated_text"]), entry["schema"])
                        except (ValueError, jsonschema.ValidationError):
                            valid = False
                    return status, prediction["generated_tokens"], valid

                started = time.perf_counter()
                with ThreadPoolExecutor(max_workers=concurrency) as pool:
                    results = list(pool.map(send, entries))
                wall = time.perf_counter() - started
                tokens = sum(tokens for _, tokens, _ in results)
                rows.append({
                    "target": label, "concurrency": concurrency, "constrained": constrained,
                    "ok": sum(status == 200 for status, _, _ in results), "sent": len(results),
                    "valid": sum(valid for status, _, valid in results if status == 200) if constrained else None,
                    "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
                })  # fmt: skip
    return rows


def markdown(compiles: list[dict], serving: list[dict], env: dict) -> str:
    lines = ["# Structured output benchmark", "", f"{env['time_utc']}, commit {env['git_commit']}, "
             f"{env['cpu_count']} CPUs, load {env['load_average'][0]:.1f}", ""]  # fmt: skip
    if compiles:
        cold = [row["cold_ms"] for row in compiles]
        cached = [row["cached_ms"] for row in compiles]
        local = [row["xgrammar_ms"] for row in compiles]
        lines += [
            f"## Compile time, {len(compiles)} schemas (ms)", "",
            markdown_table(
                ["", "median", "max"],
                [
                    ["cold, through the compiler process", statistics.median(cold), max(cold)],
                    ["cached", statistics.median(cached), max(cached)],
                    ["xgrammar in-process, for comparison", statistics.median(local), max(local)],
                ],
            ),
            "",
            markdown_table(["schema", "cold ms", "cached ms", "xgrammar ms"],
                           [[r["schema"], r["cold_ms"], r["cached_ms"], r["xgrammar_ms"]] for r in compiles]),
            "",
        ]  # fmt: skip
    if serving:
        lines += [
            "## Serving, greedy, tokens/s", "",
            markdown_table(
                ["target", "conc.", "response_format", "ok/sent", "valid", "tokens", "wall s", "tok/s"],
                [[r["target"], r["concurrency"], "json_schema" if r["constrained"] else "none", f"{r['ok']}/{r['sent']}",
                  r["valid"], r["tokens"], r["wall_s"], r["tok_s"]] for r in serving],
            ),
        ]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    schemas = json.loads(SCHEMAS.read_text())["schemas"]
    env = environment()
    compiles = compile_figures(args.app, schemas)
    serving: list[dict] = []
    if not args.compile_only:
        if args.server_url:
            urls = dict(item.split("=", 1) for item in args.server_url)
            serving = serve_figures(urls, schemas, args)
        else:
            from bench.launcher import serving_both_paths

            with tempfile.TemporaryDirectory(prefix="bench-structured-") as workdir:
                with serving_both_paths(args.app, Path(workdir), batch_size=16) as labelled:
                    urls = dict(item.split("=", 1) for item in labelled)
                    serving = serve_figures(urls, schemas, args)
    text = markdown(compiles, serving, env)
    write_results(args.results_dir, "structured", text, {"environment": env, "compile": compiles, "serving": serving})
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
