"""Per-row logits processing, so one batch can honour every request's own parameters.

The dynamic scheduler runs `generate` greedy (argmax) over the whole batch. Each row's own
processors (repetition penalty, presence and frequency penalties, logit bias, bad words,
min_new_tokens, temperature, top-k, top-p, min-p, typical-p) are transformers' own classes
applied to that row's slice; a sampling row then draws its token with the request's own
`torch.Generator` and leaves only that token possible, so argmax picks it. A seeded request
therefore gives the same text alone or in a batch, and neighbours never share parameters.

`front_processors` (on the raw logits: presence and frequency penalties, logit bias) and
`sequence_processors` (after the sampling filters: min-p) are the parts both schedulers apply
per sequence, the continuous one through `batch_processors.SequenceProcessors`: a per-row
processor added to either works on both paths. A row's `observer` (its `SequenceState`, when it
asked for `logprobs`) sees the raw logits before any processor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import LogitsProcessor
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from handler.decoding.penalties import penalty_processors
from handler.params import GenerationParams


@dataclass
class RowSampling:
    """One batch row's processors, the generator it samples with (None for greedy), and who sees its raw logits."""

    processors: list[LogitsProcessor] = field(default_factory=list)
    generator: torch.Generator | None = None
    observer: Callable[[torch.Tensor], None] | None = None


def request_generator(params: GenerationParams, device: torch.device) -> torch.Generator | None:
    """One generator per request, shared by its rows in order, seeded when the request asks."""
    if not params.sampling:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def row_processors(
    params: GenerationParams,
    prompt_length: int,
    eos_token_ids: list[int],
    bad_words_ids: list[list[int]],
) -> list[LogitsProcessor]:
    """Only the processors this request needs, in transformers' own order."""
    processors: list[LogitsProcessor] = []
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    processors += front_processors(params, prompt_length)
    if bad_words_ids:
        processors.append(NoBadWordsLogitsProcessor(bad_words_ids, eos_token_ids))
    if params.min_new_tokens > 0 and eos_token_ids:
        processors.append(MinNewTokensLengthLogitsProcessor(prompt_length, params.min_new_tokens, eos_token_ids))
    if params.sampling:
        if params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k > 0:
            processors.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
        processors += sequence_processors(params)
        if params.typical_p < 1.0:
            processors.append(TypicalLogitsWarper(params.typical_p))
    return processors


def front_processors(params: GenerationParams, prompt_length: int) -> list[LogitsProcessor]:
    """The processors both schedulers run on each sequence's raw logits, before temperature and the
    filters: presence and frequency penalties and logit bias. `prompt_length` is where the row's
    generated tokens start."""
    return penalty_processors(params, prompt_length)


def sequence_processors(params: GenerationParams) -> list[LogitsProcessor]:
    """The processors both schedulers run on each sequence's row, after temperature, top-k and top-p."""
    if params.sampling and params.min_p > 0.0:
        return [MinPLogitsWarper(params.min_p)]
    return []


class PerRowSampler(LogitsProcessor):
    """Applies each row's processors to its own slice and draws sampling rows' tokens."""

    def __init__(self, rows: list[RowSampling]):
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for index, row in enumerate(self.rows):
            if row.observer is not None:
                row.observer(scores[index])
            if not row.processors and row.generator is None:
                continue
            row_ids = input_ids[index : index + 1]
            row_scores = scores[index : index + 1]
            for processor in row.processors:
                row_scores = processor(row_ids, row_scores)
            if row.generator is not None:
                probs = torch.softmax(row_scores.float(), dim=-1)
                token = torch.multinomial(probs, 1, generator=row.generator)
                row_scores = torch.full_like(row_scores, float("-inf"))
                row_scores[0, token[0, 0]] = 0.0
            scores[index : index + 1] = row_scores
        return scores
