"""`dtype: auto` on CPU: time a few decode steps of each candidate weight format, keep the fastest.

No fixed rule is safe on CPU: which format is fastest changes with the CPU, the batch and
the day (docs/bench.md, "Measurements behind the code's choices"). So the worker measures
every candidate this CPU can run, at one row and at the batch the app serves, and logs the
figures. A candidate's figure is its step at one row plus its step at the batch: a format that
only ties at the batch but reads fewer bytes per token wins for the lone user, and a near tie
at the batch alone would let noise choose. The candidates:
- fp32, always;
- bf16 where the CPU computes it natively (AVX512-BF16 or AMX; elsewhere it is emulated);
- fp16 weights with fp32 activations (`handler.quantization: fp16-dynamic`, fbgemm's fp16
  GEMM) where torch has fbgemm (x86). Its weights are closer to fp32's than bf16's (10 mantissa
  bits against 7).
- int4 weights with fp32 activations (`handler.quantization: int4-dynamic`) where the CPU has
  native bf16 and the model's weights already sit on 4-bit grids (a model converted from a Q4
  GGUF): packing them keeps the model's own weights, and only bf16 rounding (of each group's
  scale and offset, and of the activations on their way into each matmul) departs from fp32
  (docs/bench.md has its measured quality).

Load beside the worker must not flip the choice: it once made a start serve the format that is
slower on a quiet host (issue 29). Other processes only ever add time to a step, so each
candidate is judged by its best step, not its median: one quiet moment per candidate is
enough. The candidates take turns, round after round (A, B, C, A, B, C, ...), so that a burst
of load falls on all of them rather than on one. And the decision is kept per host
(`handler.model.dtype_cache`), so later starts and heals read it back instead of timing again.

Under heavy contention even best-of-turns can mislead, since load slows the candidates unevenly
(docs/bench.md), and a kept decision would then stay wrong. So the probe also measures how much of
the host's CPUs other processes used while it ran (`others_share`, from /proc/stat); a decision
taken above `QUIET_SHARE` is provisional: the next first start of a TorchServe times the
candidates again and keeps the decision taken under less contention. Heals never re-time.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from handler.model.dtype_cache import DecisionCache, fingerprint_key
from handler.model.quantization import INT4_DYNAMIC, holds_4bit_weights, native_bf16_cpu, quantize_for_cpu

logger = logging.getLogger(__name__)

PROMPT_TOKENS = 8
FP16_WEIGHTS = "fp16-dynamic"
# Above this share of the host's CPUs busy with other processes during the probe, its decision is provisional.
QUIET_SHARE = 0.25
# /proc/stat's "cpu" columns that count as busy: user, nice, system, irq, softirq, steal.
BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)


def cpu_snapshot(stat: Path = Path("/proc/stat")) -> tuple[float, float, float] | None:
    """(the host's busy CPU seconds, this process's CPU seconds, the monotonic clock); None without /proc/stat."""
    try:
        columns = stat.read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    busy = sum(int(columns[index]) for index in BUSY_COLUMNS if index < len(columns))
    return busy / os.sysconf("SC_CLK_TCK"), time.process_time(), time.monotonic()


def others_share(before: tuple[float, float, float] | None, after: tuple[float, float, float] | None) -> float | None:
    """The share of the host's CPUs that other processes kept busy between two snapshots (0 to 1)."""
    if before is None or after is None or after[2] <= before[2]:
        return None
    others = (after[0] - before[0]) - (after[1] - before[1])
    return round(min(1.0, max(0.0, others / ((after[2] - before[2]) * (os.cpu_count() or 1)))), 3)


