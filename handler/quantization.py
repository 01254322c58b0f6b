"""Post-load quantization for CPU serving (`handler.quantization` in model-config.yaml).

Decoding one stream on CPU reads every weight once per token, so it is bound by memory
bandwidth: fewer bytes per weight is what speeds it up. What was measured on torch
2.13 CPU (SmolLM2-135M, 2 cores; figures in docs/bench.md):

- `int8-dynamic`: torch's own dynamic quantization (`torch.ao.quantization.quantize_dynamic`):
  int8 weights with one scale per output channel, activations quantized on the fly, fbgemm
  kernels. The fastest that works here, about 1.8-2x fp32 for one stream. It needs an fp32
  model. `torch.ao.quantization` warns that it is deprecated in favour of torchao, but
  torchao's counterpart (`Int8DynamicActivationInt8WeightConfig`) runs 3-25x slower than fp32
  in eager mode on CPU, so this stays until that changes.
- `int8-weight-only`: torchao's `Int8WeightOnlyConfig` (the same tensors transformers'
  `TorchAoConfig` makes). It works with fp32 or bf16 and keeps activations in float, but in eager
  mode it turns the int8 weight back into float at every matmul: on CPU it is about 0.6x fp32.
  It only pays off under `torch.compile`, which took minutes to compile here. It halves weight
  memory, which is its use.

Both replace `nn.Linear` layers, `lm_head` included (with tied embeddings the input embedding
keeps its float copy). The result is for inference only: it cannot be saved with
`save_pretrained` or trained.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

logger = logging.getLogger(__name__)

METHODS = ("none", "int8-dynamic", "int8-weight-only")


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
    if method == "int8-dynamic":
        model = _int8_dynamic(model)
    else:
        model = _int8_weight_only(model)
    logger.info("quantized %d linear layers with %s", linears, method)
    return model


def _int8_dynamic(model: nn.Module) -> nn.Module:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes != {torch.float32}:
        raise QuantizationError(
            f"quantization 'int8-dynamic' needs a float32 model (handler.dtype: float32), got {sorted(map(str, dtypes))}"
        )
    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao on every call; see the module docstring.
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*", category=UserWarning)
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)


def _int8_weight_only(model: nn.Module) -> nn.Module:
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as error:
        raise QuantizationError(
            "quantization 'int8-weight-only' needs torchao (pip install torchao==0.18.0 --no-deps)"
        ) from error
    quantize_(model, Int8WeightOnlyConfig())
    return model
