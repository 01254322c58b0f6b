"""OpenAI's presence and frequency penalties, and logit bias: per-row logits processors.

As OpenAI defines them, over the tokens this sequence has generated (never the prompt):
`logit[t] -= frequency_penalty * count(t) + presence_penalty * (count(t) > 0)`, and
`logit[t] += logit_bias[t]`. Both act on the model's raw logits, before temperature and the
sampling filters, so they belong at the front of a row's processor list. Each processor
sees one row: `input_ids` `[1, L]` (the prompt, possibly left-padded, then the generated
tokens) and `scores` `[1, V]`; `prompt_length` says where generation starts in that row.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import LogitsProcessor

from handler.params import GenerationParams


def penalize(scores: torch.Tensor, generated: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """One row's scores `[..., V]` less the penalties for the generated ids `[n]`."""
    if generated.numel() == 0:
        return scores
    counts = torch.bincount(generated.to(torch.long), minlength=scores.size(-1))[: scores.size(-1)].to(scores.dtype)
    return scores - (frequency * counts + presence * (counts > 0).to(scores.dtype))


def add_bias(scores: torch.Tensor, token_ids: torch.Tensor, biases: torch.Tensor) -> torch.Tensor:
    """One row's scores `[..., V]` with `biases[i]` added at `token_ids[i]`."""
    biased = scores.clone()
    biased[..., token_ids] += biases.to(scores.dtype)
    return biased


class TokenPenaltyProcessor(LogitsProcessor):
    def __init__(self, presence: float, frequency: float, prompt_length: int):
        self.presence = presence
        self.frequency = frequency
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return penalize(scores, input_ids[0, self.prompt_length :], self.presence, self.frequency)


class LogitBiasProcessor(LogitsProcessor):
    def __init__(self, biases: Sequence[tuple[int, float]]):
        self.token_ids = torch.tensor([token for token, _ in biases], dtype=torch.long)
        self.biases = torch.tensor([bias for _, bias in biases], dtype=torch.float32)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.token_ids.device != scores.device:
            self.token_ids, self.biases = self.token_ids.to(scores.device), self.biases.to(scores.device)
        return add_bias(scores, self.token_ids, self.biases)


def penalty_processors(params: GenerationParams, prompt_length: int) -> list[LogitsProcessor]:
    """Only the ones this request needs: none when both penalties are 0 and no bias is set."""
    processors: list[LogitsProcessor] = []
    if params.presence_penalty or params.frequency_penalty:
        processors.append(TokenPenaltyProcessor(params.presence_penalty, params.frequency_penalty, prompt_length))
    if params.logit_bias:
        processors.append(LogitBiasProcessor(params.logit_bias))
    return processors
