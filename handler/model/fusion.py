"""Llama decoder layers with their projections fused, run by one lean function: for CPU serving.

On a CPU, a decode step's matmuls are small, and the Python and dispatch around them cost more
than they do (bench/results/profile-continuous.md). transformers' Llama layer makes seven matmuls
and a dozen module calls. Here query, key and value become one matmul, gate and up another, and
the layer's forward is one function that calls the norms (torch's fused op in fp32), the
attention function and the two output projections directly. Each output column of a matmul is
its own dot product, whatever columns sit beside it, so only the kernels' blocking can tell the
fused layers from the separate ones: logits agree to 1e-5 and greedy text stays the same
(tests/unit/test_fusion.py).

The fused layers are plain `nn.Linear`, made right after loading, so the dtype probe and every
quantization method see them as any other linear layer. Only transformers' own `LlamaDecoderLayer`
is fused (SmolLM2, Llama 2 and 3, TinyLlama...): other architectures keep their modules.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)


def fuse_llama_layers(model: nn.Module) -> int:
    """Fuses every `LlamaDecoderLayer` whose projections are plain linear layers; returns how many.
    transformers' modelling code is imported here, once a model is loaded: it imports torchao
    where that is installed."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, eager_attention_forward

    fused = 0
    for layer in model.modules():
        if type(layer) is LlamaDecoderLayer and _fusable(layer):
            _fuse(layer)
            # The attention function is looked up at each call, as transformers does: it can be registered later.
            layer.forward = partial(
                fused_layer_forward, layer, partial(ALL_ATTENTION_FUNCTIONS.get_interface, default=eager_attention_forward)
            )
            fused += 1
    if fused:
        logger.info("fused the projections of %d Llama decoder layers", fused)
    return fused


def _fusable(layer: nn.Module) -> bool:
    attention, mlp = layer.self_attn, layer.mlp
    projections = [attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj]
    return all(type(p) is nn.Linear for p in projections) and layer.mlp.config.hidden_act == "silu"


def _concatenated(*linears: nn.Linear) -> nn.Linear:
    first = linears[0]
    biased = first.bias is not None
    out_features = sum(linear.out_features for linear in linears)
    fused = nn.Linear(first.in_features, out_features, bias=biased, device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([linear.weight for linear in linears]))
        if biased:
            fused.bias.copy_(torch.cat([linear.bias for linear in linears]))
    return fused.train(first.training)


def _fuse(layer: nn.Module) -> None:
    attention, mlp = layer.self_attn, layer.mlp
    attention.qkv_proj = _concatenated(attention.q_proj, attention.k_proj, attention.v_proj)
    mlp.gate_up_proj = _concatenated(mlp.gate_proj, mlp.up_proj)
    for owner, names in ((attention, ("q_proj", "k_proj", "v_proj")), (mlp, ("gate_proj", "up_proj"))):
        for name in names:
            delattr(owner, name)


def _normed(norm: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """`LlamaRMSNorm` as torch's one fused op where that gives the same bits (fp32); the module elsewhere."""
    if hidden_states.dtype != torch.float32:
        return norm(hidden_states)
    return nn.functional.rms_norm(hidden_states, norm.weight.shape, norm.weight, norm.variance_epsilon)


class _StepRotation:
    """The rotary embedding, with a step's cosine and sine laid out once per forward pass.

    transformers' `x * cos + rotate_half(x) * sin` is `x * cos + cat(-x2, x1) * cat(s1, s2)`;
    here `x * cos + roll(x) * cat(-s1, s2)`, the same products with the sign on the sine, so each
    layer makes one roll instead of two slices, a negation and a concatenation. Every layer of a
    pass gets the same `position_embeddings` tensors, so the last ones are kept with their layout
    (not while `torch.compile` traces: a compiled graph makes them once anyway)."""

    def __init__(self) -> None:
        self.held: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def __call__(self, heads: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """`heads` (batch, tokens, heads, head dim) turned by the pass's `cos` and `sin` (batch, tokens, head dim)."""
        cos_heads, signed_sin_heads = self._layout(cos, sin)
        return heads * cos_heads + torch.roll(heads, heads.shape[-1] // 2, -1) * signed_sin_heads

    def _layout(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():
            return self._laid_out(cos, sin)
        held = self.held
        if held is None or held[0] is not cos or held[1] is not sin:
            held = self.held = (cos, sin, *self._laid_out(cos, sin))
        return held[2], held[3]

    @staticmethod
    def _laid_out(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        half = sin.shape[-1] // 2
        return cos.unsqueeze(2), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).unsqueeze(2)


_rotation = _StepRotation()


def _added(residual: torch.Tensor, projection: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`residual + projection(x)`, through the projection's own `added_to` where it has one (`Int4Linear`)."""
    added_to = getattr(projection, "added_to", None)
    return added_to(residual, x) if added_to is not None else residual + projection(x)


def fused_layer_forward(
    self: nn.Module,
    attention_function: Callable[[str], Callable[..., Any]],
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    past_key_values=None,
    use_cache: bool | None = False,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs,
) -> torch.Tensor:
    """`LlamaDecoderLayer.forward` and `LlamaAttention.forward` in one, over the fused projections."""
    attention, mlp = self.self_attn, self.mlp
    heads, head_dim = attention.config.num_attention_heads, attention.head_dim
    key_heads = attention.config.num_key_value_heads
    batch, tokens = hidden_states.shape[:2]

    qkv = attention.qkv_proj(_normed(self.input_layernorm, hidden_states)).view(batch, tokens, heads + 2 * key_heads, head_dim)
    # Query and key heads turn together: one rotation instead of two.
    cos, sin = position_embeddings  # type: ignore[misc]
    rotated = _rotation(qkv[:, :, : heads + key_heads], cos, sin)
    query, key = rotated[:, :, :heads].transpose(1, 2), rotated[:, :, heads:].transpose(1, 2)
    value = qkv[:, :, heads + key_heads :].transpose(1, 2)

    if past_key_values is not None:
        key, value = past_key_values.update(key, value, attention.layer_idx)
    attend = attention_function(attention.config._attn_implementation)
    attended, _ = attend(attention, query, key, value, attention_mask, dropout=0.0, scaling=attention.scaling, **kwargs)
    hidden_states = _added(hidden_states, attention.o_proj, attended.reshape(batch, tokens, -1))

    gate, up = mlp.gate_up_proj(_normed(self.post_attention_layernorm, hidden_states)).chunk(2, dim=-1)
    return _added(hidden_states, mlp.down_proj, nn.functional.silu(gate) * up)
