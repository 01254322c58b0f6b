"""`dtype: auto` on CPU: time a few decode steps of each candidate weight format, keep the fastest.

No fixed rule is safe on CPU: which format is fastest changes with the CPU, the batch and
the day (docs/bench.md, "Measurements behind the code's choices"). So the worker measures
every candidate this CPU can run at the batch the app serves, and logs the figures:
- fp32, always;
- bf16 where the CPU computes it natively (AVX512-BF16 or AMX; elsewhere it is emulated);
- fp16 weights with fp32 activations (`handler.quantization: fp16-dynamic`, fbgemm's fp16
  GEMM) where torch has fbgemm (x86). Its weights are closer to fp32's than bf16's (10 mantissa
  bits against 7).
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from handler.model.quantization import quantize_for_cpu

logger = logging.getLogger(__name__)

PROMPT_TOKENS = 8
FP16_WEIGHTS = "fp16-dynamic"


def native_bf16_cpu() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX), so bf16 matmuls are not emulated."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def fp16_weights_cpu() -> bool:
    """Whether torch has fbgemm, whose fp16 GEMM `fp16-dynamic` runs on."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def candidate_names() -> list[str]:
    """What `dtype: auto` times on this CPU; fp32 first, the reference the others are made from."""
    return ["float32"] + (["bfloat16"] if native_bf16_cpu() else []) + ([FP16_WEIGHTS] if fp16_weights_cpu() else [])


@dataclass(frozen=True)
class DtypeChoice:
    name: str  # a candidate of `candidate_names`
    step_seconds: dict[str, float]  # median seconds per decode step, by candidate

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the activations (and of the KV cache): fp32 under fp16 weights."""
        return torch.float32 if self.name == FP16_WEIGHTS else getattr(torch, self.name)

    def describe(self) -> str:
        figures = ", ".join(f"{name} {seconds * 1000:.1f} ms" for name, seconds in self.step_seconds.items())
        return f"{self.name} (decode step: {figures})"


def _candidate(model, name: str):
    """The fp32 model itself, or a copy of it in the candidate's format."""
    if name == "float32":
        return model
    if name == FP16_WEIGHTS:
        return quantize_for_cpu(copy.deepcopy(model), FP16_WEIGHTS)
    return copy.deepcopy(model).to(getattr(torch, name))


class _StepClock(StoppingCriteria):
    """Stamps the clock at every generation step; never stops anything."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def decode_step_seconds(model, batch: int, steps: int) -> float:
    """Median seconds of one decode step (prefill excluded) for `batch` rows, EOS never ending a row."""
    vocab = model.config.get_text_config().vocab_size
    ids = torch.arange(batch * PROMPT_TOKENS, device=model.device).remainder(vocab).view(batch, PROMPT_TOKENS)
    clock = _StepClock()
    config = GenerationConfig(max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            generation_config=config,
            stopping_criteria=StoppingCriteriaList([clock]),
        )
    intervals = [later - earlier for earlier, later in zip(clock.stamps, clock.stamps[1:])]
    return statistics.median(intervals)


def fastest_cpu_dtype(
    model, batch: int, steps: int = 4, rounds: int = 2, budget_s: float = 15.0, names: list[str] | None = None
) -> tuple[torch.nn.Module, DtypeChoice]:
    """The fp32 model or a copy of it in another candidate format (`names`, default
    `candidate_names()`), whichever decodes fastest here; the others are dropped.

    Rounds alternate the candidates so that a change in the machine's load hits them alike;
    each runs once untimed first (allocator and kernel warm-up). On a big model or a busy
    host the rounds after the first stop once `budget_s` is spent, so a start stays short.
    While it runs, the copies hold up to twice the fp32 model's memory.
    """
    started = time.perf_counter()
    candidates = {name: _candidate(model, name) for name in (names or candidate_names())}
    for candidate in candidates.values():
        decode_step_seconds(candidate, batch, 1)
    timings: dict[str, list[float]] = {name: [] for name in candidates}
    for round_number in range(rounds):
        if round_number and time.perf_counter() - started > budget_s:
            break
        for name, candidate in candidates.items():
            timings[name].append(decode_step_seconds(candidate, batch, steps))
    medians = {name: statistics.median(values) for name, values in timings.items()}
    winner = min(medians, key=lambda name: medians[name])
    return candidates[winner], DtypeChoice(winner, medians)
