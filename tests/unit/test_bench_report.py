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
