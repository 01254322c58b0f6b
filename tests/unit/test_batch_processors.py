"""Our processors for the continuous batching manager filter exactly as transformers' own warpers."""

import pytest
import torch
from transformers import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from handler.decoding.sampling import sequence_processors
from handler.params import GenerationParams
from handler.schedulers.batch_processors import GreedySampler, SequenceProcessors, TopKWarper, TopPWarper, ours_for
from handler.schedulers.compat import (
    ContinuousBatchingTopKLogitsWarper,
    ContinuousBatchingTopPLogitsWarper,
    FutureRequestState,
    RequestState,
)

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
    sampled = [row for row, k in enumerate(ks) if k != 1]
    assert torch.equal(got[sampled], expected[sampled])
    # Greedy rows (k = 1) are left whole: GreedySampler takes their argmax, transformers' one candidate.
    greedy = [row for row, k in enumerate(ks) if k == 1]
    assert torch.equal(got[greedy], scores[greedy])
    assert torch.equal(got[greedy].argmax(-1), expected[greedy].argmax(-1))


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


@pytest.mark.parametrize("seed", range(3))
def test_min_p_on_the_manager_filters_as_transformers_warper_does(seed):
    """The manager runs each sequence's own list (`sampling.sequence_processors`) on its row: min_p rows filter
    exactly as transformers' MinPLogitsWarper, the other rows are untouched."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(4, VOCAB, generator=generator) * 3
    min_ps = {"a": 0.1, "c": 0.9}
    lists = {rid: sequence_processors(GenerationParams(temperature=1.0, min_p=p)) for rid, p in min_ps.items()}
    requests = [FutureRequestState(RequestState(request_id=rid, initial_tokens=[1, 2]), True, {}, 1) for rid in "abcd"]
    processor = SequenceProcessors(lists)
    got = processor(scores.clone(), processor.prepare_tensor_args(requests))
    for row, rid in enumerate("abcd"):
        expected = MinPLogitsWarper(min_ps[rid])(None, scores[row : row + 1].clone()) if rid in min_ps else scores[row : row + 1]
        assert torch.equal(got[row : row + 1], expected)
    assert bool((got[2] == float("-inf")).any()) and not bool((got[1] == float("-inf")).any())


@pytest.mark.parametrize("seed", range(3))
def test_greedy_rows_take_the_argmax_and_sampled_rows_draw_among_their_candidates(seed):
    """The manager's sampling step: a greedy row (k=1) gets the token the multinomial over its single
    candidate would draw, a sampled row one of the candidates its top-k left, and the step's k is used once."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(5, VOCAB, generator=generator) * 3
    ks = [1, 5, 1, VOCAB, 1]
    warper = ours_for(ContinuousBatchingTopKLogitsWarper(TopKLogitsWarper(top_k=2)))
    filtered = warper(scores.clone(), rows(ks, torch.int32))
    sampler = GreedySampler(warper)
    output_ids = torch.full((2, 8), -1, dtype=torch.int32)
    torch.manual_seed(seed)
    assert sampler(filtered.unsqueeze(0), output_ids)
    drawn = output_ids[0, :5].tolist()
    for row in (0, 2, 4):
        assert drawn[row] == int(scores[row].argmax())
    assert drawn[1] in torch.topk(scores[1], 5).indices.tolist()
    assert 0 <= drawn[3] < VOCAB and output_ids[0, 5:].eq(-1).all()
    assert not sampler(filtered.unsqueeze(0), output_ids), "a step's k serves one sampling step only"
