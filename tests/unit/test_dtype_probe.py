"""dtype auto on CPU: a measured choice between fp32 and bf16, the loser dropped."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from handler.dtype_probe import DtypeChoice, decode_step_seconds, fastest_cpu_dtype, native_bf16_cpu


def test_a_decode_step_is_timed_after_the_prefill(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert decode_step_seconds(model, batch=2, steps=3) > 0


def test_the_choice_keeps_one_model_in_the_chosen_dtype(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    kept, choice = fastest_cpu_dtype(model, batch=2, steps=2, rounds=1)
    assert choice.dtype in (torch.float32, torch.bfloat16)
    assert next(kept.parameters()).dtype == choice.dtype
    assert set(choice.step_seconds) == {"float32", "bfloat16"}
    assert choice.dtype == getattr(torch, min(choice.step_seconds, key=choice.step_seconds.get))
    assert next(model.parameters()).dtype == torch.float32  # the fp32 model was never converted in place


def test_the_log_line_names_both_figures():
    line = DtypeChoice(torch.bfloat16, {"float32": 0.02, "bfloat16": 0.01}).describe()
    assert line == "bfloat16 (decode step: float32 20.0 ms, bfloat16 10.0 ms)"


def test_native_bf16_matches_the_cpu_flags():
    flags = open("/proc/cpuinfo").read().split()
    assert native_bf16_cpu() == ("avx512_bf16" in flags or "amx_tile" in flags)


def test_a_spent_budget_ends_the_rounds_after_the_first(tiny_model_dir, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    calls = []
    monkeypatch.setattr("handler.dtype_probe.decode_step_seconds", lambda m, batch, steps: calls.append(steps) or 0.01)
    fastest_cpu_dtype(model, batch=1, steps=3, rounds=5, budget_s=0.0)
    assert calls == [1, 1, 3, 3]  # two warm-ups, then one timed round of each dtype


def test_auto_on_this_cpu_loads_the_timed_choice(tiny_model_dir, caplog):
    from handler.loading import load_model, measures_dtype
    from handler.settings import HandlerSettings

    settings = HandlerSettings(warmup=False, dtype_probe_rows=2)
    with caplog.at_level("INFO", logger="handler.loading"):
        loaded = load_model(tiny_model_dir, settings, torch.device("cpu"))
    dtype = next(loaded.model.parameters()).dtype
    if measures_dtype(settings, torch.device("cpu")):
        assert f"dtype auto on this CPU: {str(dtype).removeprefix('torch.')} (decode step: float32" in caplog.text
    else:
        assert dtype == torch.float32


def test_a_named_dtype_is_never_timed(tiny_model_dir):
    from handler.loading import measures_dtype
    from handler.settings import HandlerSettings

    cpu = torch.device("cpu")
    assert not measures_dtype(HandlerSettings(dtype="float32"), cpu)
    assert not measures_dtype(HandlerSettings(quantization="fp16-dynamic"), cpu)
    assert not measures_dtype(HandlerSettings(), torch.device("cuda", 0))
