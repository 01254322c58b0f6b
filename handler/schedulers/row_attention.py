"""The continuous manager's steps on the CPU attend row by row.

Off CUDA, transformers' continuous batching has only its `sdpa` and `paged|eager` attention. Both
gather every sequence's keys into one and mask it block by block, so each row's queries are scored
against the keys of all rows: work that grows with the batch's summed context, and with a prompt's
length times it on a step that prefills one beside the others' decoding. Here, on a step of two
rows or more, the rows that decode one token have their keys padded to the longest of them and
share one batched SDPA with a padding mask; each row that brings several tokens (a prompt, or a
piece of one) gets an SDPA of its own over its own keys, causal from where its new tokens start.
Each row's keys are gathered straight from the cache's slots (`compat.paged_write`), where
transformers would first read every row's keys back in order.
A step that decodes a lone row writes and reads its keys the same way, then calls transformers'
own function, with the tensors transformers' cache would have handed it. Any other step (one row's
prefill), device or attention variant keeps transformers' function whole, which this one replaces
under the name `sdpa` (`AttentionInterface`); outside the manager's paged cache, as in `generate`,
that is all it does. docs/bench.md has the profile behind it and its effect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from handler.schedulers.compat import PagedAttentionCache, paged_update, paged_write, step_row_ends


@dataclass(frozen=True)
class RowSpan:
    """A row that brings several tokens: its queries and keys in the step's, and which keys each query reads."""

    queries: slice
    keys: torch.Tensor  # where the row's keys are held
    readable: torch.Tensor | None  # None: as many queries as keys, plain causal


@dataclass(frozen=True)
class SingleRows:
    """The rows that decode one token: where each one's query is, and row_gather of their keys
    (as cache slots when the keys are read from the cache)."""

    queries: torch.Tensor
    positions: torch.Tensor
    readable: torch.Tensor | None  # None: every row reads all its gathered keys


@dataclass(frozen=True)
class StepPlan:
    """How a step's rows attend; every layer of a step reads the same positions, so layer 0 works it out."""

    singles: SingleRows | None
    spans: tuple[RowSpan, ...]


# Per manager cache, the plan of the step under way.
_plans: WeakKeyDictionary[PagedAttentionCache, StepPlan] = WeakKeyDictionary()


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
    ends = _row_step_ends(query, cache, dropout, position_bias, kwargs)
    if ends is None or not isinstance(cache, PagedAttentionCache):
        if _lone_decode_row(query, cache):
            key, value, cache = *_lone_row_keys(cache, key, value, module.layer_idx, kwargs), None
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, position_bias, cache, **kwargs
        )
    # Keys and values as (position, kv heads, head dim): the cache's slots, read only where a row
    # reads them, or, on a step that reads nothing from the cache, this step's own.
    written = paged_write(cache, key, value, module.layer_idx, kwargs)
    if written is None:
        key, value = paged_update(cache, key, value, module.layer_idx, kwargs)
        keys, values, slots = key[0].transpose(0, 1), value[0].transpose(0, 1), None
    else:
        keys, values, slots = written
    if module.layer_idx == 0 or cache not in _plans:
        _plans[cache] = step_plan(*ends, slots if slots is not None else torch.arange(keys.shape[0]))
    plan = _plans[cache]
    grouped = query.shape[1] != keys.shape[1]
    # (1, tokens, heads, head dim), as sdpa_attention_forward returns it
    output = query.new_empty(query.shape[0], query.shape[2], query.shape[1], query.shape[3])
    singles = plan.singles
    if singles is not None:
        rows_queries = query[0][:, singles.queries].transpose(0, 1).unsqueeze(2)  # (rows, heads, 1, head dim)
        rows_keys = _gathered(keys, singles.positions).permute(0, 2, 1, 3)  # (rows, kv heads, longest, head dim)
        rows_values = _gathered(values, singles.positions).permute(0, 2, 1, 3)
        attended = torch.nn.functional.scaled_dot_product_attention(
            rows_queries, rows_keys, rows_values, attn_mask=singles.readable, scale=scaling, enable_gqa=grouped
        ).squeeze(2)  # (rows, heads, head dim)
        if not plan.spans:
            return attended.unsqueeze(0), None
        output[0, singles.queries] = attended
    for span in plan.spans:
        attended = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, span.queries],
            keys.index_select(0, span.keys).transpose(0, 1).unsqueeze(0),
            values.index_select(0, span.keys).transpose(0, 1).unsqueeze(0),
            attn_mask=span.readable,
            is_causal=span.readable is None,
            scale=scaling,
            enable_gqa=grouped,
        )
        output[0, span.queries] = attended[0].transpose(0, 1)
    return output, None


