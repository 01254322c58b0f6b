"""Post-load quantization for CPU serving (`handler.quantization` in model-config.yaml).

Decoding one stream on CPU reads every weight once per token, so memory bandwidth bounds
it, and fewer bytes per weight is what speeds it up. docs/bench.md ("The quantized CPU path")
has each method's speed and quality, measured.

- `fp16-dynamic`: torch's dynamic quantization to float16 weights (fbgemm's fp16 GEMM,
  activations stay fp32); its greedy text equals fp32's.
- `int4-dynamic`: for weights that already sit on a 4-bit grid, as those of a model converted
  from a Q4_0 or Q4_1 GGUF do (`holds_4bit_weights`). Each linear layer's weight is packed for
  torch's CPU int4 matmul kernel, in groups of `INT4_GROUP_SIZE` input features with the grid's
  own scale and offset (in bf16, as the kernel takes them), so the weights are the model's own up
  to that rounding. Activations stay fp32 and are rounded to bf16 only on their way into each
  matmul. A decode step reads a quarter of fp16's weight bytes. Each layer also keeps its
  weights in 16 bits for calls of more than `INT4_MAX_ROWS` rows (a prompt's prefill), which
  are bound by arithmetic, where the int4 kernel falls behind: bf16 for oneDNN's GEMM on a CPU
  with bf16 instructions (AMX or AVX512-BF16), else fp16 for fbgemm's, as `fp16-dynamic` does.
  Those layers take a quarter more memory than under `fp16-dynamic`. A row decoded on a step
  that also prefills another's prompt is thus computed with 16-bit weights, on a narrower step
  with int4 ones: its logits differ by that rounding, so its greedy text can change with what
  runs beside it. The output projection is not packed (GGUF files keep it finer than 4 bits):
  its calls of up to `OUTPUT_FP16_MAX_ROWS` rows take fp16 weights (fbgemm); on a CPU with bf16
  instructions, wider ones (a decode step of many rows) take a bf16 copy, whose GEMM gains on
  fbgemm's as rows are added, at the cost of that copy's memory and of bf16's coarser rounding
  of the logits, so a greedy row's text can also change with how many rows its step decodes.
  On a CPU with native bf16, `dtype: auto` times `int4-dynamic` beside the others when the
  weights hold the grid (`handler.model.dtype_probe`).
- `int8-dynamic`: torch's dynamic quantization to int8 weights (one scale per output channel).
  Activations are quantized per call, per tensor, to 7 bits (fbgemm's `reduce_range` on AVX2).
  The fastest and the lossiest. Worse for serving, the activation scale is taken over the whole
  batch, so a request's greedy text changes with its batch neighbours (and with padding). Use it
  for experiments, not for serving.
- `int8-weight-only`: torchao's `Int8WeightOnlyConfig` (the tensors transformers' `TorchAoConfig`
  makes). Quality stays close to fp32, and weights take a quarter of fp32's memory. In eager mode
  it turns the int8 weight back into float at every matmul, so on CPU it is slower than fp32.
  Only `torch.compile` makes it fast, and compiling takes minutes.
- `int4-weight-only`: torchao's `PrototypeInt4WeightOnlyConfig` (int4 weights in groups of
  `INT4_GROUP_SIZE` input features, one bf16 scale and zero point per group, packed for the
  CPU's int4 matmul kernel; activations stay bf16). It needs `handler.dtype: bfloat16`. It
  reads a quarter of bf16's bytes per token, which is what one stream is bound by; at many
  rows the matmuls are compute-bound and it gains nothing (`make bench-single-stream` has the
  variant `bf16+int4-weight-only`). In eager mode Python and dispatch take most of a step, so
  it is fast only with `handler.compile`. Groups of 32, as llama.cpp's 4-bit formats use:
  groups of 64 moved the next-token distribution much further from fp32's. The output
  projection stays bf16: every logit comes from it (llama.cpp keeps it in 8 bits), and
  quantizing it cost most of the quality that remained. Under `handler.compile` it is int8
  weight-only instead (as `int8-weight-only`, one scale per output channel): compiled, that
  reads half of bf16's bytes at the same quality; in eager mode it would be slower than bf16.
  A layer whose input size the group size does not divide stays bf16; the log names each one.

`torch.ao.quantization` warns that it is deprecated in favour of torchao. But torchao's
counterparts are several times slower than fp32 in eager mode on CPU, so the two dynamic
methods stay on torch until that changes.

Every method replaces the `nn.Linear` layers, `lm_head` included (int4: those it fits, less
`lm_head`). With tied embeddings, the input embedding keeps its float copy. The result is for
inference only: it cannot be saved with `save_pretrained` or trained.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from handler.settings import QUANTIZATIONS as METHODS

logger = logging.getLogger(__name__)

INT4_GROUP_SIZE = 32
INT4_DYNAMIC = "int4-dynamic"
# `int4-dynamic`'s int4 kernel takes calls of up to this many rows; wider ones go to 16-bit weights.
INT4_MAX_ROWS = 16
# `int4-dynamic`'s output projection takes calls of up to this many rows in fp16; wider ones in bf16, where native.
OUTPUT_FP16_MAX_ROWS = 8
# The int4 packing takes output sizes that are multiples of this.
INT4_OUTPUT_MULTIPLE = 16
# A weight is on a group's 4-bit grid when it is within this share of a grid step of a grid point.
GRID_TOLERANCE = 1e-3


class QuantizationError(ValueError):
    """The method cannot be applied to this model (unknown name, wrong device or dtype, missing library)."""


def quantize_for_cpu(model: nn.Module, method: str, compiled: bool = False) -> nn.Module:
    """Quantize `model` in place for CPU inference and return it; `none` returns it untouched.

    Call it after `from_pretrained(...)` and `.eval()`, before any warm-up. `compiled`: the model
    will run through `torch.compile` (`handler.compile`), which changes what is fastest.
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
    elif method == "int4-weight-only":
        linears = _int4_weight_only(model, compiled)
    elif method == INT4_DYNAMIC:
        linears = _int4_dynamic(model)
    else:
        model = _dynamic(model, method)
    logger.info("quantized %d linear layers with %s", linears, method)
    return model


