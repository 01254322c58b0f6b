"""A tiny random Llama built in memory (seed 0), for tests of what is done to a loaded model, and
its weights moved onto 4-bit grids."""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from handler.model.quantization import INT4_GROUP_SIZE

# A few token ids of its 128-token vocabulary, as a batch of one.
TOKENS = torch.tensor([[1, 5, 9, 17, 33, 65, 3, 7]])


def tiny_llama(dtype: torch.dtype = torch.float32, **overrides) -> LlamaForCausalLM:
    """Two layers, grouped attention (4 heads, 2 key heads), tied embeddings; `overrides` go to its config."""
    torch.manual_seed(0)
    shape = {
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "tie_word_embeddings": True,
    }
    config = LlamaConfig(**(shape | overrides))
    return LlamaForCausalLM(config).to(dtype).eval()


def on_4bit_grids(model: nn.Module) -> nn.Module:
    """The model with every layer weight moved to the nearest point of its group's 16-level grid,
    as the weights of a model converted from a Q4_1 GGUF are."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    with torch.no_grad():
        for module in model.modules():
            if type(module) is nn.Linear and module is not output:
                groups = module.weight.view(module.out_features, -1, INT4_GROUP_SIZE)
                low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
                step = (high - low) / 15
                groups.copy_(((groups - low) / step).round() * step + low)
    return model
