"""Post-load quantization for CPU serving (`handler.quantization` in model-config.yaml).

Decoding one stream on CPU reads every weight once per token, so memory bandwidth bounds
it, and fewer bytes per weight is what speeds it up. Measured on torch 2.13 CPU (AVX2, 2 cores,
SmolLM2-135M, batch 1, greedy; docs/bench.md has the tables):

- `fp16-dynamic`: torch's dynamic quantization to float16 weights (fbgemm's fp16 GEMM,
  activations stay fp32). About 1.7x fp32, and its greedy text equalled fp32's.
- `int8-dynamic`: torch's dynamic quantization to int8 weights (one scale per output channel).
  Activations are quantized per call, per tensor, to 7 bits (fbgemm's `reduce_range` on AVX2).
  This is the fastest, about 1.8x fp32, but also the lossiest: the top-1 token agreed with fp32
  on only about 2 positions in 3. Worse for serving, the activation scale is taken over the whole
  batch, so a request's greedy text changes with its batch neighbours (and with padding): it
  differed from the first token on between alone and batched. Use it for experiments, not for
  serving.
- `int8-weight-only`: torchao's `Int8WeightOnlyConfig` (the tensors transformers' `TorchAoConfig`
  makes). Quality stays close to fp32, and weights take a quarter of fp32's memory. In eager mode
  it turns the int8 weight back into float at every matmul, so on CPU it is slower than fp32.
  Only `torch.compile` makes it fast, and that took minutes here.

`torch.ao.quantization` warns that it is deprecated in favour of torchao. But torchao's
counterparts run 3-25x slower than fp32 in eager mode on CPU, so the two dynamic methods stay
on torch until that changes.

Every method replaces the `nn.Linear` layers, `lm_head` included. With tied embeddings, the
input embedding keeps its float copy. The result is for inference only: it cannot be saved
with `save_pretrained` or trained.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

logger = logging.getLogger(__name__)

METHODS = ("none", "int8-dynamic", "fp16-dynamic", "int8-weight-only")


class QuantizationError(ValueError):
    """The method cannot be applied to this model (unknown name, wrong device or dtype, missing library)."""


def quantize_for_cpu(model: nn.Module, method: str) -> nn.Module:
    """Quantize `model` in place for CPU inference and return it; `none` returns it untouched.

    Call it after `from_pretrained(...)` and `.eval()`, before any warm-up.
    """
    if method not in METHODS:
        raise QuantizationError(f"quantization must be one of {METHODS}, got {method!r}")
    if method == "none":
        return model
    devices = {p.device.type for p in model.parameters()}
    if devices != {"cpu"}:
        raise QuantizationError(f"quantization {method!r} is for models on the CPU, this one is on {sorted(devices)}")
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    if linears == 0:
        raise QuantizationError(f"quantization {method!r} found no nn.Linear layer to quantize")
    if method == "int8-weight-only":
        model = _int8_weight_only(model)
    else:
        model = _dynamic(model, method)
    logger.info("quantized %d linear layers with %s", linears, method)
    return model


def _dynamic(model: nn.Module, method: str) -> nn.Module:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes != {torch.float32}:
        raise QuantizationError(
            f"quantization {method!r} needs a float32 model (handler.dtype: float32), got {sorted(map(str, dtypes))}"
        )
    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao on every call; see the module docstring.
        for category in (DeprecationWarning, UserWarning):
            warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*deprecated", category=category)
        warnings.filterwarnings("ignore", message=r".*quantize_per_(tensor|channel).*", category=UserWarning)
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        if method == "int8-dynamic":
            return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.float16, inplace=True)


def _int8_weight_only(model: nn.Module) -> nn.Module:
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as error:
        raise QuantizationError(
            "quantization 'int8-weight-only' needs torchao (pip install torchao==0.18.0)"
        ) from error
    quantize_(model, Int8WeightOnlyConfig())
    return model
