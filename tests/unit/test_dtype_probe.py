"""dtype auto on CPU: a measured choice between fp32, bf16 and fp16 weights, the others dropped."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from handler.model.dtype_probe import (
    FP16_WEIGHTS,
    DtypeChoice,
    candidate_names,
    decode_step_seconds,
    fastest_cpu_dtype,
    fp16_weights_cpu,
    native_bf16_cpu,
)
from handler.model.quantization import INT4_DYNAMIC, Int4Linear
from tests.support.models import on_4bit_grids, tiny_llama


def test_a_decode_step_is_timed_after_the_prefill(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert decode_step_seconds(model, batch=2, steps=3) > 0


def test_the_choice_keeps_one_model_in_the_chosen_format(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    kept, choice = fastest_cpu_dtype(model, batch=2, steps=2, rounds=1, min_rounds=1, names=["float32", "bfloat16"])
    assert choice.name in ("float32", "bfloat16")
    assert next(kept.parameters()).dtype == choice.dtype
    assert set(choice.step_seconds) == {"float32", "bfloat16"}
    assert choice.name == min(choice.step_seconds, key=choice.step_seconds.get)
    assert next(model.parameters()).dtype == torch.float32  # the fp32 model was never converted in place


def test_fp16_weights_are_a_quantized_copy_with_fp32_activations(tiny_model_dir, monkeypatch):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    # Make fp16 weights the fastest, whatever this machine's load, so that the kept model is that copy.
    monkeypatch.setattr(
        "handler.model.dtype_probe.decode_step_seconds",
        lambda m, batch, steps: 0.001 if any(isinstance(x, DynamicLinear) for x in m.modules()) else 0.01,
    )
    kept, choice = fastest_cpu_dtype(model, batch=2, steps=2, rounds=1, min_rounds=1, names=["float32", FP16_WEIGHTS])
    assert choice.name == FP16_WEIGHTS and choice.dtype == torch.float32
    assert any(isinstance(module, DynamicLinear) for module in kept.modules())
    assert not any(isinstance(module, DynamicLinear) for module in model.modules())  # fp32 left as it was
    ids = torch.tensor([[1, 5, 9]])
    with torch.inference_mode():
        assert kept.generate(input_ids=ids, max_new_tokens=3, min_new_tokens=3, do_sample=False).shape == (1, 6)


def test_the_log_line_names_every_figure():
    line = DtypeChoice(FP16_WEIGHTS, {"float32": 0.02, "bfloat16": 0.015, FP16_WEIGHTS: 0.01}, contention=0.5).describe()
    assert line == (
        "fp16-dynamic (decode steps, one row plus the batch: float32 20.0 ms, bfloat16 15.0 ms, fp16-dynamic 10.0 ms;"
        " other processes' share of the CPUs meanwhile: 50%)"
    )
    assert DtypeChoice("bfloat16", {}).dtype == torch.bfloat16


def test_native_bf16_matches_the_cpu_flags():
    flags = open("/proc/cpuinfo").read().split()
    assert native_bf16_cpu() == ("avx512_bf16" in flags or "amx_tile" in flags)


def test_the_candidates_follow_what_this_cpu_and_torch_offer():
    expected = ["float32"] + (["bfloat16"] if native_bf16_cpu() else []) + ([FP16_WEIGHTS] if fp16_weights_cpu() else [])
    assert candidate_names() == expected
    assert fp16_weights_cpu() == ("fbgemm" in torch.backends.quantized.supported_engines)


def test_int4_weights_are_a_candidate_only_for_a_model_already_on_4bit_grids():
    offered = native_bf16_cpu() and fp16_weights_cpu()
    assert candidate_names(on_4bit_grids(tiny_llama())) == candidate_names() + ([INT4_DYNAMIC] if offered else [])
    assert candidate_names(tiny_llama()) == candidate_names()
    kept, choice = fastest_cpu_dtype(on_4bit_grids(tiny_llama()), batch=2, steps=2, rounds=1, min_rounds=1, names=[INT4_DYNAMIC])
    assert choice.name == INT4_DYNAMIC and choice.dtype == torch.float32
    assert any(isinstance(module, Int4Linear) for module in kept.modules())


def test_a_spent_budget_ends_the_rounds_after_the_least_number(tiny_model_dir, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    calls = []
    monkeypatch.setattr("handler.model.dtype_probe.decode_step_seconds", lambda m, batch, steps: calls.append(steps) or 0.01)
    fastest_cpu_dtype(model, batch=1, steps=3, rounds=5, min_rounds=2, budget_s=0.0, names=["float32", "bfloat16"])
    assert calls == [1, 1, 3, 3, 3, 3]  # two warm-ups, then the two rounds that always run


def test_auto_on_this_cpu_loads_the_timed_choice(tiny_model_dir, caplog):
    from handler.model.loading import load_model, measures_dtype
    from handler.settings import HandlerSettings

    settings = HandlerSettings(warmup=False, dtype_probe_rows=2)
    with caplog.at_level("INFO", logger="handler.model.loading"):
        loaded = load_model(tiny_model_dir, settings, torch.device("cpu"))
    dtype = next(loaded.model.parameters()).dtype
    if measures_dtype(settings, torch.device("cpu")):
        assert "dtype auto on this CPU: " in caplog.text and "(decode steps, one row plus the batch: float32" in caplog.text
        chosen = caplog.text.split("dtype auto on this CPU: ")[1].split(" ")[0]
        assert chosen in candidate_names()
        assert dtype == DtypeChoice(chosen, {}).dtype
    else:
        assert dtype == torch.float32


def test_a_named_dtype_is_never_timed(tiny_model_dir):
    from handler.model.loading import measures_dtype
    from handler.settings import HandlerSettings

    cpu = torch.device("cpu")
    assert not measures_dtype(HandlerSettings(dtype="float32"), cpu)
    assert not measures_dtype(HandlerSettings(quantization="fp16-dynamic"), cpu)
    assert not measures_dtype(HandlerSettings(), torch.device("cuda", 0))


def test_the_decision_is_reported_as_one_metric_per_candidate():
    from handler.metrics import DTYPE_METRIC, UNITS, dtype_metric_values

    values = dtype_metric_values(DtypeChoice("bfloat16", {"float32": 0.02, "bfloat16": 0.01}, "cache"))
    assert values == [
        (20.0, {"Dtype": "float32", "Chosen": "false", "Source": "cache"}),
        (10.0, {"Dtype": "bfloat16", "Chosen": "true", "Source": "cache"}),
    ]
    assert DTYPE_METRIC[0] in UNITS
