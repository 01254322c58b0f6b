"""llama.cpp's llama-server in the benchmark: how it is built, started and asked."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.llama_server_build import build_dir, cmake_options, host_tag, server_binary
from bench.targets import TargetUnavailable
from bench.targets.llama_server import LlamaServerTarget, server_command
from bench.workloads import BenchRequest


def test_the_build_is_native_with_the_server_and_without_amx_unless_asked():
    options = cmake_options(amx=False)
    assert {"-DLLAMA_BUILD_SERVER=ON", "-DGGML_NATIVE=ON", "-DLLAMA_USE_PREBUILT_UI=OFF"} <= set(options)
    assert "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" in options
    assert not any("amx" in option for option in cmake_options(amx=True))


def test_a_build_is_kept_per_version_and_cpu(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: A\nflags\t\t: avx2\n")
    other = tmp_path / "other"
    other.write_text("model name\t: A\nflags\t\t: avx2 avx512f\n")
    assert host_tag(cpuinfo) != host_tag(other)
    assert server_binary(cache_dir=tmp_path) == build_dir(cache_dir=tmp_path) / "bin" / "llama-server"
    assert build_dir("0.3.36", cache_dir=tmp_path) != build_dir("0.3.36", amx=True, cache_dir=tmp_path)


def test_one_slot_per_user_each_with_its_own_context():
    command = server_command(Path("/b/llama-server"), Path("/m.gguf"), 8080, slots=16, ctx_per_slot=2048, threads=2)
    flags = {flag: command[i + 1] for i, flag in enumerate(command) if flag in ("--parallel", "--ctx-size", "--threads",
             "--threads-batch", "--temp", "--repeat-penalty")}  # fmt: skip
    assert flags["--parallel"] == "16" and flags["--ctx-size"] == str(16 * 2048)
    assert flags["--threads"] == flags["--threads-batch"] == "2"
    assert flags["--temp"] == "0" and flags["--repeat-penalty"] == "1"
    assert "--cont-batching" in command


def test_requests_are_greedy_without_penalties_and_never_end_early(tmp_path):
    target = LlamaServerTarget("llama-server", tmp_path / "none", tmp_path / "m.gguf", 4, tmp_path / "log", threads=2)
    body = target.request_body(BenchRequest(0, "Hi", 32, 0.0))
    assert body["max_tokens"] == 32 and body["ignore_eos"] is True and body["stream"] is True
    assert body["temperature"] == 0 and body["repeat_penalty"] == 1.0 and body["dry_multiplier"] == 0.0
    assert target.describe()["slots"] == 4


def test_a_missing_binary_skips_the_target_with_the_way_to_build_it(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    target = LlamaServerTarget("llama-server", tmp_path / "none", gguf, 1, tmp_path / "log", threads=1)
    with pytest.raises(TargetUnavailable, match="bench.llama_server_build"):
        target.start()
