"""Token log-probabilities: what a sequence records per generated token when asked for `logprobs`.

They come from the model's raw logits at that step (before penalties, temperature and the
sampling filters), as vLLM reports them by default: the model's belief, not the sampler's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class TopToken:
    token_id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its own log-probability and the `top` most likely tokens at its step."""

    token_id: int
    text: str
    logprob: float
    top: tuple[TopToken, ...] = ()


def token_logprob(logits: torch.Tensor, token_id: int, top_n: int, decode: Callable[[int], str]) -> TokenLogprob:
    """`logits` is one step's raw `[V]` row; `decode` turns one token id into its text."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top: tuple[TopToken, ...] = ()
    if top_n > 0:
        values, ids = torch.topk(logprobs, min(top_n, logprobs.numel()))
        top = tuple(TopToken(i, decode(i), v) for i, v in zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token_id, decode(token_id), float(logprobs[token_id]), top)
