"""handler.model.quantization on the tiny random Llama of tests.support.models: what each method replaces, and that it still generates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from handler.model.quantization import (
    INT4_DYNAMIC,
    METHODS,
    OUTPUT_FP16_MAX_ROWS,
    Int4Linear,
    QuantizationError,
    holds_4bit_weights,
    quantize_for_cpu,
)
from tests.support.models import TOKENS, on_4bit_grids, tiny_llama


def logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=TOKENS).logits.float()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_none_returns_the_model_untouched():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert quantize_for_cpu(model, "none") is model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unknown_method_names_the_choices():
    with pytest.raises(QuantizationError, match="int8-dynamic"):
        quantize_for_cpu(tiny_llama(), "int4-magic")


def test_every_configurable_method_is_implemented():
    from handler.settings import QUANTIZATIONS

    assert set(QUANTIZATIONS) <= set(METHODS)


@pytest.mark.parametrize("method", ["int8-dynamic", "fp16-dynamic"])
def test_dynamic_methods_replace_every_linear_including_lm_head(method):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    model = quantize_for_cpu(tiny_llama(), method)
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert isinstance(model.lm_head, DynamicLinear)
    assert isinstance(model.model.layers[0].mlp.down_proj, DynamicLinear)
    expected = torch.qint8 if method == "int8-dynamic" else torch.float16
    assert model.lm_head._packed_params.dtype == expected


def test_fp16_dynamic_is_torchs_quantize_dynamic_built_faster():
    """The same modules, sizes and packed weights as torch's own, so the same logits to the bit."""
    from torch.ao.quantization import quantize_dynamic

    ours = quantize_for_cpu(tiny_llama(), "fp16-dynamic")
    torchs = quantize_dynamic(tiny_llama(), {nn.Linear}, dtype=torch.float16)
    assert str(ours) == str(torchs)
    assert torch.equal(logits(ours), logits(torchs))


@pytest.mark.parametrize("method, bound", [("int8-dynamic", 0.1), ("fp16-dynamic", 0.01)])
def test_dynamic_methods_stay_close_to_fp32_and_generate(method, bound):
    reference = logits(tiny_llama())
    model = quantize_for_cpu(tiny_llama(), method)
    assert relative_error(logits(model), reference) < bound
    with torch.inference_mode():
        out = model.generate(input_ids=TOKENS, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, TOKENS.shape[1] + 4)


@pytest.mark.parametrize("method", ["int8-dynamic", "fp16-dynamic"])
def test_dynamic_methods_need_float32(method):
    with pytest.raises(QuantizationError, match="float32"):
        quantize_for_cpu(tiny_llama(torch.bfloat16), method)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_weight_only_stores_int8_and_stays_close(dtype):
    pytest.importorskip("torchao")
    reference = logits(tiny_llama(dtype))
    model = quantize_for_cpu(tiny_llama(dtype), "int8-weight-only")
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert getattr(weight, "qdata", None) is not None and weight.qdata.dtype == torch.int8
    assert relative_error(logits(model), reference) < 0.1
    with torch.inference_mode():
        out = model.generate(input_ids=TOKENS, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, TOKENS.shape[1] + 4)


def test_refuses_a_model_that_is_not_on_the_cpu():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(QuantizationError, match="CPU"):
        quantize_for_cpu(model, "int8-dynamic")


def test_refuses_a_model_without_linear_layers():
    with pytest.raises(QuantizationError, match="no nn.Linear"):
        quantize_for_cpu(nn.Sequential(nn.Embedding(8, 4)), "int8-dynamic")


@pytest.mark.parametrize("method", ["fp16-dynamic", "int8-weight-only", INT4_DYNAMIC])
def test_a_rows_logits_do_not_depend_on_its_batch_neighbour(method):
    """For `int4-dynamic`, within its narrow calls: it sends calls of more rows than its limits
    (`INT4_MAX_ROWS`, `OUTPUT_FP16_MAX_ROWS`) to 16-bit weights, by design."""
    if method == "int8-weight-only":
        pytest.importorskip("torchao")
    model = quantize_for_cpu(on_4bit_grids(tiny_llama()), method)
    tokens = TOKENS[:, : OUTPUT_FP16_MAX_ROWS // 2] if method == INT4_DYNAMIC else TOKENS
    neighbour = torch.tensor([[100, 90, 80, 70, 60, 50, 40, 30]])[:, : tokens.shape[1]]
    with torch.inference_mode():
        alone = model(input_ids=tokens).logits[0]
        batched = model(input_ids=torch.cat([tokens, neighbour])).logits[0]
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)


