"""`dtype: auto` on CPU: time a few decode steps in fp32 and in bf16, keep the faster.

No fixed rule is safe on CPU: on one AMX machine bf16 was 1.4-1.8x faster than fp32 at batch
16 and, on another day, 0.84x at batch 1. So where the CPU computes bf16 natively (AVX512-BF16
or AMX), the worker measures both at the batch the app serves and logs the two figures; where
it does not, bf16 is emulated and fp32 is kept without a measurement.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

logger = logging.getLogger(__name__)

PROMPT_TOKENS = 8


def native_bf16_cpu() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX), so bf16 matmuls are not emulated."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    step_seconds: dict[str, float]  # median seconds per decode step, by dtype name

    def describe(self) -> str:
        figures = ", ".join(f"{name} {seconds * 1000:.1f} ms" for name, seconds in self.step_seconds.items())
        return f"{str(self.dtype).removeprefix('torch.')} (decode step: {figures})"


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
    model, batch: int, steps: int = 4, rounds: int = 2, budget_s: float = 15.0
) -> tuple[torch.nn.Module, DtypeChoice]:
    """The fp32 model or a bf16 copy of it, whichever decodes faster here; the loser is dropped.

    Rounds alternate the two dtypes so that a change in the machine's load hits both; each
    dtype runs once untimed first (allocator and kernel warm-up). On a big model or a busy
    host the rounds after the first stop once `budget_s` is spent, so a start stays short.
    """
    started = time.perf_counter()
    candidates = {"float32": model, "bfloat16": copy.deepcopy(model).to(torch.bfloat16)}
    for candidate in candidates.values():
        decode_step_seconds(candidate, batch, 1)
    timings: dict[str, list[float]] = {name: [] for name in candidates}
    for round_number in range(rounds):
        if round_number and time.perf_counter() - started > budget_s:
            break
        for name, candidate in candidates.items():
            timings[name].append(decode_step_seconds(candidate, batch, steps))
    medians = {name: statistics.median(values) for name, values in timings.items()}
    winner = min(medians, key=medians.get)
    choice = DtypeChoice(getattr(torch, winner), medians)
    return candidates[winner], choice
