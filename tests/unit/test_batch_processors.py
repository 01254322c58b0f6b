"""Our top-k and top-p warpers for the continuous batching manager filter exactly as transformers' own."""

import pytest
import torch
from transformers import TopKLogitsWarper, TopPLogitsWarper
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingTopKLogitsWarper,
    ContinuousBatchingTopPLogitsWarper,
)

from handler.batch_processors import TopKWarper, TopPWarper, ours_for

VOCAB = 5000


def rows(values, dtype) -> torch.Tensor:
    """The manager's int32 argument storage, with room for more rows than the batch has."""
    storage = torch.zeros(len(values) + 3, dtype=torch.int32)
    storage[: len(values)] = torch.tensor(values, dtype=dtype).view(torch.int32)
    return storage


@pytest.mark.parametrize("seed", range(5))
def test_top_k_keeps_the_same_candidates_per_row(seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(7, VOCAB, generator=generator) * 4
    scores[3, :20] = 1.5  # ties at the threshold
    ks = [1, 50, VOCAB, 3, 20, VOCAB, 1]
    theirs = ContinuousBatchingTopKLogitsWarper(TopKLogitsWarper(top_k=2))
    expected = theirs(scores.clone(), rows(ks, torch.int32))
    assert type(ours_for(theirs)) is TopKWarper
    got = ours_for(theirs)(scores.clone(), rows(ks, torch.int32))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("seed", range(5))
def test_top_p_keeps_the_same_candidates_per_row(seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(6, VOCAB, generator=generator) * 3
    scores[1, 100:] = float("-inf")  # a row already cut by top-k
    scores[4, 10:] = float("-inf")
    ps = [0.9, 0.5, 1.0, 0.999, 0.3, 1.0]
    theirs = ContinuousBatchingTopPLogitsWarper(TopPLogitsWarper(top_p=0.5))
    expected = theirs(scores.clone(), rows(ps, torch.float32))
    assert type(ours_for(theirs)) is TopPWarper
    got = ours_for(theirs)(scores.clone(), rows(ps, torch.float32))
    assert torch.equal(got, expected)


def test_greedy_rows_are_left_alone_without_sorting():
    scores = torch.randn(4, VOCAB)
    theirs_k = ContinuousBatchingTopKLogitsWarper(TopKLogitsWarper(top_k=2))
    theirs_p = ContinuousBatchingTopPLogitsWarper(TopPLogitsWarper(top_p=0.5))
    unlimited = ours_for(theirs_k)(scores.clone(), rows([VOCAB] * 4, torch.int32))
    assert torch.equal(unlimited, scores)
    assert torch.equal(ours_for(theirs_p)(scores.clone(), rows([1.0] * 4, torch.float32)), scores)
