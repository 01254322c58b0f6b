"""bench.single_stream's variants on the tiny random Llama: how a name maps to a loaded model."""

from __future__ import annotations

import pytest
import torch

from bench.single_stream import greedy, load_variant


def test_a_plain_variant_loads_its_dtype_uncompiled(tiny_model_dir):
    model, compiled = load_variant(tiny_model_dir, "bf16")
    assert model.dtype == torch.bfloat16
    assert compiled is False
    assert model.generation_config.compile_config is None or not model.generation_config.compile_config._compile_all_devices


def test_the_compile_option_asks_generate_to_compile_on_the_cpu(tiny_model_dir):
    model, compiled = load_variant(tiny_model_dir, "fp32+compile")
    assert compiled is True
    assert model.generation_config.compile_config._compile_all_devices is True


@pytest.mark.parametrize("name", ["int8+compile", "fp32+fp16-dynamic+int8-dynamic", "compile"])
def test_a_malformed_variant_is_refused_by_name(tiny_model_dir, name):
    with pytest.raises(ValueError, match="DTYPE\\[\\+QUANTIZATION\\]\\[\\+compile\\]"):
        load_variant(tiny_model_dir, name)


def test_the_static_cache_decodes_the_same_greedy_tokens(tiny_model_dir):
    """The compiled variant decodes over a static cache; uncompiled, that cache changes nothing."""
    model, _ = load_variant(tiny_model_dir, "fp32")
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    dynamic_tokens, _ = greedy(model, ids, 12)
    static_tokens, _ = greedy(model, ids, 12, static_cache=True)
    assert len(dynamic_tokens) == 12
    assert static_tokens == dynamic_tokens
