"""The request streams the serving benchmark replays: what is asked, how long, and when.

A workload is a fixed list of requests, each with its prompt, its number of new tokens
(sent as both `max_new_tokens` and `min_new_tokens`, so EOS cannot shorten a run) and
its arrival time, an offset in seconds from the start of the run. Everything random
comes from one seeded `random.Random`, so two runs replay the same stream.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Callable

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
    # The concurrency levels this workload runs at, whatever `--concurrency` says; None: those.
    concurrency: tuple[int, ...] | None = None
    # Makes the requests of the n-th run, for a workload whose prompts must be new at every run
    # (a server's prefix cache would otherwise answer a repeat); None: the same requests each run.
    remake: Callable[[int], tuple[BenchRequest, ...]] | None = field(default=None, compare=False, repr=False)

    @property
    def requested_tokens(self) -> int:
        return sum(request.new_tokens for request in self.requests)

    def for_run(self, run: int) -> Workload:
        """The workload as sent in the `run`-th round (every target of a round gets the same requests)."""
        return self if self.remake is None else replace(self, requests=self.remake(run))

    def levels(self, default: list[int]) -> list[int]:
        return list(self.concurrency) if self.concurrency else default


def uniform(num_requests: int, new_tokens: int, prompts: tuple[str, ...] = PROMPTS) -> Workload:
    """Equal lengths, everything sent at once: the case static batching handles best."""
    if num_requests < 1 or new_tokens < 1:
        raise ValueError("uniform workload needs num_requests >= 1 and new_tokens >= 1")
    requests = tuple(BenchRequest(i, prompts[i % len(prompts)], new_tokens, 0.0) for i in range(num_requests))
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
    for _ in range(num_requests):
        offsets.append(clock)
        if arrivals == "fixed":
            clock += gap_s
        elif gap_s > 0:
            clock += rng.expovariate(1.0 / gap_s)
    order = list(range(num_requests))
    rng.shuffle(order)  # prompt i is not tied to length i
    requests = tuple(
        BenchRequest(i, prompts[order[i] % len(prompts)], lengths[i], round(offsets[i], 4)) for i in range(num_requests)
    )
    description = (
        f"{num_requests} requests, {min_tokens}-{max_tokens} tokens, "
        f"{arrivals} arrivals every {gap_s:g} s on average, seed {seed}"
    )
    return Workload("mixed", description, requests)


# Filler text for long prompts: common words, so that SmolLM2's tokenizer spends about one token
# on each (`WORDS_PER_TOKEN`, checked against it in tests/unit/test_bench_workloads.py).
WORDS = tuple(
    """the of and to in is was for on that with as by at from his her they which this be are or
    have one had not but what all were when we there can an your their said if do will each about
    how up out them then she many some so these would other into has more two time like him see
    could no make than first been its who now people my made over did down only way find use may
    water long little very after words called just where most know get through back much before go
    good new write our used me man too any day same right look think also around another came come
    work three word must because does part even place well such here take why things help put years
    different away again off went old number great tell men say small every found still between name
    should home big give air line set own under read last never us left end along while might next
    sound below saw something thought both few those always looked show large often together asked
    house world going want school important until form food keep children feet land side without boy
    once animals life enough took sometimes four head above kind began almost live page got earth""".split()
)
WORDS_PER_TOKEN = 0.92


def filler(words: int, rng: random.Random) -> str:
    """`words` words drawn from `WORDS`, in sentences of 8 to 16 words."""
    sentences, left = [], words
    while left > 0:
        length = min(left, rng.randint(8, 16))
        chosen = [rng.choice(WORDS) for _ in range(length)]
        sentences.append(" ".join(chosen).capitalize() + ".")
        left -= length
    return " ".join(sentences)


def prefill(num_requests: int, prompt_tokens: int, new_tokens: int, seed: int, concurrency: int = 1) -> Workload:
    """Fresh long prompts: their time to first token is the cost of a prefill.

    Every prompt differs from its first word from every other, in this run and in every other
    run (`remake`), so no prefix cache can answer part of it. Requests go one at a time by
    default, so that one prefill is timed, not a queue of them.
    """
    if num_requests < 1 or prompt_tokens < 1 or new_tokens < 1:
        raise ValueError("prefill workload needs num_requests, prompt_tokens and new_tokens >= 1")
    words = round(prompt_tokens * WORDS_PER_TOKEN)

    def make(run: int) -> tuple[BenchRequest, ...]:
        rng = random.Random(f"prefill-{seed}-{run}")
        return tuple(
            BenchRequest(i, f"Note {run}-{i}. {filler(words, rng)}\nSummary:", new_tokens, 0.0) for i in range(num_requests)
        )

    description = f"{num_requests} fresh prompts of ~{prompt_tokens} tokens, {new_tokens} new tokens, c={concurrency}"
    return Workload("prefill", description, make(0), (concurrency,), make)


def shared_prefix(
    num_requests: int,
    prefix_tokens: int,
    new_tokens: int,
    seed: int,
    concurrency: tuple[int, ...] = (1, 8),
    questions: tuple[str, ...] = PROMPTS,
) -> Workload:
    """One long system prompt, the same for every request, then a different question each.

    This is the case a prefix cache is for: after the first request, only the question
    needs a prefill. All requests arrive at t=0, so at c users it is a closed loop of c.
    """
    if num_requests < 1 or prefix_tokens < 1 or new_tokens < 1:
        raise ValueError("shared-prefix workload needs num_requests, prefix_tokens and new_tokens >= 1")
    system = "You are a helpful assistant. Background notes: " + filler(
        round(prefix_tokens * WORDS_PER_TOKEN), random.Random(f"prefix-{seed}")
    )
    requests = tuple(
        BenchRequest(i, f"{system}\n\nQuestion: {questions[i % len(questions)]}\nAnswer:", new_tokens, 0.0)
        for i in range(num_requests)
    )
    description = f"{num_requests} questions after one ~{prefix_tokens}-token system prompt, {new_tokens} new tokens each"
    return Workload("shared-prefix", description, requests, tuple(concurrency))
