"""bench.report's description of the CPU, which every results file carries in its header."""

from __future__ import annotations

from bench.report import cpu_description

CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
"""


def test_the_cpu_is_named_with_the_instruction_sets_kernels_choose_by(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO)
    assert cpu_description(cpuinfo) == "Intel(R) Xeon(R) Platinum 8480+ (amx_bf16, amx_int8, avx512_bf16, avx512f, avx2)"


def test_a_cpu_without_any_of_them_says_so(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Old CPU\nflags\t\t: fpu sse2\n")
    assert cpu_description(cpuinfo).startswith("Old CPU (none of amx_bf16")


def test_a_host_without_proc_cpuinfo_still_gets_a_description(tmp_path):
    assert cpu_description(tmp_path / "missing")


def run_record(workload: str, concurrency: int, target: str, tok_s: float, latency: float, ttft: float) -> dict:
    summary = {
        "requests": 4, "failed": 0, "short": 0, "generated_tokens": 100, "tokens_per_s": tok_s, "wall_s": 1.0,
        "ttft_p50_s": ttft, "ttft_p95_s": ttft, "ttft_mean_s": ttft, "latency_p50_s": latency,
        "latency_p95_s": latency, "latency_mean_s": latency, "queued_mean_s": 0.0, "errors": [],
    }  # fmt: skip
    return {"repeat": 0, "workload": workload, "concurrency": concurrency, "target": target, "summary": summary}


RUNS = [
    run_record("uniform", 16, "continuous", 300.0, 2.0, 0.5),
    run_record("uniform", 16, "llama-server", 200.0, 3.0, 0.4),
    run_record("uniform", 1, "continuous", 40.0, 1.6, 0.1),
    run_record("uniform", 1, "llama-server", 100.0, 0.6, 0.05),
    run_record("prefill", 1, "continuous", 1.0, 4.0, 4.0),
    run_record("prefill", 1, "llama-server", 1.0, 9.0, 9.0),
    run_record("shared-prefix", 1, "continuous", 50.0, 1.0, 0.3),
    run_record("shared-prefix", 8, "continuous", 50.0, 3.0, 1.2),
    run_record("shared-prefix", 8, "llama-server", 50.0, 2.0, 1.0),
]


def test_the_table_has_a_mean_time_to_first_token_and_a_mean_latency():
    from argparse import Namespace

    from bench.run import COLUMNS, render
    from bench.workloads import prefill

    assert {"TTFT mean", "lat. mean"} <= set(COLUMNS)
    table = render([prefill(1, 10, 4, 0)], RUNS, {}, Namespace(repeats=1, shipped="continuous"))
    header = next(line for line in table.splitlines() if line.startswith("| workload"))
    row = next(line for line in table.splitlines() if line.startswith("| prefill | 1 | llama-server"))
    cells = dict(zip(header.strip("|").split(" | "), row.strip("|").split(" | ")))
    assert cells["TTFT mean"].strip() == "9.00" and cells["lat. mean"].strip() == "9.00"


def test_the_verdicts_are_issue_29s_against_llama_server():
    from bench.run import verdicts

    lines = verdicts(RUNS, "continuous")
    by_start = {line.split(":")[0]: line for line in lines}
    assert by_start["uniform, c=16, tok/s, continuous against llama-server"].endswith("(1.50x, target 1.2x): met")
    assert by_start["uniform, c=16, mean latency, continuous against llama-server"].endswith("met")
    assert "missed by 20%" in by_start["uniform, c=1, tok/s, continuous against llama-server"]  # 40 < 0.5 x 100
    assert by_start["prefill, c=1, mean time to first token, continuous against llama-server"].endswith("(target <= 0.6x): met")
    assert "missed by 20%" in by_start["shared-prefix, c=8, mean time to first token, continuous against llama-server"]
    assert "mixed, c=16, tok/s, continuous against llama-server" not in by_start  # not run: no verdict
