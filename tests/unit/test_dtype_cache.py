"""`dtype: auto`'s decision kept per host fingerprint: the key, the file, and a second start that times nothing."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from handler.model.dtype_cache import DecisionCache, cpu_identity, fingerprint_key, host_fingerprint, model_identity
from handler.model.dtype_probe import (
    CACHED,
    PROBED,
    DtypeChoice,
    cpu_snapshot,
    decided_cpu_dtype,
    fastest_cpu_dtype,
    others_share,
)
from handler.settings import DTYPE_CACHE_NAME, HandlerSettings, SettingsError

CPUINFO = """processor\t: 0
model name\t: Example CPU 9000
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile
processor\t: 1
model name\t: Example CPU 9000
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile
"""


def test_the_cpu_is_named_with_the_flags_the_kernels_pick_by(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO)
    assert cpu_identity(cpuinfo) == {"model": "Example CPU 9000", "flags": ["amx_tile", "avx512_bf16", "avx512f", "avx2"]}
    assert cpu_identity(tmp_path / "absent") == {"model": "unknown", "flags": []}


def test_the_model_is_known_by_its_files_not_its_folder(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        folder.mkdir()
        (folder / "config.json").write_text('{"hidden_size": 8}')
        (folder / "model.safetensors").write_bytes(b"x" * 10)
    assert model_identity(first) == model_identity(second)  # another unpacked copy of one archive
    (second / "model.safetensors").write_bytes(b"x" * 11)
    assert model_identity(first) != model_identity(second)


def test_the_key_changes_with_each_part_of_the_fingerprint(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO)
    (tmp_path / "config.json").write_text("{}")
    base = host_fingerprint(tmp_path, 16, ["float32", "bfloat16"], cpuinfo)
    assert fingerprint_key(base) == fingerprint_key(json.loads(json.dumps(base)))  # stable through the file
    assert {"cpu", "cpus_allowed", "torch_threads", "torch", "model", "batch", "candidates"} == set(base)
    assert base["torch"] == torch.__version__ and base["batch"] == 16
    for name, other in [
        ("batch", 1),
        ("torch", "0.0.0"),
        ("cpus_allowed", base["cpus_allowed"] + 1),
        ("torch_threads", base["torch_threads"] + 1),
        ("cpu", {"model": "Example CPU 9000", "flags": ["avx2"]}),
        ("model", "another"),
        ("candidates", ["float32"]),
    ]:
        assert fingerprint_key({**base, name: other}) != fingerprint_key(base), name


def test_the_file_keeps_several_hosts_and_survives_garbage(tmp_path):
    cache = DecisionCache(tmp_path / "sub" / "decisions.json")
    assert cache.get("k1") is None
    cache.put("k1", {"batch": 1}, "bfloat16", {"float32": 0.02, "bfloat16": 0.01})
    cache.put("k2", {"batch": 16}, "float32", {"float32": 0.02, "bfloat16": 0.03})
    assert cache.get("k1")["name"] == "bfloat16" and cache.get("k2")["name"] == "float32"
    assert cache.get("k1")["fingerprint"] == {"batch": 1}
    data = json.loads((tmp_path / "sub" / "decisions.json").read_text())
    data["decisions"]["k2"]["step_seconds"]["float32"] = "fast"
    (tmp_path / "sub" / "decisions.json").write_text(json.dumps(data))
    assert cache.get("k2") is None and cache.get("k1") is not None  # an entry it cannot read is no decision
    (tmp_path / "sub" / "decisions.json").write_text("{half a file")
    assert cache.get("k1") is None
    cache.put("k3", {}, "float32", {"float32": 0.02})  # a broken file is replaced, not a failed start
    assert cache.get("k3")["name"] == "float32"


def count_timings(monkeypatch, fastest: str | None = None, contention: float = 0.0) -> list:
    """Replaces the clock with a counter; `fastest` (a dtype) decodes in 1 ms, the others in 10;
    other processes held `contention` of the CPUs meanwhile."""
    calls = []
    monkeypatch.setattr("handler.model.dtype_probe.others_share", lambda before, after: contention)

    def timed(model, batch, steps):
        calls.append(next(model.parameters()).dtype)
        return 0.001 if fastest and next(model.parameters()).dtype == getattr(torch, fastest) else 0.01

    monkeypatch.setattr("handler.model.dtype_probe.decode_step_seconds", timed)
    return calls


def test_a_second_start_reads_the_decision_and_times_nothing(tiny_model_dir, tmp_path, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cache = DecisionCache(tmp_path / DTYPE_CACHE_NAME)
    fingerprint = host_fingerprint(tiny_model_dir, 2, ["float32", "bfloat16"])
    calls = count_timings(monkeypatch, fastest="bfloat16")
    kept, first = decided_cpu_dtype(model, 2, cache, fingerprint, names=["float32", "bfloat16"])
    assert first.source == PROBED and first.name == "bfloat16" and calls
    calls.clear()
    kept, second = decided_cpu_dtype(model, 2, cache, fingerprint, names=["float32", "bfloat16"])
    assert calls == []  # nothing timed
    assert second.source == CACHED and second.name == "bfloat16" and second.step_seconds == first.step_seconds
    assert next(kept.parameters()).dtype == torch.bfloat16
    other_batch = host_fingerprint(tiny_model_dir, 4, ["float32", "bfloat16"])
    decided_cpu_dtype(model, 4, cache, other_batch, names=["float32", "bfloat16"])
    assert calls  # another fingerprint decides anew


def test_a_kept_decision_this_host_cannot_serve_is_timed_again(tiny_model_dir, tmp_path, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cache = DecisionCache(tmp_path / DTYPE_CACHE_NAME)
    fingerprint = {"any": "thing"}
    cache.put(fingerprint_key(fingerprint), fingerprint, "fp16-dynamic", {"fp16-dynamic": 0.001})
    calls = count_timings(monkeypatch, fastest="float32")
    _, choice = decided_cpu_dtype(model, 1, cache, fingerprint, names=["float32", "bfloat16"])
    assert calls and choice.name == "float32" and choice.source == PROBED


def test_candidates_take_turns_round_after_round(tiny_model_dir, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    calls = count_timings(monkeypatch)
    fastest_cpu_dtype(model, batch=1, rounds=3, min_rounds=3, names=["float32", "bfloat16"])
    a, b = torch.float32, torch.bfloat16
    assert calls == [a, b] + [a, b] * 3  # warm-ups, then A, B, A, B, A, B


def test_each_candidate_is_judged_by_its_best_round(tiny_model_dir, monkeypatch):
    """A burst of load in one round (bf16's first) does not outweigh its quiet rounds, as a median of
    few samples can; fp32, steadily a bit slower than bf16's best, loses."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    times = {torch.float32: iter([1, 0.020, 0.021, 0.022]), torch.bfloat16: iter([1, 0.500, 0.600, 0.015])}
    monkeypatch.setattr(
        "handler.model.dtype_probe.decode_step_seconds", lambda m, batch, steps: next(times[next(m.parameters()).dtype])
    )
    _, choice = fastest_cpu_dtype(model, batch=1, rounds=3, min_rounds=3, names=["float32", "bfloat16"])
    assert choice.name == "bfloat16"
    assert choice.step_seconds == {"float32": 0.020, "bfloat16": 0.015}


def test_the_cache_file_comes_from_the_config_or_the_environment():
    assert HandlerSettings.from_config({}, {}).dtype_cache_file is None
    assert HandlerSettings.from_config({}, {"LLM_RUN_DIR": "/run/ts"}).dtype_cache_file == f"/run/ts/{DTYPE_CACHE_NAME}"
    both = {"LLM_RUN_DIR": "/run/ts", "LLM_CACHE_DIR": "/cache"}
    assert HandlerSettings.from_config({}, both).dtype_cache_file == f"/cache/{DTYPE_CACHE_NAME}"
    named = {"handler": {"dtype_cache_file": "/etc/llm/dtype.json"}}
    assert HandlerSettings.from_config(named, both).dtype_cache_file == "/etc/llm/dtype.json"
    with pytest.raises(SettingsError, match="dtype_cache_file"):
        HandlerSettings.from_config({"handler": {"dtype_cache_file": ""}}, {})


def test_a_choice_reports_its_format_source_and_timings_in_milliseconds():
    choice = DtypeChoice("bfloat16", {"float32": 0.1, "bfloat16": 0.05123}, CACHED, contention=0.05)
    assert choice.report() == {
        "chosen": "bfloat16",
        "source": "cache",
        "decode_step_ms": {"float32": 100.0, "bfloat16": 51.23},
        "contention": 0.05,
    }


def test_load_model_keeps_the_decision_and_reports_it(tiny_model_dir, tmp_path, monkeypatch):
    from handler.model.loading import load_model, measures_dtype

    settings = HandlerSettings(warmup=False, dtype_probe_rows=2, dtype_cache_file=str(tmp_path / DTYPE_CACHE_NAME))
    cpu = torch.device("cpu")
    if not measures_dtype(settings, cpu):
        pytest.skip("this CPU offers fp32 only: nothing to decide")
    calls = count_timings(monkeypatch, fastest="float32")
    first = load_model(tiny_model_dir, settings, cpu).dtype_choice
    assert first.source == PROBED and calls
    calls.clear()
    second = load_model(tiny_model_dir, settings, cpu).dtype_choice
    assert calls == [] and second.source == CACHED and second.name == first.name


def test_a_cache_that_cannot_be_written_does_not_stop_the_start(tmp_path, caplog):
    (tmp_path / "a-file").write_text("")
    cache = DecisionCache(tmp_path / "a-file" / DTYPE_CACHE_NAME)
    with caplog.at_level("WARNING", logger="handler.model.dtype_cache"):
        cache.put("k", {}, "float32", {"float32": 0.01})
    assert "dtype decision not kept" in caplog.text and cache.get("k") is None


def test_a_decision_timed_under_contention_is_timed_again_at_the_next_first_start(tiny_model_dir, tmp_path, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cache = DecisionCache(tmp_path / DTYPE_CACHE_NAME)
    fingerprint = host_fingerprint(tiny_model_dir, 2, ["float32", "bfloat16"])
    names = ["float32", "bfloat16"]
    calls = count_timings(monkeypatch, fastest="bfloat16", contention=0.9)
    _, busy = decided_cpu_dtype(model, 2, cache, fingerprint, names=names)
    assert busy.name == "bfloat16" and busy.provisional
    calls.clear()
    _, healed = decided_cpu_dtype(model, 2, cache, fingerprint, names=names, retime_provisional=False)
    assert calls == [] and healed.source == CACHED and healed.name == "bfloat16"  # a heal reuses it as it is
    calls = count_timings(monkeypatch, fastest="float32", contention=0.05)
    _, quiet = decided_cpu_dtype(model, 2, cache, fingerprint, names=names)
    assert calls and quiet.source == PROBED and quiet.name == "float32" and not quiet.provisional
    calls.clear()
    _, settled = decided_cpu_dtype(model, 2, cache, fingerprint, names=names)
    assert calls == [] and settled.name == "float32" and settled.contention == 0.05


def test_a_busier_retiming_keeps_the_quieter_decision(tiny_model_dir, tmp_path, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cache = DecisionCache(tmp_path / DTYPE_CACHE_NAME)
    fingerprint = {"any": "thing"}
    cache.put(fingerprint_key(fingerprint), fingerprint, "bfloat16", {"float32": 0.01, "bfloat16": 0.005}, contention=0.4)
    calls = count_timings(monkeypatch, fastest="float32", contention=0.8)
    kept, choice = decided_cpu_dtype(model, 1, cache, fingerprint, names=["float32", "bfloat16"])
    assert calls and choice.name == "bfloat16" and choice.source == CACHED and choice.contention == 0.4
    assert next(kept.parameters()).dtype == torch.bfloat16
    assert cache.get(fingerprint_key(fingerprint))["contention"] == 0.4


def test_a_decision_kept_before_contention_was_measured_is_provisional(tmp_path):
    path = tmp_path / DTYPE_CACHE_NAME
    entry = {"fingerprint": {}, "name": "bfloat16", "step_seconds": {"bfloat16": 0.2}, "decided_utc": "2026-12-06T16:26:49Z"}
    path.write_text(json.dumps({"version": 1, "decisions": {"k": entry}}))
    kept = DecisionCache(path).get("k")
    assert kept["contention"] is None
    assert DtypeChoice("bfloat16", {"bfloat16": 0.2}, CACHED, kept["contention"]).provisional


def test_others_share_is_the_hosts_busy_time_less_this_processs_over_the_cpus(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 1000 5 0 0 0 0 0\ncpu0 50 0 25 500 2 0 0 0 0 0\n")
    busy, own, clock = cpu_snapshot(stat)
    assert busy == 150 / os.sysconf("SC_CLK_TCK") and own >= 0 and clock > 0
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert others_share((10.0, 1.0, 100.0), (13.0, 2.0, 102.0)) == 0.5  # 3 s busy, 1 s ours, 2 s x 2 CPUs
    assert others_share((10.0, 1.0, 100.0), (10.5, 2.0, 102.0)) == 0.0
    assert others_share(None, (13.0, 2.0, 102.0)) is None
    assert cpu_snapshot(tmp_path / "absent") is None
