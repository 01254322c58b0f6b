"""Does load at start-up flip `dtype: auto`'s choice? Decide it in fresh processes, one beside a CPU burner.

    python -m bench.dtype_stability [--model-dir models/smollm2] [--starts 3] [--burned 2] [--rows 16]

Each start is a new Python process that loads the model in fp32 and runs the worker's own
probe (`handler.model.dtype_probe.fastest_cpu_dtype`) with no decision cache, so every start
times the candidates itself, at the rows the shipped app probes (`CONTINUOUS_PROBE_ROWS`). The
start numbered `--burned` runs while one busy-looping process per CPU runs beside it. Issue 29
asks that all of them choose the same format. Results: bench/results/dtype-stability.md|json,
with the CPU named.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.report import environment, markdown_table, write_results
from handler.settings import CONTINUOUS_PROBE_ROWS

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def _burn(stop_at: float) -> None:
    while time.monotonic() < stop_at:
        pass


def decide_once(model_dir: Path, rows: int) -> dict:
    """This process's decision: what the worker would choose at a start without a cache."""
    import torch
    from transformers import AutoModelForCausalLM

    from handler.model.dtype_probe import candidate_names, fastest_cpu_dtype
    from handler.model.fusion import fuse_llama_layers

    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # As the worker has it when it probes (handler.model.loading): fused, and with its own candidates.
    fuse_llama_layers(model)
    _, choice = fastest_cpu_dtype(model, rows, names=candidate_names(model))
    return {
        "chosen": choice.name,
        "step_ms": {name: round(seconds * 1000, 2) for name, seconds in choice.step_seconds.items()},
        "probe_s": round(time.perf_counter() - started, 1),
    }


def one_start(model_dir: Path, rows: int, burned: bool) -> dict:
    """A fresh interpreter deciding, with busy loops on every CPU beside it when `burned`."""
    burners: list[multiprocessing.Process] = []
    if burned:
        stop_at = time.monotonic() + 600
        burners = [multiprocessing.Process(target=_burn, args=(stop_at,), daemon=True) for _ in range(os.cpu_count() or 1)]
        for burner in burners:
            burner.start()
    try:
        run = subprocess.run(
            [sys.executable, "-m", "bench.dtype_stability", "--one", "--model-dir", str(model_dir), "--rows", str(rows)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        for burner in burners:
            burner.terminate()
            burner.join()
    return {"beside_cpu_burner": burned, **json.loads(run.stdout.strip().splitlines()[-1])}


def markdown(results: dict) -> str:
    names = sorted({name for start in results["starts"] for name in start["step_ms"]})
    rows = [
        [number, "yes" if start["beside_cpu_burner"] else "no", *(start["step_ms"].get(name) for name in names), start["chosen"]]
        for number, start in enumerate(results["starts"], 1)
    ]
    headers = [
        "start",
        "beside a CPU burner",
        *(f"{name}: best steps, 1 + {results['rows']} rows (ms)" for name in names),
        "chosen",
    ]
    verdict = "the same format at every start" if results["same_choice"] else "different formats: load flipped the choice"
    return "\n".join([
        f"# dtype: auto at {len(rows)} fresh starts, {results['rows']} rows, no decision cache",
        "",
        f"CPU: {results['environment']['cpu']}; load average before the run: {results['environment']['load_average'][0]:.2f}.",
        "",
        markdown_table(headers, rows),
        "",
        f"Verdict: {verdict}.",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "smollm2")
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--burned", type=int, default=2, help="which start (1-based) runs beside the CPU burner")
    parser.add_argument("--rows", type=int, default=CONTINUOUS_PROBE_ROWS)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        sys.stdout.write(json.dumps(decide_once(args.model_dir, args.rows)) + "\n")
        return
    results: dict = {"environment": environment(), "rows": args.rows, "starts": []}
    for number in range(1, args.starts + 1):
        results["starts"].append(one_start(args.model_dir, args.rows, burned=number == args.burned))
    results["same_choice"] = len({start["chosen"] for start in results["starts"]}) == 1
    text = markdown(results)
    write_results(RESULTS, "dtype-stability", text, results)
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