def _require_dtype(model: nn.Module, method: str, dtype: torch.dtype) -> None:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes != {dtype}:
        name = str(dtype).removeprefix("torch.")
        raise QuantizationError(
            f"quantization {method!r} needs a {name} model (handler.dtype: {name}), got {sorted(map(str, dtypes))}"
        )


def _dynamic(model: nn.Module, method: str) -> nn.Module:
    _require_dtype(model, method, torch.float32)
    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao on every call; see the module docstring.
        for category in (DeprecationWarning, UserWarning):
            warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*deprecated", category=category)
        warnings.filterwarnings("ignore", message=r".*quantize_per_(tensor|channel).*", category=UserWarning)
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        if method == "int8-dynamic":
            return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
        return _fp16_weights(model)


def _fp16_weights(model: nn.Module) -> nn.Module:
    """What ``quantize_dynamic(model, {nn.Linear}, dtype=torch.float16)`` makes, the same modules
    packing the same weights, in a third of its time: torch's ``Linear(in, out)`` packs a zero
    placeholder of the full size before the real weight is packed (and observes it first), and
    that was most of a worker's start, and so of a heal, on a small CPU host. Each layer is built
    at 1x1 here, then given its real size and weight."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    for name, linear in [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]:
        packed = DynamicLinear(1, 1, dtype=torch.float16)
        packed.in_features, packed.out_features = linear.in_features, linear.out_features
        packed.set_weight_bias(linear.weight.detach().float(), None if linear.bias is None else linear.bias.detach())
        packed.train(linear.training)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, packed)
    return model


def _output_projection(model: nn.Module) -> nn.Module | None:
    """The layer that turns hidden states into logits, where the model names one."""
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def _int8_weight_only(model: nn.Module, only: nn.Module | None = None) -> nn.Module:
    """Every linear layer, or `only` that one."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as error:
        raise QuantizationError("quantization 'int8-weight-only' needs torchao (pip install torchao==0.18.0)") from error
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=None if only is None else lambda module, name: module is only)
    return model


