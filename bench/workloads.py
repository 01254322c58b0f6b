"""The request streams the serving benchmark replays: what is asked, how long, and when.

A workload is a fixed list of requests, each with its prompt, its number of new tokens
(sent as both `max_new_tokens` and `min_new_tokens`, so EOS cannot shorten a run) and
its arrival time, an offset in seconds from the start of the run. Everything random
comes from one seeded `random.Random`, so two runs replay the same stream.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# Plain completion prompts (no chat template), sent as the same text to every target.
PROMPTS: tuple[str, ...] = (
    "How to prepare a spanish omelette:",
    "The three most important things to know about volcanoes are",
    "Write a short story about a robot who learns to paint.",
    "Explain, step by step, how a bill becomes a law in the United States.",
    "The history of the bicycle begins in",
    "Here is a recipe for a simple tomato soup:",
    "List some tips for staying focused while studying:",
    "A letter to my future self:",
    "The main differences between cats and dogs as pets are",
    "Describe the water cycle to a ten year old.",
    "Once upon a time, in a village at the edge of a great forest,",
    "The best way to learn a new programming language is",
    "Summary of the causes of the French Revolution:",
    "Why is the sky blue? The short answer is",
    "A travel guide to Lisbon, Portugal:",
    "Five ideas for a rainy weekend at home:",
)


@dataclass(frozen=True)
class BenchRequest:
    index: int
    prompt: str
    new_tokens: int
    arrival_s: float


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    requests: tuple[BenchRequest, ...]

    @property
    def requested_tokens(self) -> int:
        return sum(request.new_tokens for request in self.requests)


def uniform(num_requests: int, new_tokens: int, prompts: tuple[str, ...] = PROMPTS) -> Workload:
    """Equal lengths, everything sent at once: the case static batching handles best."""
    if num_requests < 1 or new_tokens < 1:
        raise ValueError("uniform workload needs num_requests >= 1 and new_tokens >= 1")
    requests = tuple(
        BenchRequest(i, prompts[i % len(prompts)], new_tokens, 0.0) for i in range(num_requests)
    )
    return Workload("uniform", f"{num_requests} x {new_tokens} tokens, all at t=0", requests)


def mixed(
    num_requests: int,
    min_tokens: int,
    max_tokens: int,
    gap_s: float,
    seed: int,
    arrivals: str = "poisson",
    prompts: tuple[str, ...] = PROMPTS,
) -> Workload:
    """Lengths drawn uniformly in [min_tokens, max_tokens], arrivals spread over time.

    `arrivals` is "poisson" (exponential gaps of mean `gap_s`) or "fixed" (one every
    `gap_s`). The first request arrives at t=0.
    """
    if num_requests < 1 or not 1 <= min_tokens <= max_tokens or gap_s < 0:
        raise ValueError("mixed workload needs num_requests >= 1, 1 <= min_tokens <= max_tokens, gap_s >= 0")
    if arrivals not in ("poisson", "fixed"):
        raise ValueError(f"arrivals must be 'poisson' or 'fixed', got {arrivals!r}")
    rng = random.Random(seed)
    lengths = [rng.randint(min_tokens, max_tokens) for _ in range(num_requests)]
    offsets, clock = [], 0.0
    for i in range(num_requests):
        offsets.append(clock)
        if arrivals == "fixed":
            clock += gap_s
        elif gap_s > 0:
            clock += rng.expovariate(1.0 / gap_s)
    order = list(range(num_requests))
    rng.shuffle(order)  # prompt i is not tied to length i
    requests = tuple(
        BenchRequest(i, prompts[order[i] % len(prompts)], lengths[i], round(offsets[i], 4))
        for i in range(num_requests)
    )
    description = (
        f"{num_requests} requests, {min_tokens}-{max_tokens} tokens, "
        f"{arrivals} arrivals every {gap_s:g} s on average, seed {seed}"
    )
    return Workload("mixed", description, requests)
