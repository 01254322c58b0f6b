"""Generation metrics reported through TorchServe's `context.metrics` (Prometheus on port 7082)."""

from __future__ import annotations

from dataclasses import dataclass

from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes

# name, unit, type; declared likewise in metrics.yaml so Prometheus mode exports them.
GENERATION_METRICS = (
    ("PromptTokens", "count", MetricTypes.COUNTER),
    ("GeneratedTokens", "count", MetricTypes.COUNTER),
    ("GenerationTokensPerSecond", "TokensPerSecond", MetricTypes.GAUGE),
    ("TimeToFirstTokenMs", "ms", MetricTypes.GAUGE),
    ("TimePerOutputTokenMs", "ms", MetricTypes.GAUGE),
)
UNITS = {name: (unit, kind) for name, unit, kind in GENERATION_METRICS}


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    generated_tokens: int
    seconds: float
    first_token_seconds: float | None = None


def report(metrics, model_name: str, stats: GenerationStats) -> None:
    """One call per generate: token counts, throughput, and latency of the first and later tokens."""
    values = {"PromptTokens": stats.prompt_tokens, "GeneratedTokens": stats.generated_tokens}
    if stats.seconds > 0 and stats.generated_tokens:
        values["GenerationTokensPerSecond"] = stats.generated_tokens / stats.seconds
    if stats.first_token_seconds is not None:
        values["TimeToFirstTokenMs"] = stats.first_token_seconds * 1000
        if stats.generated_tokens > 1:
            rest = stats.seconds - stats.first_token_seconds
            values["TimePerOutputTokenMs"] = rest * 1000 / (stats.generated_tokens - 1)
    for name, value in values.items():
        unit, kind = UNITS[name]
        dimensions = [Dimension("ModelName", model_name), Dimension("Level", "Model")]
        metrics.add_metric(name, value, unit, None, dimensions, kind)