def _int4_weight_only(model: nn.Module, compiled: bool) -> int:
    """Quantizes every linear layer the group size fits, less the output projection (int8 if
    `compiled`), and names the others; returns how many it quantized."""
    _require_dtype(model, "int4-weight-only", torch.bfloat16)
    try:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import quantize_
    except ImportError as error:
        raise QuantizationError("quantization 'int4-weight-only' needs torchao (pip install torchao==0.18.0)") from error
    output = _output_projection(model)
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear) and module is not output}
    unfit = sorted(name for name, module in linears.items() if module.in_features % INT4_GROUP_SIZE)
    if len(unfit) == len(linears):
        raise QuantizationError(
            f"quantization 'int4-weight-only' fits no linear layer: no input size is a multiple of {INT4_GROUP_SIZE}"
        )
    if unfit:
        logger.warning(
            "int4-weight-only keeps %d linear layers in bf16, their input size not a multiple of %d: %s",
            len(unfit), INT4_GROUP_SIZE, ", ".join(unfit),
        )  # fmt: skip
    fitting = {id(module) for name, module in linears.items() if name not in unfit}
    quantize_(
        model,
        PrototypeInt4WeightOnlyConfig(group_size=INT4_GROUP_SIZE),
        filter_fn=lambda module, name: id(module) in fitting,
    )
    if compiled and isinstance(output, nn.Linear):
        _int8_weight_only(model, only=output)
        return len(fitting) + 1
    return len(fitting)


def _grid(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each group's 16-level grid from its smallest to its largest weight: the level of every
    weight (out, in), and each group's step and smallest value (out, groups)."""
    out_features, in_features = weight.shape
    groups = weight.float().view(out_features, in_features // INT4_GROUP_SIZE, INT4_GROUP_SIZE)
    low, high = groups.amin(-1), groups.amax(-1)
    step = ((high - low) / 15).clamp_min(torch.finfo(torch.float32).tiny)
    levels = ((groups - low[..., None]) / step[..., None]).round().clamp(0, 15)
    return levels.view(out_features, in_features), step, low


def _int4_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers `int4-dynamic` packs: every one whose sizes the kernel takes (input a multiple of
    the group size, output a multiple of `INT4_OUTPUT_MULTIPLE`), but the output projection."""
    output = _output_projection(model)
    return {
        name: module
        for name, module in model.named_modules()
        if type(module) is nn.Linear
        and module is not output
        and module.in_features % INT4_GROUP_SIZE == 0
        and module.out_features % INT4_OUTPUT_MULTIPLE == 0
    }


def holds_4bit_weights(model: nn.Module) -> bool:
    """Whether every layer `int4-dynamic` would pack already holds 4-bit weights (a grid of 16
    levels per group of `INT4_GROUP_SIZE`), so packing them loses only the bf16 rounding of each
    group's scale and offset."""
    layers = _int4_layers(model)
    if not layers:
        return False
    with torch.no_grad():
        for layer in layers.values():
            levels, step, low = _grid(layer.weight)
            groups = levels.view(*step.shape, INT4_GROUP_SIZE)
            error = (groups * step[..., None] + low[..., None] - layer.weight.float().view_as(groups)).abs()
            if bool((error > GRID_TOLERANCE * step[..., None]).any()):
                return False
    return True


class Int4Linear(nn.Module):
    """A linear layer over int4 weights packed for torch's CPU kernel; fp32 in and out.

    With `wide` (the same weights in another layer), calls of more than `INT4_MAX_ROWS` rows go
    to it: the int4 kernel wins where a step reads the weights for few rows, and falls behind
    a 16-bit GEMM on a prompt's prefill, which is bound by arithmetic instead."""

    def __init__(self, linear: nn.Linear, wide: nn.Module | None = None):
        super().__init__()
        self.wide = wide
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            levels, step, low = _grid(linear.weight)
            # The kernel reads a weight as (level - 8) * scale + zero.
            scales_and_zeros = torch.stack([step, low + 8 * step], dim=-1).transpose(0, 1).contiguous()
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels.to(torch.int32), 2))
            self.register_buffer("scales_and_zeros", scales_and_zeros.to(torch.bfloat16))
            self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = self._wide_for(x)
        if wide is not None:
            return wide(x)
        out = self._packed_product(x).to(x.dtype)
        return out if self.bias is None else out + self.bias

    def added_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`residual + self(x)`, one cast fewer: the add widens the kernel's bf16 output exactly, as the cast would."""
        wide = self._wide_for(x)
        if wide is not None:
            return residual + wide(x)
        out = self._packed_product(x)
        return residual + (out if self.bias is None else out + self.bias)

    def _wide_for(self, x: torch.Tensor) -> nn.Module | None:
        """The 16-bit layer that takes `x` instead, where `x` has more than `INT4_MAX_ROWS` rows."""
        return self.wide if self.wide is not None and x.numel() > INT4_MAX_ROWS * self.in_features else None

    def _packed_product(self, x: torch.Tensor) -> torch.Tensor:
        """The int4 kernel's product, still in bf16, shaped as `x` with `out_features` last."""
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch._weight_int4pack_mm_for_cpu(rows, self.packed, INT4_GROUP_SIZE, self.scales_and_zeros)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={INT4_GROUP_SIZE}"


