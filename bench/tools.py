"""Tool calling's cost: tokens/s and time to first token of tool-call rows against plain rows, at 1 and 16 users.

    python -m bench.tools                                   # both batching paths, started here
    python -m bench.tools --server URL=MODEL                # a running front, e.g. http://127.0.0.1:7080=smollm2

Every request is an OpenAI chat completion through the front, greedy, streamed with
`stream_options.include_usage`. A tool row names one tool, whose parameters are a schema of
tests/support/structured_schemas.json (nested objects, enums, arrays, bounds), as its
`tool_choice`, so its arguments are generated under that schema's grammar; a plain row asks the
same question with no tools. `--requests` of each kind are sent with at most `concurrency` in
flight; tok/s is the completion tokens (from `usage`) over the wall time, time to first token the
mean from sending to the first piece of text or of a call. Tool arguments are parsed and checked
against their schema with `jsonschema`. Writes bench/results/tools.md|json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema

from bench.report import environment, markdown_table, write_results

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "tests" / "support" / "structured_schemas.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.tools", description=__doc__.split("\n\n")[0])
    parser.add_argument("--app", default="smollm2")
    parser.add_argument("--server", action="append", default=None, metavar="BASE_URL=MODEL")
    parser.add_argument("--requests", type=int, default=16, help="requests per measurement (default 16)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--max-tokens", type=int, default=128, help="enough for the longest call of the schemas (default 128)")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    return parser.parse_args(argv)


def body(model: str, entry: dict, max_tokens: int, tools: bool) -> dict:
    request: dict = {
        "model": model,
        "messages": [{"role": "user", "content": entry["prompt"]}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if tools:
        request["tools"] = [{"type": "function", "function": {"name": entry["name"], "parameters": entry["schema"]}}]
        request["tool_choice"] = {"type": "function", "function": {"name": entry["name"]}}
    return request


def one(client: httpx.Client, base_url: str, request: dict, entry: dict) -> dict:
    """Status, completion tokens, seconds to the first piece, and whether a call's arguments validate."""
    started = time.perf_counter()
    first = None
    tokens = 0
    arguments = ""
    with client.stream("POST", f"{base_url}/v1/chat/completions", json=request) as response:
        if response.status_code != 200:
            response.read()
            return {"status": response.status_code, "tokens": 0, "ttft_s": None, "valid": False}
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                delta = choice.get("delta", {})
                calls = delta.get("tool_calls") or []
                arguments += "".join(call.get("function", {}).get("arguments") or "" for call in calls)
                if first is None and (delta.get("content") or calls):
                    first = time.perf_counter() - started
    valid = None
    if "tools" in request:
        try:
            jsonschema.validate(json.loads(arguments), entry["schema"])
            valid = True
        except (ValueError, jsonschema.ValidationError):
            valid = False
    return {"status": 200, "tokens": tokens, "ttft_s": first, "valid": valid}


def measure(servers: dict[str, tuple[str, str]], schemas: list[dict], args: argparse.Namespace) -> list[dict]:
    rows = []
    entries = [schemas[i % len(schemas)] for i in range(args.requests)]
    with httpx.Client(timeout=1800) as client:
        for label, (base_url, model) in servers.items():
            one(client, base_url, body(model, entries[0], 4, True), entries[0])  # compile and warm once
            for concurrency in args.concurrency:
                for tools in (False, True):

                    def send(entry: dict, base_url: str = base_url, model: str = model, tools: bool = tools) -> dict:
                        return one(client, base_url, body(model, entry, args.max_tokens, tools), entry)

                    started = time.perf_counter()
                    with ThreadPoolExecutor(max_workers=concurrency) as pool:
                        results = list(pool.map(send, entries))
                    wall = time.perf_counter() - started
                    answered = [r for r in results if r["status"] == 200]
                    firsts = [r["ttft_s"] for r in answered if r["ttft_s"] is not None]
                    rows.append({
                        "target": label, "concurrency": concurrency, "tools": tools,
                        "ok": len(answered), "sent": len(results),
                        "valid": sum(bool(r["valid"]) for r in answered) if tools else None,
                        "tokens": sum(r["tokens"] for r in answered), "wall_s": wall,
                        "tok_s": sum(r["tokens"] for r in answered) / wall,
                        "mean_ttft_s": statistics.mean(firsts) if firsts else None,
                    })  # fmt: skip
    return rows


def markdown(rows: list[dict], env: dict) -> str:
    header = (
        f"{env['time_utc']}, commit {env['git_commit']}, {env['cpu']}, {env['cpu_count']} CPUs, load {env['load_average'][0]:.1f}"
    )
    table = markdown_table(
        ["target", "users", "rows", "ok/sent", "valid calls", "tokens", "wall s", "tok/s", "mean TTFT s"],
        [
            [r["target"], r["concurrency"], "named tool" if r["tools"] else "plain", f"{r['ok']}/{r['sent']}",
             r["valid"], r["tokens"], r["wall_s"], r["tok_s"], r["mean_ttft_s"]]
            for r in rows
        ],
    )  # fmt: skip
    return "\n".join(["# Tool calling against plain chat", "", header, "", table])


def tool_schemas(entries: list[dict]) -> list[dict]:
    """The entries whose schema can be a tool's parameters: OpenAI's tools take an object schema
    (the server refuses others with a 400, which is not what this measures)."""
    return [entry for entry in entries if entry["schema"].get("type") == "object"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    schemas = tool_schemas(json.loads(SCHEMAS.read_text())["schemas"])
    env = environment()
    if args.server:
        servers = {}
        for item in args.server:
            base_url, model = item.rsplit("=", 1)
            servers[model] = (base_url, model)
        rows = measure(servers, schemas, args)
    else:
        from bench.launcher import serving_both_paths

        with tempfile.TemporaryDirectory(prefix="bench-tools-") as workdir:
            with serving_both_paths(args.app, Path(workdir), batch_size=16) as labelled:
                servers = {}
                for item in labelled:
                    label, url = item.split("=", 1)
                    base_url, model = url.split("/predictions/")
                    servers[label] = (base_url, model)
                rows = measure(servers, schemas, args)
    text = markdown(rows, env)
    write_results(args.results_dir, "tools", text, {"environment": env, "rows": rows})
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