def test_int4_weight_only_packs_every_fitting_projection_and_stays_close_to_bf16():
    reference = logits(tiny_llama(torch.bfloat16))
    model = quantize_for_cpu(tiny_llama(torch.bfloat16), "int4-weight-only")
    kinds = {type(m.weight).__name__ for m in model.model.modules() if isinstance(m, nn.Linear)}
    assert kinds == {"Int4OpaqueTensor"}, "every projection (input sizes 64 and 128)"
    assert type(model.lm_head.weight) is nn.Parameter and model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16, "the tied input embedding keeps its copy"
    assert relative_error(logits(model), reference) < 0.2
    with torch.inference_mode():
        out = model.generate(input_ids=TOKENS, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, TOKENS.shape[1] + 4)


def test_int4_weight_only_for_a_compiled_model_makes_the_output_projection_int8():
    reference = logits(tiny_llama(torch.bfloat16))
    model = quantize_for_cpu(tiny_llama(torch.bfloat16), "int4-weight-only", compiled=True)
    assert type(model.lm_head.weight).__name__ == "Int8Tensor"
    assert type(model.model.layers[0].mlp.up_proj.weight).__name__ == "Int4OpaqueTensor"
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16, "the tied input embedding keeps its copy"
    assert relative_error(logits(model), reference) < 0.2


def test_int4_weight_only_needs_bfloat16():
    with pytest.raises(QuantizationError, match="handler.dtype: bfloat16"):
        quantize_for_cpu(tiny_llama(torch.float32), "int4-weight-only")


def test_int4_weight_only_names_the_layers_the_group_size_does_not_fit(caplog):
    model = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 8)).to(torch.bfloat16)
    with caplog.at_level("WARNING", logger="handler.model.quantization"):
        quantize_for_cpu(model, "int4-weight-only")
    assert type(model[1].weight) is nn.Parameter and model[1].weight.dtype == torch.bfloat16
    assert type(model[0].weight).__name__ == "Int4OpaqueTensor"
    assert "keeps 1 linear layers in bf16" in caplog.text and ": 1" in caplog.text


def test_int4_weight_only_refuses_a_model_it_fits_nowhere():
    with pytest.raises(QuantizationError, match="multiple of 32"):
        quantize_for_cpu(nn.Sequential(nn.Linear(48, 64)).to(torch.bfloat16), "int4-weight-only")


def test_holds_4bit_weights_tells_grid_weights_from_others():
    assert holds_4bit_weights(on_4bit_grids(tiny_llama()))
    assert not holds_4bit_weights(tiny_llama()), "random fp32 weights take far more than 16 values per group"


def test_int4_dynamic_packs_the_layers_keeps_fp32_activations_and_stays_close():
    reference = logits(on_4bit_grids(tiny_llama()))
    model = quantize_for_cpu(on_4bit_grids(tiny_llama()), INT4_DYNAMIC)
    layer = model.model.layers[0]
    packed = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.o_proj, layer.mlp.down_proj]
    assert all(isinstance(module, Int4Linear) for module in packed)
    fp16_output = getattr(model.lm_head, "narrow", model.lm_head)  # with a bf16 copy for wide calls, where native
    assert type(fp16_output).__name__ == "Linear" and fp16_output._packed_params.dtype == torch.float16
    assert model.model.embed_tokens.weight.dtype == torch.float32
    quantized = logits(model)
    assert quantized.dtype == torch.float32
    # Only the activations' bf16 rounding on the way into each matmul, and the bf16 scales, differ.
    assert relative_error(quantized, reference) < 0.02
    with torch.inference_mode():
        out = model.generate(input_ids=TOKENS, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, TOKENS.shape[1] + 4)


def test_int4_linear_reads_its_grid_weights_back():
    linear = on_4bit_grids(nn.Sequential(nn.Linear(64, 32)))[0]
    packed = Int4Linear(linear)
    inputs = torch.randn(3, 5, 64).to(torch.bfloat16).float()  # what the kernel sees, so only the scales round
    with torch.inference_mode():
        torch.testing.assert_close(packed(inputs), linear(inputs), rtol=0.02, atol=0.02)
    assert packed(inputs).shape == (3, 5, 32)


