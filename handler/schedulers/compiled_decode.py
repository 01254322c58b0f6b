"""Decode steps' layers, compiled: the CPU steps that decode every row's one token.

A continuous-batching step that decodes its rows' next tokens spends most of its time, on a CPU,
in eager PyTorch's cost per op: some forty small ops per layer around four int4 matmuls
(docs/bench.md, "Where the shipped path's time goes"). On such a step, of up to `LAST_ROWS`
rows, each fused Llama layer over `Int4Linear` weights (`handler.model.fusion`,
`handler.model.quantization`) runs here as one function compiled by inductor with its C++
wrapper: both norms, the matmuls, the rotation, the write of each row's key and value into the
paged cache, each row's attention over its own keys and the MLP. The weights are the function's
inputs, so one graph serves every layer. Shapes stay static: the rows are padded to a power of
two (the last row repeated, its output dropped), each row's keys to the longest row's bucket, a
power of two from `FIRST_BUCKET` (the row's last key repeated, masked out). Each shape compiles
once in a process: the continuous scheduler runs them all when its manager starts, with groups of
short requests (`warm_up_steps`), and then seals the set (`seal`): any other shape, such as a row
with more than `LAST_BUCKET` keys, stays eager, since compiling on a user's step would stall every
row for seconds. Compiling takes seconds per shape, less once inductor's cache on disk holds it
(the gateway keeps it in the run folder). Inductor's own loops run on one thread: they are
small, and handing them to a second OpenMP thread cost more than it saved; the int4 kernel and
attention keep torch's threads.

Every other step (a prompt's prefill, alone or beside decoding rows) keeps the eager layer, as
does every layer this does not fit, a host without the C++ compiler inductor needs, and
`handler.continuous.compile_decode_steps: false`. The int4 kernel is the same call as in the
eager layer; the norms and the rotation round as fused C++ loops rather than eager's ops, so the
logits can differ from the eager step's in their last bits, and a greedy row can then take the
other side of a near tie.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, Callable

import torch
from torch import nn

from handler.model.quantization import INT4_GROUP_SIZE, Int4Linear
from handler.schedulers.compat import PagedAttentionCache, step_row_ends

logger = logging.getLogger(__name__)

FIRST_BUCKET = 64
# The key buckets compiled when the manager starts (`warm_up_steps`); a row with more keys stays eager.
WARM_BUCKETS = 3
LAST_BUCKET = FIRST_BUCKET << (WARM_BUCKETS - 1)
# Decode steps of up to this many rows (padded to a power of two) run compiled.
LAST_ROWS = 16
# One graph per row and key bucket, all of the same function.
GRAPHS = WARM_BUCKETS * LAST_ROWS.bit_length()
INDUCTOR_OPTIONS = {"cpp_wrapper": True, "cpp.threads": 1}


def install(model: nn.Module) -> int:
    """Routes the decode steps of every fused layer over int4 weights to the compiled function;
    returns how many layers (0 without a C++ compiler). Idempotent: a new manager keeps them."""
    layers = [layer for layer in model.modules() if _fits(layer)]
    if not layers or not _compiler_found():
        return 0
    # Past dynamo's limit on one function's graphs (8 by default), new shapes would run eagerly.
    compiled = _Compiled(torch.compile(layer_step, dynamic=False, options=INDUCTOR_OPTIONS, recompile_limit=2 * GRAPHS))
    for layer in layers:
        if not isinstance(getattr(layer.forward, "func", None), _DecodeStepForward):
            layer.forward = partial(_DecodeStepForward(layer.forward, compiled), layer)
    logger.info("decode steps of up to %d rows run %d layers compiled (up to %d keys a row)", LAST_ROWS, len(layers), LAST_BUCKET)
    return len(layers)


def seal(model: nn.Module) -> list[tuple[int, int]]:
    """From now on only the shapes compiled so far (by the warm-up) take the compiled path: another
    would compile on a user's step and stall every row for seconds. Returns them, as (rows, keys)."""
    shapes: set[tuple[int, int]] = set()
    for layer in model.modules():
        wrapper = getattr(layer.forward, "func", None)
        if isinstance(wrapper, _DecodeStepForward):
            wrapper.compiled.sealed = True
            shapes |= wrapper.compiled.shapes
    return sorted(shapes)


