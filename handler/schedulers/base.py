"""The one interface every scheduler implements, and the one place that routes a prompt.

A scheduler turns prompts into completions: `await scheduler.complete(prompts, sink)` gives,
for each prompt in order, its `num_return_sequences` completions, and sends the new text of
every prompt that asked to stream through `sink(prompt_index, sequence, text)`, on the
caller's event loop. A scheduler declares in `honours` the parameters it serves exactly; a
parameter left at its default needs no honouring. `Router` hands each prompt to the first of
its schedulers that honours every parameter the prompt sets, so a parameter one scheduler
cannot serve is served by another, never dropped.

Each scheduler class also names its strategies in `capabilities` (strategy name: the
allow-list of `GenerationParams` fields that strategy serves), and `honours` is their union.
The lists name their fields one by one, never "every parameter minus ...": a new field is
honoured nowhere until someone writes the code and decides where it goes. `REFUSED` holds
the fields `params.verify_params` refuses whenever they are set, so no scheduler sees them.
tests/unit/test_capabilities.py holds this: every field is claimed by a strategy or refused,
and every claim has a test marked `@pytest.mark.honours(strategy, field, ...)` that shows
its effect on that strategy.
"""

from __future__ import annotations

import asyncio
from dataclasses import fields
from typing import Callable, Protocol, Sequence

from handler.decoding.sequence import Completion
from handler.params import GenerationParams
from handler.pipeline.prompts import Prompt

# (prompt index, sequence index, new text) for the prompts that stream.
ChunkSink = Callable[[int, int, str], None]
DEFAULTS = GenerationParams()
# contrastive search left transformers 5 for Hub code, which this server does not run
REFUSED = frozenset({"penalty_alpha"})


class Scheduler(Protocol):
    honours: frozenset[str]

    async def complete(self, prompts: list[Prompt], sink: ChunkSink | None = None) -> list[list[Completion]]: ...


def unhonoured(params: GenerationParams, honours: frozenset[str]) -> str | None:
    """The first parameter `params` sets away from its default that `honours` lacks, or None."""
    for field in fields(GenerationParams):
        if field.name not in honours and getattr(params, field.name) != getattr(DEFAULTS, field.name):
            return field.name
    return None


def assign(prompts: Sequence[Prompt], capabilities: Sequence[frozenset[str]]) -> list[list[int]]:
    """Each prompt's index, grouped under the first capability set that honours all its parameters."""
    groups: list[list[int]] = [[] for _ in capabilities]
    for index, prompt in enumerate(prompts):
        choice = next((n for n, honours in enumerate(capabilities) if unhonoured(prompt.params, honours) is None), None)
        if choice is None:
            raise ValueError(f"no scheduler honours {unhonoured(prompt.params, capabilities[-1])}")
        groups[choice].append(index)
    return groups


def subset_sink(sink: ChunkSink | None, indices: list[int]) -> ChunkSink | None:
    """A sink for a subset of the prompts, reporting each chunk under the prompt's index in the whole."""
    if sink is None:
        return None
    return lambda position, sequence, text: sink(indices[position], sequence, text)


class Router:
    """Several schedulers behind the one interface, in order of preference."""

    def __init__(self, schedulers: Sequence[Scheduler]):
        self.schedulers = list(schedulers)
        self.honours = frozenset().union(*(s.honours for s in self.schedulers))

    async def complete(self, prompts: list[Prompt], sink: ChunkSink | None = None) -> list[list[Completion]]:
        groups = assign(prompts, [s.honours for s in self.schedulers])
        work = [
            (indices, asyncio.ensure_future(scheduler.complete([prompts[i] for i in indices], subset_sink(sink, indices))))
            for scheduler, indices in zip(self.schedulers, groups)
            if indices
        ]
        try:
            await asyncio.gather(*(task for _, task in work))
        except BaseException:
            for _, task in work:
                task.cancel()
            raise
        results: list[list[Completion]] = [[] for _ in prompts]
        for indices, task in work:
            for index, completions in zip(indices, task.result()):
                results[index] = completions
        return results
