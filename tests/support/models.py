"""A tiny random Llama built in memory (seed 0), for tests of what is done to a loaded model."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

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