def _lone_decode_row(query: torch.Tensor, cache: Any) -> bool:
    """A manager step on the CPU that decodes one row's one token."""
    return isinstance(cache, PagedAttentionCache) and query.device.type == "cpu" and query.shape[0] == 1 and query.shape[2] == 1


def _lone_row_keys(
    cache: PagedAttentionCache, key: torch.Tensor, value: torch.Tensor, layer_idx: int, kwargs: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """The lone row's keys and values, written and read back as the cache's own update does, in
    the layout it returns them (1, kv heads, keys, head dim), so transformers' SDPA call sees the
    same tensors: without the update's `torch._dynamo.disable` wrapper and its per-layer
    bookkeeping, which cost more than the copies on a one-token step."""
    written = paged_write(cache, key, value, layer_idx, kwargs)
    if written is None:
        return paged_update(cache, key, value, layer_idx, kwargs)
    key_slots, value_slots, read_index = written
    keys = key_slots.index_select(0, read_index).transpose(0, 1).unsqueeze(0)
    return keys, value_slots.index_select(0, read_index).transpose(0, 1).unsqueeze(0)


def _gathered(held: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`held[positions]` for a (rows, longest) index, by `index_select`: on the CPU, torch's
    advanced indexing copies element by element, several times slower (docs/bench.md)."""
    return held.index_select(0, positions.view(-1)).view(*positions.shape, *held.shape[1:])


def step_plan(query_ends: torch.Tensor, key_ends: torch.Tensor, slots: torch.Tensor) -> StepPlan:
    """From the cumulative query and key lengths of a step's rows (0 first) and where each of the
    step's key positions is held (`slots`), how each row attends."""
    queries, key_bounds = query_ends.tolist(), key_ends.tolist()
    singles, spans = [], []
    for row in range(len(queries) - 1):
        query_start, query_end = queries[row], queries[row + 1]
        key_start, key_end = key_bounds[row], key_bounds[row + 1]
        if query_end - query_start == 1:
            singles.append(row)
            continue
        new, known = query_end - query_start, key_end - key_start
        # Query i of the row sits at key position known - new + i and reads every key up to it.
        readable = None if new == known else torch.ones(new, known, dtype=torch.bool).tril(known - new)
        spans.append(RowSpan(slice(query_start, query_end), slots[key_start:key_end], readable))
    if not singles:
        return StepPlan(None, tuple(spans))
    rows = torch.tensor(singles)
    lengths = key_ends[rows + 1] - key_ends[rows]
    positions, readable = row_gather(key_ends[rows], lengths, slots.numel())
    # Rows of one length read every key gathered: no mask.
    everything = bool((lengths == lengths[0]).all())
    return StepPlan(SingleRows(query_ends[rows], slots[positions], None if everything else readable), tuple(spans))


def row_gather(starts: torch.Tensor, lengths: torch.Tensor, keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From where each row's keys start among the step's `keys` and how many it has, each row's key
    positions padded to the longest row, and the mask that lets each row read only its own, shaped for SDPA."""
    offsets = torch.arange(int(lengths.max()), device=starts.device)
    positions = (starts[:, None] + offsets).clamp_max(keys - 1)
    readable = (offsets[None, :] < lengths[:, None])[:, None, None, :]
    return positions, readable


def _row_step_ends(
    query: torch.Tensor, cache: Any, dropout: float, position_bias: torch.Tensor | None, kwargs: dict
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The rows' cumulative query and key lengths when this is a manager step on the CPU with two rows
    or more and full attention; None for anything else."""
    if not isinstance(cache, PagedAttentionCache) or query.device.type != "cpu" or query.shape[0] != 1:
        return None
    if dropout or position_bias is not None or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        return None
    ends = step_row_ends(kwargs)
    if ends is None or ends[0].numel() < 3 or int(ends[0][-1]) != query.shape[2]:
        return None
    return ends