class Bf16Linear(nn.Module):
    """A linear layer over bf16 weights, fp32 in and out: oneDNN's bf16 GEMM, on AMX tiles where the CPU has them."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach().to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)
        return out if self.bias is None else out + self.bias


def native_bf16_cpu() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX), so bf16 matmuls are not emulated."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


class RowSplitLinear(nn.Module):
    """One linear layer held twice: calls of up to `max_narrow_rows` rows go to `narrow`, wider ones to `wide`."""

    def __init__(self, narrow: nn.Module, wide: nn.Module, max_narrow_rows: int):
        super().__init__()
        self.narrow, self.wide, self.max_narrow_rows = narrow, wide, max_narrow_rows
        self.in_features = wide.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.numel() > self.max_narrow_rows * self.in_features
        return self.wide(x) if wide else self.narrow(x)


def _wide_layer(linear: nn.Linear) -> nn.Module:
    """The same weights in 16 bits, for `Int4Linear`'s wide calls: bf16 where the CPU computes in it, else fp16."""
    return Bf16Linear(linear) if native_bf16_cpu() else _fp16_weights(nn.Sequential(linear))[0]


def _int4_dynamic(model: nn.Module) -> int:
    """Packs the layers `_int4_layers` names, then gives the rest fp16 weights; returns how many it packed."""
    _require_dtype(model, INT4_DYNAMIC, torch.float32)
    layers = _int4_layers(model)
    if not layers:
        raise QuantizationError(f"quantization {INT4_DYNAMIC!r} fits no linear layer but the output projection")
    for name, linear in layers.items():
        parent, _, leaf = name.rpartition(".")
        wide = _wide_layer(linear)
        setattr(model.get_submodule(parent), leaf, Int4Linear(linear, wide).train(linear.training))
    output = _output_projection(model)
    _dynamic(model, "fp16-dynamic")
    if type(output) is nn.Linear and native_bf16_cpu():
        model.set_output_embeddings(RowSplitLinear(_output_projection(model), Bf16Linear(output), OUTPUT_FP16_MAX_ROWS))
    return len(layers)
