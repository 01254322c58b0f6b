"""Per-request records and the summary of one run (one target, one workload, one concurrency)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence


@dataclass
class RequestResult:
    """What one request saw. Times are seconds; `sent_s` and `done_s` count from the run's start.

    `ttft_s` and `latency_s` count from the moment the request was sent, so the client-side
    wait for a free slot (`queued_s`) is reported apart, not hidden in them.
    `tokens_source` says where `generated_tokens` comes from: "reported" by the server,
    "counted" from streamed chunks, or "requested" when neither was available.
    """

    index: int
    new_tokens: int
    sent_s: float = 0.0
    done_s: float = 0.0
    queued_s: float = 0.0
    ttft_s: float | None = None
    latency_s: float | None = None
    generated_tokens: int = 0
    tokens_source: str = "requested"
    finish_reason: str | None = None
    text: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self, keep_text: bool = False) -> dict:
        record = asdict(self)
        if not keep_text:
            record["text"] = record["text"][:80]
        return record


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(results: Iterable[RequestResult]) -> dict:
    """Aggregate tokens/s over the run's span (first send to last answer), and latency percentiles.

    `short` counts answered requests that got fewer tokens than asked (a server deadline, an
    end-of-sequence token that was not blocked): their latency is not comparable.
    """
    results = list(results)
    ok = [r for r in results if r.ok]
    summary = {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "generated_tokens": sum(r.generated_tokens for r in ok),
        "short": sum(r.generated_tokens < r.new_tokens for r in ok),
        "wall_s": None,
        "tokens_per_s": None,
        "ttft_p50_s": None,
        "ttft_p95_s": None,
        "ttft_mean_s": None,
        "latency_p50_s": None,
        "latency_p95_s": None,
        "latency_mean_s": None,
        "queued_mean_s": None,
        "tokens_sources": sorted({r.tokens_source for r in ok}),
        "errors": sorted({r.error for r in results if r.error})[:5],
    }
    if not ok:
        return summary
    wall = max(r.done_s for r in ok) - min(r.sent_s for r in results)
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    latencies = [r.latency_s for r in ok if r.latency_s is not None]
    summary.update(
        wall_s=wall,
        tokens_per_s=summary["generated_tokens"] / wall if wall > 0 else None,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p95_s=percentile(ttfts, 95),
        ttft_mean_s=sum(ttfts) / len(ttfts) if ttfts else None,
        latency_p50_s=percentile(latencies, 50),
        latency_p95_s=percentile(latencies, 95),
        latency_mean_s=sum(latencies) / len(latencies) if latencies else None,
        queued_mean_s=sum(r.queued_s for r in ok) / len(ok),
    )
    return summary