def test_int4_dynamic_needs_float32_and_a_fitting_layer():
    with pytest.raises(QuantizationError, match="float32"):
        quantize_for_cpu(tiny_llama(torch.bfloat16), INT4_DYNAMIC)
    with pytest.raises(QuantizationError, match="fits no linear layer"):
        quantize_for_cpu(nn.Sequential(nn.Linear(48, 64)), INT4_DYNAMIC)


@pytest.mark.parametrize("native_bf16", [True, False])
def test_int4_dynamic_hands_calls_of_many_rows_to_its_16_bit_weights(native_bf16, monkeypatch):
    """bf16 weights where the CPU computes in bf16 (oneDNN), else fp16 ones (fbgemm); the same product either way."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from handler.model.quantization import INT4_MAX_ROWS, Bf16Linear

    monkeypatch.setattr("handler.model.quantization.native_bf16_cpu", lambda: native_bf16)
    linear = on_4bit_grids(nn.Sequential(nn.Linear(64, 32)))[0]
    model = quantize_for_cpu(nn.Sequential(linear, nn.Linear(32, 8)), INT4_DYNAMIC)
    packed = model[0]
    assert isinstance(packed, Int4Linear)
    if native_bf16:
        assert isinstance(packed.wide, Bf16Linear) and packed.wide.weight.dtype == torch.bfloat16
    else:
        assert isinstance(packed.wide, DynamicLinear) and packed.wide._packed_params.dtype == torch.float16
    calls = []
    packed.wide.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    narrow, wide = torch.randn(INT4_MAX_ROWS, 64), torch.randn(INT4_MAX_ROWS + 1, 64)
    with torch.inference_mode():
        close_to = linear(wide)
        packed(narrow)
        assert calls == []
        torch.testing.assert_close(packed(wide), close_to, rtol=2e-2 if native_bf16 else 1e-3, atol=2e-2 if native_bf16 else 1e-3)
    assert calls == [INT4_MAX_ROWS + 1]


@pytest.mark.parametrize("native_bf16", [True, False])
def test_int4_dynamic_output_projection_takes_bf16_weights_for_many_rows_where_native(native_bf16, monkeypatch):
    """Up to `OUTPUT_FP16_MAX_ROWS` rows the logits come from fp16 weights; wider calls from a bf16 copy where the CPU has bf16."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from handler.model.quantization import OUTPUT_FP16_MAX_ROWS, Bf16Linear, RowSplitLinear

    monkeypatch.setattr("handler.model.quantization.native_bf16_cpu", lambda: native_bf16)
    model = on_4bit_grids(tiny_llama(torch.float32))
    weight = model.lm_head.weight.detach().clone()
    quantize_for_cpu(model, INT4_DYNAMIC)
    if not native_bf16:
        assert isinstance(model.lm_head, DynamicLinear)
        return
    split = model.lm_head
    assert isinstance(split, RowSplitLinear) and isinstance(split.narrow, DynamicLinear) and isinstance(split.wide, Bf16Linear)
    calls = []
    split.wide.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[1]))
    narrow, wide = (
        torch.randn(1, OUTPUT_FP16_MAX_ROWS, weight.shape[1]),
        torch.randn(1, OUTPUT_FP16_MAX_ROWS + 1, weight.shape[1]),
    )
    with torch.inference_mode():
        torch.testing.assert_close(split(narrow), narrow @ weight.T, rtol=1e-2, atol=1e-2)
        assert calls == []
        torch.testing.assert_close(split(wide), wide @ weight.T, rtol=2e-2, atol=2e-2)
    assert calls == [OUTPUT_FP16_MAX_ROWS + 1]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 64])
def test_int4_linear_added_to_a_residual_gives_the_same_bits_as_adding_its_output(bias, rows):
    """The fused Llama layer adds `o_proj` and `down_proj` through `added_to`, which skips the cast back to fp32."""
    linear = on_4bit_grids(nn.Sequential(nn.Linear(64, 32, bias=bias)))[0]
    packed = quantize_for_cpu(nn.Sequential(linear, nn.Linear(32, 8)), INT4_DYNAMIC)[0]
    inputs, residual = torch.randn(1, rows, 64), torch.randn(1, rows, 32)
    with torch.inference_mode():
        assert torch.equal(packed.added_to(residual, inputs), residual + packed(inputs))
