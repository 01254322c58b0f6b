"""bench.single_stream's variants on the tiny random Llama: how a name maps to a loaded model."""

from __future__ import annotations

import pytest
import torch

from bench.single_stream import greedy, load_variant


def compiled(model) -> bool:
    return hasattr(model.forward, "_torchdynamo_orig_callable")


def test_a_plain_variant_loads_its_dtype_uncompiled(tiny_model_dir):
    model = load_variant(tiny_model_dir, "bf16")
    assert model.dtype == torch.bfloat16
    assert not compiled(model)


@pytest.mark.parametrize("name", ["int8+compile", "fp32+fp16-dynamic+int8-dynamic", "compile"])
def test_a_malformed_variant_is_refused_by_name(tiny_model_dir, name):
    with pytest.raises(ValueError, match="DTYPE\\[\\+QUANTIZATION\\]\\[\\+compile\\]"):
        load_variant(tiny_model_dir, name)


def test_the_compiled_variant_decodes_the_plain_ones_greedy_tokens(tiny_model_dir):
    """`+compile` is handler.compile: the same forward through torch.compile, so the same tokens."""
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    plain_tokens, _ = greedy(load_variant(tiny_model_dir, "fp32"), ids, 12)
    model = load_variant(tiny_model_dir, "fp32+compile")
    assert compiled(model)
    compiled_tokens, _ = greedy(model, ids, 12)
    assert len(plain_tokens) == 12
    assert compiled_tokens == plain_tokens
