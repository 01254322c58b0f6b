"""Presence and frequency penalties and logit bias, as OpenAI defines them, one rule per test."""

import torch

from handler.decoding.penalties import (
    LogitBiasProcessor,
    TokenPenaltyProcessor,
    add_bias,
    penalize,
    penalty_processors,
)
from handler.params import GenerationParams


def test_frequency_counts_every_occurrence_and_presence_once():
    scores = torch.zeros(1, 5)
    out = penalize(scores, torch.tensor([1, 1, 1, 3]), presence=0.5, frequency=0.25)
    assert out.tolist() == [[0.0, -(3 * 0.25 + 0.5), 0.0, -(0.25 + 0.5), 0.0]]


def test_negative_penalties_encourage_repeats():
    out = penalize(torch.zeros(1, 3), torch.tensor([2]), presence=-1.0, frequency=-1.0)
    assert out.tolist() == [[0.0, 0.0, 2.0]]


def test_nothing_generated_means_nothing_penalised():
    scores = torch.randn(1, 4)
    assert torch.equal(penalize(scores, torch.tensor([], dtype=torch.long), 1.0, 1.0), scores)


def test_the_processor_counts_generated_tokens_only_not_the_prompt():
    processor = TokenPenaltyProcessor(presence=1.0, frequency=0.0, prompt_length=3)
    row = torch.tensor([[4, 4, 2, 2, 0]])  # prompt 4 4 2 (left-padded or not), generated 2 0
    out = processor(row, torch.zeros(1, 5))
    assert out.tolist() == [[-1.0, 0.0, -1.0, 0.0, 0.0]]


def test_penalties_subtract_from_raw_logits_whatever_their_sign():
    out = penalize(torch.tensor([[-2.0, 3.0]]), torch.tensor([0, 1]), presence=0.0, frequency=1.0)
    assert out.tolist() == [[-3.0, 2.0]]


def test_logit_bias_adds_to_the_named_tokens():
    out = add_bias(torch.zeros(1, 4), torch.tensor([0, 3]), torch.tensor([-100.0, 2.5]))
    assert out.tolist() == [[-100.0, 0.0, 0.0, 2.5]]


def test_logit_bias_leaves_its_input_untouched():
    scores = torch.zeros(1, 2)
    add_bias(scores, torch.tensor([1]), torch.tensor([1.0]))
    assert scores.tolist() == [[0.0, 0.0]]


def test_a_bias_of_100_makes_a_token_the_greedy_choice():
    scores = torch.tensor([[5.0, 1.0, 0.0]])
    out = LogitBiasProcessor(((2, 100.0),))(torch.tensor([[0]]), scores)
    assert int(out.argmax()) == 2


def test_the_bias_keeps_the_scores_dtype():
    out = LogitBiasProcessor(((0, 1.0),))(torch.tensor([[0]]), torch.zeros(1, 3, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_only_the_processors_a_request_needs():
    assert penalty_processors(GenerationParams(), 4) == []
    kinds = [type(p) for p in penalty_processors(GenerationParams(frequency_penalty=0.1, logit_bias=((1, 1.0),)), 4)]
    assert kinds == [TokenPenaltyProcessor, LogitBiasProcessor]
    assert [type(p) for p in penalty_processors(GenerationParams(presence_penalty=-0.1), 4)] == [TokenPenaltyProcessor]