class _Compiled:
    """The compiled `layer_step`, and the (padded rows, padded keys) shapes it has run."""

    def __init__(self, compiled: Callable[..., torch.Tensor]):
        self.compiled = compiled
        self.shapes: set[tuple[int, int]] = set()
        self.sealed = False

    def takes(self, rows: int, keys: int) -> bool:
        if (rows, keys) in self.shapes:
            return True
        if self.sealed:
            return False
        self.shapes.add((rows, keys))
        return True

    def __call__(self, *arguments: Any) -> torch.Tensor:
        return self.compiled(*arguments)


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
        logger.warning("decode steps stay eager: inductor finds no C++ compiler (%s)", error)
        return False
    return True


def warm_up_steps(max_total_tokens: int, max_batch_tokens: int, pages: int, page_size: int) -> list[tuple[int, int, int]]:
    """The warm-up's groups, as (requests, prompt length, new tokens): each group's requests, sent
    together, reach a step where all of them decode, reading keys in one of the first `WARM_BUCKETS`
    buckets (a prompt of 1, then of a bucket's worth: the step reads the prompt and the tokens so
    far), for each row bucket up to `LAST_ROWS`. Prompts prefilled over several steps (at most
    `max_batch_tokens` tokens a step) need as many more tokens; only groups that fit the token
    limit and, all at once, the cache's `pages` are kept."""
    lengths = [1] + [FIRST_BUCKET << shift for shift in range(WARM_BUCKETS - 1)]
    groups = []
    for rows in (1 << shift for shift in range(LAST_ROWS.bit_length())):
        for length in lengths:
            new_tokens = 1 + -(-rows * length // max_batch_tokens)
            fits = length + new_tokens <= min(max_total_tokens, bucket(length + 1))
            if fits and rows * -(-(length + new_tokens) // page_size) <= pages:
                groups.append((rows, length, new_tokens))
    return groups


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
    """One fused layer for `rows` rows' one token each: `fused_layer_forward` with the row attention's
    decode path, the cache's slots (`slots`, every layer's) written and read at this layer's offsets.
    `read_index` holds each row's key slots padded to the same width, `readable` masks the padding."""
    rows, head_dim = hidden.shape[1], cos.shape[-1]
    width = read_index.shape[0] // rows
    normed = nn.functional.rms_norm(hidden, norm_weight.shape, norm_weight, norm_epsilon)
    qkv = _int4_product(normed, qkv_packed, qkv_scales).float().view(rows, heads + 2 * key_heads, head_dim)
    turning = qkv[:, : heads + key_heads]
    half = head_dim // 2
    cos, sin = cos.view(rows, 1, head_dim), sin.view(rows, 1, head_dim)
    rotated = turning * cos + torch.cat((-turning[..., half:], turning[..., :half]), -1) * sin
    slots.index_copy_(0, write_index + key_offset, rotated[:, heads:])
    slots.index_copy_(0, write_index + value_offset, qkv[:, heads + key_heads :])
    keys = slots.index_select(0, read_index + key_offset).view(rows, width, key_heads, head_dim).transpose(1, 2)
    values = slots.index_select(0, read_index + value_offset).view(rows, width, key_heads, head_dim).transpose(1, 2)
    attended = nn.functional.scaled_dot_product_attention(
        rotated[:, :heads].unsqueeze(2), keys, values, attn_mask=readable, scale=scaling, enable_gqa=True
    )
    hidden = hidden + _int4_product(attended.reshape(1, rows, heads * head_dim), out_packed, out_scales)
    normed = nn.functional.rms_norm(hidden, post_norm_weight.shape, post_norm_weight, post_norm_epsilon)
    gate, up = _int4_product(normed, gate_up_packed, gate_up_scales).float().chunk(2, dim=-1)
    return hidden + _int4_product(nn.functional.silu(gate) * up, down_packed, down_scales)


def _int4_product(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`Int4Linear`'s kernel call, in bf16, for a (1, rows, in) input."""
    rows = x.shape[1]
    out = torch._weight_int4pack_mm_for_cpu(x.reshape(rows, -1).to(torch.bfloat16), packed, INT4_GROUP_SIZE, scales)
    return out.view(1, rows, -1)


class _DecodeStepForward:
    """A fused layer's forward that sends a decode step's rows to `layer_step`, compiled."""

    def __init__(self, eager: Callable[..., torch.Tensor], compiled: _Compiled):
        self.eager = eager
        self.compiled = compiled
        self.held: tuple[Any, tuple, tuple] | None = None  # the manager cache, and the layer's arguments for it

    def __call__(self, layer: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        step = None if args else self._arguments(layer, hidden_states, kwargs)
        if step is None:
            return self.eager(hidden_states, *args, **kwargs)
        padded_rows, width, arguments = step
        if not self.compiled.takes(padded_rows, width):
            return self.eager(hidden_states, *args, **kwargs)
        rows = hidden_states.shape[1]
        if padded_rows == rows:
            return self.compiled(hidden_states, *arguments)
        padded = torch.cat((hidden_states, hidden_states[:, -1:].expand(1, padded_rows - rows, -1)), 1)
        return self.compiled(padded, *arguments)[:, :rows]

    def _arguments(self, layer: nn.Module, hidden_states: torch.Tensor, kwargs: dict) -> tuple[int, int, tuple] | None:
        """The step's padded row and key counts and `layer_step`'s arguments after `hidden`, or None
        where this step is not one that decodes every row's one token."""
        cache = kwargs.get("cache")
        if (
            not isinstance(cache, PagedAttentionCache)
            or hidden_states.shape[0] != 1
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
        embeddings = kwargs.get("position_embeddings")
        if embeddings is None:
            return None
        step = _padded_step(kwargs, allocator_index, embeddings, hidden_states.shape[1], layer.self_attn.layer_idx)
        if step is None:
            return None
        before, after = weights
        padded_rows, cos, sin, write_index, read_index, readable = step
        arguments = (*before, cos, sin, slots, key_offset, value_offset, write_index, read_index, readable, *after)
        return padded_rows, readable.shape[-1], arguments


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


class _PaddedStep:
    """A decode step's rows padded to a power of two (the last row repeated) and each row's keys to
    the longest row's bucket (the row's last key repeated, masked out); every layer of a step reads
    the same positions, so the first layer pads them."""

    def __init__(self) -> None:
        self.read_index: torch.Tensor | None = None
        self.padded: tuple | None = None

    def __call__(self, kwargs: dict, allocator_index: int, embeddings: tuple, rows: int, layer_idx: int) -> tuple | None:
        read_index = kwargs["read_index"][allocator_index]
        if layer_idx != 0 and read_index is self.read_index:
            return self.padded
        self.read_index, self.padded = (
            read_index,
            _padded(kwargs, read_index, kwargs["write_index"][allocator_index], embeddings, rows),
        )
        return self.padded


def _padded(kwargs: dict, read_index: torch.Tensor, write_index: torch.Tensor, embeddings: tuple, rows: int) -> tuple | None:
    """`_PaddedStep`'s work: the padded row count, then `layer_step`'s cos, sin, write index, key
    slots and mask; None for a step that is not every row's one-token decode, or that no bucket holds."""
    if rows > LAST_ROWS or read_index.numel() == 0 or write_index.numel() != rows:
        return None
    if rows == 1:
        key_ends = torch.tensor([0, read_index.numel()])
    else:
        ends = step_row_ends(kwargs)
        if ends is None or ends[0].numel() != rows + 1 or int(ends[0][-1]) != rows:
            return None
        key_ends = ends[1]
    lengths = key_ends[1:] - key_ends[:-1]
    longest = int(lengths.max())
    if longest > LAST_BUCKET or int(lengths.min()) < 1:
        return None
    width, padded_rows = bucket(longest), row_bucket(rows)
    offsets = torch.arange(width)
    # Padding reads each row's last key again (a real, finite one), masked out.
    positions = key_ends[:-1, None] + torch.minimum(offsets, lengths[:, None] - 1)
    readable = (offsets < lengths[:, None]).view(rows, 1, 1, width)
    cos, sin = embeddings
    extra = padded_rows - rows
    padded = (positions, readable, write_index, cos.reshape(rows, -1), sin.reshape(rows, -1))
    if extra:
        padded = tuple(torch.cat((t, t[-1:].expand(extra, *t.shape[1:]))) for t in padded)
    positions, readable, write_index, cos, sin = padded
    return padded_rows, cos, sin, write_index, read_index[positions.view(-1)], readable


def row_bucket(rows: int) -> int:
    """The padded row count of a decode step of `rows` rows."""
    return 1 << (rows - 1).bit_length()


_padded_step = _PaddedStep()
