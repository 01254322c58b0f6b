"""The routing rule: each prompt goes to the first scheduler that honours every parameter it sets."""

import asyncio

import pytest

from handler.decoding.sequence import Completion
from handler.decoding.stopping import FinishReason
from handler.params import PARAMETER_NAMES, GenerationParams
from handler.pipeline.prompts import Prompt
from handler.schedulers.base import Router, assign, unhonoured

EVERYTHING = frozenset(PARAMETER_NAMES)


class Echo:
    """A scheduler that completes each prompt with its own text and streams it, to see where prompts went."""

    def __init__(self, name: str, honours: frozenset[str]):
        self.name, self.honours, self.seen = name, honours, []

    async def complete(self, prompts, sink=None):
        self.seen.append([p.text for p in prompts])
        for index, prompt in enumerate(prompts):
            if sink:
                sink(index, 0, f"{self.name}:{prompt.text}")
        return [[Completion(f"{self.name}:{p.text}", FinishReason.LENGTH, 1, 1)] for p in prompts]


def prompt(text: str, **params) -> Prompt:
    return Prompt(text, (1,), GenerationParams(**params))


def test_a_parameter_at_its_default_needs_no_honouring():
    assert unhonoured(GenerationParams(seed=None, num_beams=1), frozenset()) is None
    assert unhonoured(GenerationParams(seed=3), EVERYTHING - {"seed"}) == "seed"


def test_the_first_scheduler_that_honours_a_prompt_takes_it():
    groups = assign([prompt("a"), prompt("b", seed=1), prompt("c")], [EVERYTHING - {"seed"}, EVERYTHING])
    assert groups == [[0, 2], [1]]


def test_a_prompt_nobody_honours_is_refused_by_name():
    with pytest.raises(ValueError, match="seed"):
        assign([prompt("a", seed=1)], [EVERYTHING - {"seed"}])


def test_the_router_keeps_prompt_order_and_chunk_indices():
    fast, full = Echo("fast", EVERYTHING - {"seed"}), Echo("full", EVERYTHING)
    chunks = []
    prompts = [prompt("a"), prompt("b", seed=1), prompt("c"), prompt("d", seed=2)]
    results = asyncio.run(Router([fast, full]).complete(prompts, lambda i, s, text: chunks.append((i, text))))
    assert [r[0].text for r in results] == ["fast:a", "full:b", "fast:c", "full:d"]
    assert (fast.seen, full.seen) == ([["a", "c"]], [["b", "d"]])
    assert sorted(chunks) == [(0, "fast:a"), (1, "full:b"), (2, "fast:c"), (3, "full:d")]
