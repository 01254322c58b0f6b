"""`dtype: auto` on CPU: time a few decode steps of each candidate weight format, keep the fastest.

No fixed rule is safe on CPU: which format is fastest changes with the CPU, the batch and
the day (docs/bench.md, "Measurements behind the code's choices"). So the worker measures
every candidate this CPU can run at the batch the app serves, and logs the figures:
- fp32, always;
- bf16 where the CPU computes it natively (AVX512-BF16 or AMX; elsewhere it is emulated);
- fp16 weights with fp32 activations (`handler.quantization: fp16-dynamic`, fbgemm's fp16
  GEMM) where torch has fbgemm (x86). Its weights are closer to fp32's than bf16's (10 mantissa
  bits against 7).

Load beside the worker must not flip the choice: it once made a start serve the format that is
slower on a quiet host (issue 29). Other processes only ever add time to a step, so each
candidate is judged by its best step, not its median: one quiet moment per candidate is
enough. The candidates take turns, round after round (A, B, C, A, B, C, ...), so that a burst
of load falls on all of them rather than on one. And the decision is kept per host
(`handler.model.dtype_cache`), so later starts and heals read it back instead of timing again.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from handler.model.dtype_cache import DecisionCache, fingerprint_key
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


PROBED, CACHED = "probe", "cache"


@dataclass(frozen=True)
class DtypeChoice:
    name: str  # a candidate of `candidate_names`
    step_seconds: dict[str, float]  # best seconds per decode step, by candidate
    source: str = PROBED  # timed at this start, or read back from the decision cache

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the activations (and of the KV cache): fp32 under fp16 weights."""
        return torch.float32 if self.name == FP16_WEIGHTS else getattr(torch, self.name)

    def report(self) -> dict[str, object]:
        """What the front's /health shows: the format served, whether it was timed now or read back, the timings."""
        step_ms = {name: round(seconds * 1000, 2) for name, seconds in self.step_seconds.items()}
        return {"chosen": self.name, "source": self.source, "decode_step_ms": step_ms}

    def describe(self) -> str:
        figures = ", ".join(f"{name} {seconds * 1000:.1f} ms" for name, seconds in self.step_seconds.items())
        how = "" if self.source == PROBED else f", {self.source}"
        return f"{self.name} (decode step: {figures}{how})"


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
    """The fastest of `steps` decode steps (prefill excluded) for `batch` rows, EOS never ending a row."""
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
    return min(intervals)


def fastest_cpu_dtype(
    model,
    batch: int,
    steps: int = 3,
    rounds: int = 8,
    min_rounds: int = 3,
    budget_s: float = 20.0,
    names: list[str] | None = None,
) -> tuple[torch.nn.Module, DtypeChoice]:
    """The fp32 model or a copy of it in another candidate format (`names`, default
    `candidate_names()`), whichever decodes fastest here at its best; the others are dropped.

    Each candidate runs once untimed first (allocator and kernel warm-up), then the rounds take
    the candidates in turn. At least `min_rounds` rounds run, so that every candidate gets
    several chances at a quiet moment; after those, the rounds stop once `budget_s` is spent,
    so that a start on a big model or a busy host stays bounded. While it runs, the copies hold
    up to twice the fp32 model's memory.
    """
    started = time.perf_counter()
    candidates = {name: _candidate(model, name) for name in (names or candidate_names())}
    for candidate in candidates.values():
        decode_step_seconds(candidate, batch, 1)
    timings: dict[str, list[float]] = {name: [] for name in candidates}
    for round_number in range(max(rounds, min_rounds)):
        if round_number >= min_rounds and time.perf_counter() - started > budget_s:
            break
        for name, candidate in candidates.items():
            timings[name].append(decode_step_seconds(candidate, batch, steps))
    best = {name: min(values) for name, values in timings.items()}
    winner = min(best, key=lambda name: best[name])
    return candidates[winner], DtypeChoice(winner, best)


def decided_cpu_dtype(
    model, batch: int, cache: DecisionCache | None, fingerprint: dict, names: list[str] | None = None
) -> tuple[torch.nn.Module, DtypeChoice]:
    """The decision kept for this host fingerprint if there is one (nothing is timed), else
    `fastest_cpu_dtype`'s, which is then kept. Without a cache every start times anew."""
    names = names or candidate_names()
    key = fingerprint_key(fingerprint)
    entry = cache.get(key) if cache is not None else None
    if entry is not None and entry["name"] in names:
        seconds = {name: float(value) for name, value in entry["step_seconds"].items()}
        return _candidate(model, entry["name"]), DtypeChoice(entry["name"], seconds, CACHED)
    kept, choice = fastest_cpu_dtype(model, batch, names=names)
    if cache is not None:
        cache.put(key, fingerprint, choice.name, choice.step_seconds)
    return kept, choice
