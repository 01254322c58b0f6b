"""The continuous manager's decode steps on the CPU attend row by row.

Off CUDA, transformers' continuous batching has only its `sdpa` and `paged|eager` attention. Both
gather every sequence's keys into one and mask it block by block, so each row's query is scored
against the keys of all rows: work that grows with the batch's summed context. On a step where
every row decodes one token, this pads each row's keys to the longest row's and runs one batched
SDPA with a padding mask: work that grows with the longest row. Any other step (a prompt being
prefilled), device or attention variant keeps transformers' own function, which this one
replaces under the name `sdpa` (`AttentionInterface`); outside the manager's paged cache, as in
`generate`, that is all it does. docs/bench.md has the profile behind it and its effect.
"""

from __future__ import annotations

from typing import Any
from weakref import WeakKeyDictionary

import torch
from transformers.generation.continuous_batching.cache import PagedAttentionCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

# Per manager cache, the step's gather: which key positions each row reads, and which of them
# are padding. Every layer of a step reads the same positions; the first layer works them out.
_row_gathers: WeakKeyDictionary[PagedAttentionCache, tuple[torch.Tensor, torch.Tensor]] = WeakKeyDictionary()


def install() -> None:
    """Make `sdpa` this function in every model of the process (idempotent). Imported here, once a
    model is loaded: `transformers.modeling_utils` imports torchao where it is installed."""
    from transformers import AttentionInterface

    AttentionInterface.register("sdpa", row_attention_forward)


def row_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    cache: PagedAttentionCache | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    key_ends = _decode_step_key_ends(query, cache, dropout, position_bias, kwargs)
    if key_ends is None or cache is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, position_bias, cache, **kwargs
        )
    key, value = cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx, kwargs=kwargs)
    if module.layer_idx == 0 or cache not in _row_gathers:
        _row_gathers[cache] = row_gather(key_ends, key.shape[2])
    positions, readable = _row_gathers[cache]
    rows_keys = key[0][:, positions].transpose(0, 1)  # (rows, kv heads, longest, head dim)
    rows_values = value[0][:, positions].transpose(0, 1)
    rows_queries = query[0].transpose(0, 1).unsqueeze(2)  # (rows, heads, 1, head dim)
    output = torch.nn.functional.scaled_dot_product_attention(
        rows_queries,
        rows_keys,
        rows_values,
        attn_mask=readable,
        scale=scaling,
        enable_gqa=rows_queries.shape[1] != rows_keys.shape[1],
    )
    return output.squeeze(2).unsqueeze(0), None  # (1, rows, heads, head dim), as sdpa_attention_forward's


def row_gather(key_ends: torch.Tensor, keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From the cumulative key lengths of the rows (0 first), each row's key positions padded to the
    longest row, and the mask that lets each row read only its own, shaped for SDPA."""
    starts = key_ends[:-1]
    lengths = key_ends[1:] - starts
    offsets = torch.arange(int(lengths.max()), device=key_ends.device)
    positions = (starts[:, None] + offsets).clamp_max(keys - 1)
    readable = (offsets[None, :] < lengths[:, None])[:, None, None, :]
    return positions, readable


def _decode_step_key_ends(
    query: torch.Tensor, cache: Any, dropout: float, position_bias: torch.Tensor | None, kwargs: dict
) -> torch.Tensor | None:
    """The rows' cumulative key lengths when this is the manager's decode step on the CPU, with
    two rows or more, one query each, and full attention; None for anything else."""
    if not isinstance(cache, PagedAttentionCache) or query.device.type != "cpu" or query.shape[0] != 1:
        return None
    if dropout or position_bias is not None or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        return None
    query_ends, key_ends = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if query_ends is None or not isinstance(key_ends, dict) or list(key_ends) != ["full_attention"]:
        return None
    rows = query_ends.numel() - 1
    if rows < 2 or query.shape[2] != rows:
        return None
    return key_ends["full_attention"]
