"""handler.model.fusion on the tiny random Llama of tests.support.models: the fused layers compute what the separate ones did."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
from transformers import DynamicCache, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from handler.model.fusion import _StepRotation, fuse_llama_layers
from handler.model.quantization import quantize_for_cpu
from tests.support.models import TOKENS, tiny_llama


def greedy(model, new_tokens: int = 12) -> list[int]:
    with torch.inference_mode():
        output = model.generate(TOKENS, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return output[0, TOKENS.shape[1] :].tolist()


def step_logits(model) -> torch.Tensor:
    """A prefill, then one decode step through the cache: both kinds of forward the layers serve."""
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        prefill = model(TOKENS, past_key_values=cache, use_cache=True).logits
        step = model(prefill[:, -1:].argmax(-1), past_key_values=cache, use_cache=True).logits
    return torch.cat([prefill, step], dim=1)


def fused_copy(model) -> LlamaForCausalLM:
    fused = copy.deepcopy(model)
    assert fuse_llama_layers(fused) == model.config.num_hidden_layers
    return fused


def test_each_layer_gets_one_query_key_value_and_one_gate_up_projection():
    model = fused_copy(tiny_llama())
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        assert attention.qkv_proj.out_features == 64 + 2 * 2 * 16
        assert mlp.gate_up_proj.out_features == 2 * 128
        assert not any(hasattr(attention, name) for name in ("q_proj", "k_proj", "v_proj"))
        assert not any(hasattr(mlp, name) for name in ("gate_proj", "up_proj"))


@pytest.mark.parametrize("bias", [False, True])
def test_fused_layers_give_the_separate_layers_logits_and_greedy_text(bias):
    model = tiny_llama(attention_bias=bias, mlp_bias=bias)
    fused = fused_copy(model)
    torch.testing.assert_close(step_logits(fused), step_logits(model), rtol=1e-5, atol=1e-5)
    assert greedy(fused) == greedy(model)


def test_fp16_weights_quantize_the_fused_projections_and_keep_the_text():
    model = tiny_llama()
    fused = quantize_for_cpu(fused_copy(model), "fp16-dynamic")
    assert isinstance(fused.model.layers[0].self_attn.qkv_proj, DynamicLinear)
    assert greedy(fused) == greedy(quantize_for_cpu(copy.deepcopy(model), "fp16-dynamic"))


def test_bf16_layers_keep_the_norm_modules_and_stay_close():
    model = tiny_llama(torch.bfloat16)
    torch.testing.assert_close(step_logits(fused_copy(model)), step_logits(model), rtol=2e-2, atol=2e-2)


def test_layers_with_another_activation_are_left_as_they_are():
    model = tiny_llama(hidden_act="gelu")
    assert fuse_llama_layers(model) == 0
    assert hasattr(model.model.layers[0].self_attn, "q_proj")


def test_the_step_rotation_turns_heads_as_transformers_does_and_follows_each_pass():
    rotation = _StepRotation()
    for _ in range(2):  # a second pass brings new tensors, which must not meet the first pass's layout
        heads = torch.randn(1, 3, 4, 16)  # (batch, tokens, heads, head dim), as the fused layer holds them
        angles = torch.randn(1, 3, 16)
        cos, sin = angles.cos(), angles.sin()
        expected, _ = apply_rotary_pos_emb(heads, heads, cos, sin, unsqueeze_dim=2)
        assert torch.equal(rotation(heads, cos, sin), expected)
        layout = rotation.held
        assert torch.equal(rotation(heads, cos, sin), expected)
        assert rotation.held is layout, "the layers of one pass share one layout"
