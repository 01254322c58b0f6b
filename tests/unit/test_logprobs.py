"""Token log-probabilities from one step's raw logits."""

import math

import torch

from handler.decoding.logprobs import token_logprob


def decode(token_id: int) -> str:
    return f"<{token_id}>"


def test_the_chosen_token_logprob_is_the_log_softmax_of_the_raw_logits():
    logits = torch.tensor([0.0, math.log(3.0)])  # probabilities 1/4 and 3/4
    token = token_logprob(logits, 1, 0, decode)
    assert (token.token_id, token.text, token.top) == (1, "<1>", ())
    assert math.isclose(token.logprob, math.log(0.75), rel_tol=1e-6)


def test_top_tokens_come_most_likely_first():
    token = token_logprob(torch.tensor([1.0, 3.0, 2.0]), 0, 2, decode)
    assert [t.token_id for t in token.top] == [1, 2]
    assert [t.text for t in token.top] == ["<1>", "<2>"]
    assert token.top[0].logprob > token.top[1].logprob > token.logprob


def test_asking_for_more_top_tokens_than_the_vocabulary_has_gives_them_all():
    assert len(token_logprob(torch.zeros(3), 0, 20, decode).top) == 3
