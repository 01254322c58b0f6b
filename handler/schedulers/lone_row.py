"""A lone decoding row's layers, compiled: the CPU step that serves one user at a time.

A continuous-batching step that decodes one row's one token spends most of its time, on a CPU,
in eager PyTorch's cost per op: some forty small ops per layer around three int4 matmuls
(docs/bench.md, "Where the shipped path's time goes"). On such a step, each fused Llama layer
over `Int4Linear` weights (`handler.model.fusion`, `handler.model.quantization`) runs here as one
function compiled by inductor with its C++ wrapper: both norms, the three matmuls, the rotation,
the write of the row's key and value into the paged cache, its attention over its keys and the
MLP. The weights are the function's inputs, so one graph serves every layer. The row's keys are
padded to a power of two from `FIRST_BUCKET` and masked, so shapes stay static: each bucket
compiles once in a process. The continuous scheduler compiles them when its manager starts, with
one short request each (`warm_up_lengths`), and only those: a row with more than `LAST_BUCKET`
keys stays eager, since compiling its bucket on a user's step would stall every row for seconds.
Compiling takes seconds per bucket, fewer once inductor's cache on disk holds it (the gateway
keeps it in the run folder).

Every other step (two rows or more, a prompt's prefill) keeps the eager layer, as does every
layer this does not fit, a row with more keys, a host without the C++ compiler inductor needs,
and `handler.continuous.compile_lone_row: false`. The int4 kernel is the same call as in the
eager layer; the norms and the rotation round as fused C++ loops rather than eager's ops, so
the logits can differ from the eager step's in their last bits.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, Callable

import torch
from torch import nn

from handler.model.quantization import INT4_GROUP_SIZE, Int4Linear
from handler.schedulers.compat import PagedAttentionCache

logger = logging.getLogger(__name__)

FIRST_BUCKET = 64
# The buckets compiled when the manager starts (`warm_up_lengths`); a row with more keys stays eager.
WARM_BUCKETS = 3
LAST_BUCKET = FIRST_BUCKET << (WARM_BUCKETS - 1)


def install(model: nn.Module) -> int:
    """Routes the lone-row steps of every fused layer over int4 weights to the compiled function;
    returns how many layers (0 without a C++ compiler). Idempotent: a new manager keeps them."""
    layers = [layer for layer in model.modules() if _fits(layer)]
    if not layers or not _compiler_found():
        return 0
    compiled = torch.compile(layer_step, dynamic=False, options={"cpp_wrapper": True})
    for layer in layers:
        if not isinstance(getattr(layer.forward, "func", None), _LoneRowForward):
            layer.forward = partial(_LoneRowForward(layer.forward, compiled), layer)
    logger.info("a lone decoding row runs %d layers compiled (up to %d keys)", len(layers), LAST_BUCKET)
    return len(layers)


def _fits(layer: nn.Module) -> bool:
    """A layer `fusion` made, over int4 weights without biases."""
    attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    projections = [getattr(attention, "qkv_proj", None), getattr(attention, "o_proj", None)]
    projections += [getattr(mlp, "gate_up_proj", None), getattr(mlp, "down_proj", None)]
    return all(type(p) is Int4Linear and p.bias is None for p in projections)


def _compiler_found() -> bool:
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as error:  # inductor raises its own errors, or OSError, when none is found
        logger.warning("a lone decoding row stays eager: inductor finds no C++ compiler (%s)", error)
        return False
    return True


def warm_up_lengths(max_total_tokens: int) -> list[int]:
    """Prompt lengths whose first decode step reads keys in each of the first `WARM_BUCKETS`
    buckets (1, then a bucket's worth: the step reads the prompt and its first token); only those
    a request of two new tokens fits in."""
    lengths = [1] + [FIRST_BUCKET << shift for shift in range(WARM_BUCKETS - 1)]
    return [length for length in lengths if length + 2 <= max_total_tokens]


def bucket(keys: int) -> int:
    """The padded key count a row with `keys` keys attends over."""
    return max(FIRST_BUCKET, 1 << (keys - 1).bit_length())


def layer_step(
    hidden: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_epsilon: float,
    qkv_packed: torch.Tensor,
    qkv_scales: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slots: torch.Tensor,
    key_offset: torch.Tensor,
    value_offset: torch.Tensor,
    write_index: torch.Tensor,
    read_index: torch.Tensor,
    readable: torch.Tensor,
    scaling: float,
    out_packed: torch.Tensor,
    out_scales: torch.Tensor,
    post_norm_weight: torch.Tensor,
    post_norm_epsilon: float,
    gate_up_packed: torch.Tensor,
    gate_up_scales: torch.Tensor,
    down_packed: torch.Tensor,
    down_scales: torch.Tensor,
    heads: int,
    key_heads: int,
) -> torch.Tensor:
    """One fused layer for one row's one token: `fused_layer_forward` with the row attention's lone-row
    path, the cache's slots (`slots`, every layer's) written and read at this layer's offsets."""
    head_dim = cos.shape[-1]
    normed = nn.functional.rms_norm(hidden, norm_weight.shape, norm_weight, norm_epsilon)
    qkv = _int4_product(normed, qkv_packed, qkv_scales).float().view(heads + 2 * key_heads, head_dim)
    turning = qkv[: heads + key_heads]
    half = head_dim // 2
    rotated = turning * cos.view(1, head_dim) + torch.cat((-turning[:, half:], turning[:, :half]), -1) * sin.view(1, head_dim)
    slots.index_copy_(0, write_index + key_offset, rotated[heads:].unsqueeze(0))
    slots.index_copy_(0, write_index + value_offset, qkv[heads + key_heads :].unsqueeze(0))
    keys = slots.index_select(0, read_index + key_offset).transpose(0, 1).unsqueeze(0)
    values = slots.index_select(0, read_index + value_offset).transpose(0, 1).unsqueeze(0)
    attended = nn.functional.scaled_dot_product_attention(
        rotated[:heads].view(1, heads, 1, head_dim), keys, values, attn_mask=readable, scale=scaling, enable_gqa=True
    )
    hidden = hidden + _int4_product(attended.reshape(1, 1, heads * head_dim), out_packed, out_scales)
    normed = nn.functional.rms_norm(hidden, post_norm_weight.shape, post_norm_weight, post_norm_epsilon)
    gate, up = _int4_product(normed, gate_up_packed, gate_up_scales).float().chunk(2, dim=-1)
    return hidden + _int4_product(nn.functional.silu(gate) * up, down_packed, down_scales)


