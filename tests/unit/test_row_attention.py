"""Row-by-row attention on the manager's decode steps: the gather it builds, when it runs, and
that the manager's text stays the classic engine's (a tiny random Llama with grouped KV heads, fp32)."""

import asyncio
from pathlib import Path

import pytest
import torch

from handler.model.loading import LoadedModel, load_model
from handler.schedulers import row_attention
from handler.schedulers.continuous import ContinuousScheduler
from handler.schedulers.dynamic import DynamicScheduler
from handler.settings import ContinuousBatchingSettings, HandlerSettings
from tests.support.prompts import make_prompt

CACHE = ContinuousBatchingSettings(num_blocks=48, page_size=16, max_batch_tokens=256)
TEXTS = ("Hello there", "Tell me a story about a dragon who", "Why", "Name three colours of the sea at night")


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    return load_model(tiny_model_dir, HandlerSettings(dtype="float32", max_total_tokens=200), torch.device("cpu"))


@pytest.fixture(scope="module")
def continuous(loaded: LoadedModel):
    served = ContinuousScheduler(loaded, CACHE)
    yield served
    served.stop()


@pytest.fixture
def gathers(monkeypatch) -> list[tuple[int, int]]:
    """Each gather the row path builds, as (rows, longest row)."""
    built: list[tuple[int, int]] = []
    real = row_attention.row_gather

    def counted(key_ends: torch.Tensor, keys: int):
        positions, readable = real(key_ends, keys)
        built.append(tuple(positions.shape))
        return positions, readable

    monkeypatch.setattr(row_attention, "row_gather", counted)
    return built


def test_the_gather_pads_each_row_to_the_longest_and_masks_the_padding():
    positions, readable = row_attention.row_gather(torch.tensor([0, 3, 8, 10]), 10)
    # Padding reads whatever position follows (never past the last key); the mask hides it.
    assert positions.tolist() == [[0, 1, 2, 3, 4], [3, 4, 5, 6, 7], [8, 9, 9, 9, 9]]
    assert readable.shape == (3, 1, 1, 5)
    assert readable[:, 0, 0].tolist() == [
        [True, True, True, False, False],
        [True, True, True, True, True],
        [True, True, False, False, False],
    ]


def test_decode_steps_of_several_rows_attend_row_by_row_and_keep_the_classic_engines_text(loaded, continuous, gathers):
    prompts = [make_prompt(loaded, text, max_new_tokens=16, temperature=0) for text in TEXTS]
    classic = [DynamicScheduler(loaded).generate([p])[0][0] for p in prompts]
    served = [sequences[0] for sequences in asyncio.run(continuous.complete(prompts))]
    assert [c.text for c in served] == [c.text for c in classic]
    assert gathers, "no decode step took the row path"
    assert all(rows >= 2 for rows, _ in gathers)


def test_a_lone_row_keeps_transformers_attention(loaded, continuous, gathers):
    alone = make_prompt(loaded, TEXTS[1], max_new_tokens=8, temperature=0)
    (sequence,) = asyncio.run(continuous.complete([alone]))[0]
    assert sequence.generated_tokens == 8
    assert gathers == []