def fp16_weights_cpu() -> bool:
    """Whether torch has fbgemm, whose fp16 GEMM `fp16-dynamic` runs on."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def candidate_names(model=None) -> list[str]:
    """What `dtype: auto` times on this CPU (for `model`, where given); fp32 first, the reference
    the others are made from."""
    names = ["float32"] + (["bfloat16"] if native_bf16_cpu() else []) + ([FP16_WEIGHTS] if fp16_weights_cpu() else [])
    if model is not None and native_bf16_cpu() and fp16_weights_cpu() and holds_4bit_weights(model):
        names.append(INT4_DYNAMIC)
    return names


PROBED, CACHED = "probe", "cache"


@dataclass(frozen=True)
class DtypeChoice:
    name: str  # a candidate of `candidate_names`
    step_seconds: dict[str, float]  # by candidate, its best decode step at one row plus its best at the batch
    source: str = PROBED  # timed at this start, or read back from the decision cache
    # The share of the host's CPUs other processes used while it was timed; None where unknown.
    contention: float | None = None

    @property
    def provisional(self) -> bool:
        """Timed while other work held the CPUs (or unknown): the next first start times again."""
        return self.contention is None or self.contention > QUIET_SHARE

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the activations (and of the KV cache): fp32 under fp16 or int4 weights."""
        return torch.float32 if self.name in (FP16_WEIGHTS, INT4_DYNAMIC) else getattr(torch, self.name)

    def report(self) -> dict[str, object]:
        """What the front's /health shows: the format served, whether it was timed now or read back, the timings."""
        step_ms = {name: round(seconds * 1000, 2) for name, seconds in self.step_seconds.items()}
        return {"chosen": self.name, "source": self.source, "decode_step_ms": step_ms, "contention": self.contention}

    def describe(self) -> str:
        figures = ", ".join(f"{name} {seconds * 1000:.1f} ms" for name, seconds in self.step_seconds.items())
        how = "" if self.source == PROBED else f", {self.source}"
        busy = "unknown" if self.contention is None else f"{self.contention:.0%}"
        return (
            f"{self.name} (decode steps, one row plus the batch: {figures}{how};"
            f" other processes' share of the CPUs meanwhile: {busy})"
        )


def _candidate(model, name: str):
    """The fp32 model itself, or a copy of it in the candidate's format."""
    if name == "float32":
        return model
    if name in (FP16_WEIGHTS, INT4_DYNAMIC):
        return quantize_for_cpu(copy.deepcopy(model), name)
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
    `candidate_names()`), whichever decodes fastest here at its best, its best step at one row
    and its best at `batch` rows added; the others are dropped.

    Each candidate runs once untimed first (allocator and kernel warm-up), then the rounds take
    the candidates in turn. At least `min_rounds` rounds run, so that every candidate gets
    several chances at a quiet moment; after those, the rounds stop once `budget_s` is spent,
    so that a start on a big model or a busy host stays bounded. While it runs, the copies hold
    up to twice the fp32 model's memory.
    """
    started = time.perf_counter()
    before = cpu_snapshot()
    candidates = {name: _candidate(model, name) for name in (names or candidate_names())}
    sizes = sorted({1, batch})
    for candidate in candidates.values():
        for size in sizes:
            decode_step_seconds(candidate, size, 1)
    timings: dict[tuple[str, int], list[float]] = {(name, size): [] for name in candidates for size in sizes}
    for round_number in range(max(rounds, min_rounds)):
        if round_number >= min_rounds and time.perf_counter() - started > budget_s:
            break
        for name, candidate in candidates.items():
            for size in sizes:
                timings[name, size].append(decode_step_seconds(candidate, size, steps))
    best = {name: sum(min(timings[name, size]) for size in sizes) for name in candidates}
    winner = min(best, key=lambda name: best[name])
    return candidates[winner], DtypeChoice(winner, best, contention=others_share(before, cpu_snapshot()))


def decided_cpu_dtype(
    model,
    batch: int,
    cache: DecisionCache | None,
    fingerprint: dict,
    names: list[str] | None = None,
    retime_provisional: bool = True,
) -> tuple[torch.nn.Module, DtypeChoice]:
    """The decision kept for this host fingerprint if there is one (nothing is timed), else
    `fastest_cpu_dtype`'s, which is then kept. Without a cache every start times anew.

    A kept decision that is provisional (timed under contention, or before contention was
    measured) is timed again when `retime_provisional` (a first start, not a heal), and the
    decision taken under less contention is kept."""
    names = names or candidate_names()
    key = fingerprint_key(fingerprint)
    entry = cache.get(key) if cache is not None else None
    kept_choice = None
    if entry is not None and entry["name"] in names:
        seconds = {name: float(value) for name, value in entry["step_seconds"].items()}
        kept_choice = DtypeChoice(entry["name"], seconds, CACHED, entry.get("contention"))
        if not (kept_choice.provisional and retime_provisional):
            return _candidate(model, kept_choice.name), kept_choice
        logger.info("the kept dtype decision was taken under contention (%s): timing again", kept_choice.describe())
    kept, choice = fastest_cpu_dtype(model, batch, names=names)
    if kept_choice is not None and (choice.contention is None or (kept_choice.contention or 1.0) < choice.contention):
        return _candidate(model, kept_choice.name), kept_choice
    if cache is not None:
        cache.put(key, fingerprint, choice.name, choice.step_seconds, choice.contention)
    return kept, choice
