"""Generation metrics: what each completion reports, whatever server hosts the handler.

The adapter sends them through TorchServe's `context.metrics` (Prometheus on port 7082);
`metrics.yaml` declares the same names, units and kinds so Prometheus mode exports them.
"""

from __future__ import annotations

from dataclasses import dataclass

from handler.decoding.sequence import Completion
from handler.model.dtype_probe import DtypeChoice

# name, unit, kind
GENERATION_METRICS = (
    ("PromptTokens", "count", "counter"),
    ("GeneratedTokens", "count", "counter"),
    ("GenerationTokensPerSecond", "TokensPerSecond", "gauge"),
    ("TimeToFirstTokenMs", "ms", "gauge"),
    ("TimePerOutputTokenMs", "ms", "gauge"),
)
# Reported once per worker start: `dtype: auto`'s decision and the step times behind it, one value
# per candidate, with dimensions Dtype (the candidate), Chosen (true/false) and Source (probe/cache).
DTYPE_METRIC = ("DtypeDecodeStepMs", "ms", "gauge")
# The sequences the worker generates now (the manager's active rows, plus a running generate's
# unfinished rows), sent when it changes; and the requests being served whose client went away
# (counted as the worker hears the cancel; their rows stop at the next decode step).
ACTIVE_ROWS_METRIC = ("ActiveRows", "count", "gauge")
CANCELLED_METRIC = ("CancelledRequests", "count", "counter")
UNITS = {name: (unit, kind) for name, unit, kind in (*GENERATION_METRICS, DTYPE_METRIC, ACTIVE_ROWS_METRIC, CANCELLED_METRIC)}


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    generated_tokens: int
    seconds: float
    first_token_seconds: float | None = None

    @classmethod
    def of(cls, completion: Completion) -> GenerationStats:
        return cls(completion.prompt_tokens, completion.generated_tokens, completion.seconds, completion.first_token_seconds)


def metric_values(stats: GenerationStats) -> dict[str, float]:
    """Token counts, throughput, and latency of the first and later tokens of one completion."""
    values: dict[str, float] = {"PromptTokens": stats.prompt_tokens, "GeneratedTokens": stats.generated_tokens}
    if stats.seconds > 0 and stats.generated_tokens:
        values["GenerationTokensPerSecond"] = stats.generated_tokens / stats.seconds
    if stats.first_token_seconds is not None:
        values["TimeToFirstTokenMs"] = stats.first_token_seconds * 1000
        if stats.generated_tokens > 1:
            rest = stats.seconds - stats.first_token_seconds
            values["TimePerOutputTokenMs"] = rest * 1000 / (stats.generated_tokens - 1)
    return values


def dtype_metric_values(choice: DtypeChoice) -> list[tuple[float, dict[str, str]]]:
    """Each candidate's best decode step at one row plus its best at the probe's batch, in ms, with the dimensions
    that say which one serves and why."""
    return [
        (seconds * 1000, {"Dtype": name, "Chosen": str(name == choice.name).lower(), "Source": choice.source})
        for name, seconds in choice.step_seconds.items()
    ]