def _int4_product(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`Int4Linear`'s kernel call, in bf16, for a (1, 1, in) input."""
    out = torch._weight_int4pack_mm_for_cpu(x.reshape(1, -1).to(torch.bfloat16), packed, INT4_GROUP_SIZE, scales)
    return out.view(1, 1, -1)


class _LoneRowForward:
    """A fused layer's forward that sends a lone decoding row's step to `layer_step`, compiled."""

    def __init__(self, eager: Callable[..., torch.Tensor], compiled: Callable[..., torch.Tensor]):
        self.eager = eager
        self.compiled = compiled
        self.held: tuple[Any, tuple, tuple] | None = None  # the manager cache, and the layer's arguments for it

    def __call__(self, layer: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        arguments = None if args else self._arguments(layer, hidden_states, kwargs)
        if arguments is None:
            return self.eager(hidden_states, *args, **kwargs)
        return self.compiled(hidden_states, *arguments)

    def _arguments(self, layer: nn.Module, hidden_states: torch.Tensor, kwargs: dict) -> tuple | None:
        """`layer_step`'s arguments after `hidden`, or None where this step is not a lone row's."""
        cache = kwargs.get("cache")
        if (
            not isinstance(cache, PagedAttentionCache)
            or hidden_states.shape[:2] != (1, 1)
            or hidden_states.device.type != "cpu"
            or kwargs.get("block_table") is not None
        ):
            return None
        held = self.held
        if held is None or held[0] is not cache:
            layout = _cache_layout(layer, cache, hidden_states.dtype)
            if layout is None:
                return None
            held = self.held = (cache, *layout)
        _, (allocator_index, slots, key_offset, value_offset), weights = held
        read_index = kwargs["read_index"][allocator_index]
        padded = _padded_keys(read_index, layer.self_attn.layer_idx)
        if padded is None:
            return None
        embeddings = kwargs.get("position_embeddings")
        if embeddings is None:
            return None
        cos, sin = embeddings
        before, after = weights
        write_index = kwargs["write_index"][allocator_index]
        return (*before, cos, sin, slots, key_offset, value_offset, write_index, *padded, *after)


def _cache_layout(layer: nn.Module, cache: PagedAttentionCache, dtype: torch.dtype) -> tuple[tuple, tuple] | None:
    """Where this layer's keys and values sit in the manager's cache, and its weights, as `layer_step`
    takes them; None for a cache kept otherwise than transformers' full-attention slots."""
    attention, mlp = layer.self_attn, layer.mlp
    allocator = cache.layer_to_allocator[attention.layer_idx]
    views = getattr(allocator, "_kv_token_views", None)
    held = getattr(allocator, "cache_tensor", None)
    if not isinstance(views, dict) or attention.layer_idx not in views or not isinstance(held, torch.Tensor):
        return None
    key_heads, head_dim = attention.config.num_key_value_heads, attention.head_dim
    if held.dtype != dtype or not held.is_contiguous():
        return None
    slots = held.view(-1, key_heads, head_dim)
    row_bytes = key_heads * head_dim * slots.element_size()
    key_view, value_view = views[attention.layer_idx]
    key_offset = torch.tensor((key_view.data_ptr() - slots.data_ptr()) // row_bytes)
    value_offset = torch.tensor((value_view.data_ptr() - slots.data_ptr()) // row_bytes)
    norm, post_norm = layer.input_layernorm, layer.post_attention_layernorm
    before = (norm.weight, norm.variance_epsilon, attention.qkv_proj.packed, attention.qkv_proj.scales_and_zeros)
    after = (
        attention.scaling,
        attention.o_proj.packed,
        attention.o_proj.scales_and_zeros,
        post_norm.weight,
        post_norm.variance_epsilon,
        mlp.gate_up_proj.packed,
        mlp.gate_up_proj.scales_and_zeros,
        mlp.down_proj.packed,
        mlp.down_proj.scales_and_zeros,
        attention.config.num_attention_heads,
        key_heads,
    )
    return (allocator.index, slots, key_offset, value_offset), (before, after)


class _PaddedKeys:
    """A step's read index padded to its bucket, and the mask of the real keys; every layer of a
    step reads the same positions, so the first layer pads them."""

    def __init__(self) -> None:
        self.read_index: torch.Tensor | None = None
        self.padded: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, read_index: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        keys = read_index.numel()
        if keys == 0 or keys > LAST_BUCKET:
            return None
        if layer_idx == 0 or read_index is not self.read_index or self.padded is None:
            width = bucket(keys)
            # Padding reads the row's last key again (a real, finite one), masked out.
            padded = torch.cat((read_index, read_index[-1:].expand(width - keys)))
            readable = (torch.arange(width) < keys).view(1, 1, 1, width)
            self.read_index, self.padded = read_index, (padded, readable)
        return self.padded


_padded_keys = _PaddedKeys()
