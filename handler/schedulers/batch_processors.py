"""The per-request logits processors the continuous batching manager runs on each step.

transformers' manager applies one processor list to the whole batch, each processor reading
one value per row from a tensor. Ours add what it lacks (repetition penalty over the
prompt, min_new_tokens), and replace its top-k and top-p warpers, which sort the whole
vocabulary twice per step even for greedy rows: on CPU that cost a third of each decode
step at 16 rows. Ours filter with `torch.topk` over the rows that need it and give the same
result (tested against transformers' own warpers).

`SequenceProcessors` runs each sequence's own list of transformers `LogitsProcessor`s on its
row: once in front of everything, on the raw logits (a constrained sequence's
`GrammarConstraint` first, so that every later processor and warper chooses among the tokens
the grammar allows, then `sampling.front_processors`: presence and frequency penalties, logit
bias), and once after the manager's warpers (`sampling.sequence_processors`: min_p), the same
lists the dynamic scheduler applies, so a processor added to either works on both.
"""

from __future__ import annotations

from typing import Mapping

import torch
from transformers import LogitsProcessor

from handler.schedulers.compat import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingTopKLogitsWarper,
    ContinuousBatchingTopPLogitsWarper,
    FutureRequestState,
    add_processors,
    generated_ids,
    retype,
    sample_with,
)


class MinNewTokensProcessor(ContinuousBatchingLogitsProcessor):
    """Per-request min_new_tokens: EOS is impossible while a request has generated fewer tokens."""

    supported_kwargs = {"min_new_tokens": int}
    ignored_kwargs = ()

    def __init__(self, eos_token_ids: list[int]):
        self.eos_token_ids = torch.tensor(eos_token_ids, dtype=torch.long)

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(0)

    def prepare_tensor_args(self, requests_with_new_token: list[FutureRequestState]) -> torch.Tensor:
        missing = [
            max(0, r.state.logit_processor_kwargs.get("min_new_tokens", 0) - len(generated_ids(r.state)))
            for r in requests_with_new_token
        ]
        return torch.tensor(missing, dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        blocked = tensor_arg[: scores.size(0)] > 0
        if self.eos_token_ids.numel() == 0 or not bool(blocked.any()):
            return scores
        eos = self.eos_token_ids.to(scores.device)
        scores[:, eos] = scores[:, eos].masked_fill(blocked.unsqueeze(-1), float("-inf"))
        return scores


class RepetitionPenaltyProcessor(ContinuousBatchingLogitsProcessor):
    """Per-request repetition penalty over the prompt and the generated tokens, as `generate` applies it.

    The tensor argument carries each request's penalty; the tokens to penalise are taken
    from the request states when the batch is prepared, on the manager's thread, right
    before the forward pass that uses them.
    """

    supported_kwargs = {"repetition_penalty": float}
    ignored_kwargs = ()

    def __init__(self) -> None:
        self.history: list[tuple[int, list[int]]] = []

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.copy_(torch.ones_like(int32_tensor, dtype=torch.float32).view(torch.int32))

    def prepare_tensor_args(self, requests_with_new_token: list[FutureRequestState]) -> torch.Tensor:
        penalties = [float(r.state.logit_processor_kwargs.get("repetition_penalty", 1.0)) for r in requests_with_new_token]
        self.history = [
            (row, r.state.initial_tokens + r.state.generated_tokens)
            for row, (r, penalty) in enumerate(zip(requests_with_new_token, penalties))
            if penalty != 1.0
        ]
        return torch.tensor(penalties, dtype=torch.float32).view(torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        penalties = tensor_arg[: scores.size(0)].view(torch.float32)
        for row, tokens in self.history:
            ids = torch.tensor(tokens, dtype=torch.long, device=scores.device)
            penalty = penalties[row]
            picked = scores[row].gather(0, ids)
            scores[row].scatter_(0, ids, torch.where(picked < 0, picked * penalty, picked / penalty))
        return scores


class TopKWarper(ContinuousBatchingTopKLogitsWarper):
    """Per-row top-k: one `topk` up to the largest k in use, over the sampled rows whose k leaves anything out.

    It keeps this step's k of each row (`row_k`), from which `GreedySampler` tells the greedy rows
    (k = 1). Those it leaves as they are: the sampler takes their argmax, which filtering to one
    candidate would not change."""

    row_k: torch.Tensor | None = None

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        top_k = tensor_arg[: scores.size(0)].to(torch.int64)
        self.row_k = top_k
        rows = ((top_k > 1) & (top_k < scores.size(-1))).nonzero().squeeze(-1)
        if rows.numel() == 0:
            return scores
        row_k = top_k[rows]
        kept = torch.topk(scores[rows], int(row_k.max()), dim=-1).values
        thresholds = kept.gather(-1, (row_k - 1).unsqueeze(-1))
        scores[rows] = scores[rows].masked_fill(scores[rows] < thresholds, self.filter_value)
        return scores


class TopPWarper(ContinuousBatchingTopPLogitsWarper):
    """Per-row nucleus filtering, as transformers' warper does it, over the rows with top_p < 1
    and only among each row's candidates still in play (after top-k, usually a few dozen)."""

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        top_p = tensor_arg[: scores.size(0)].view(torch.float32)
        rows = (top_p < 1.0).nonzero().squeeze(-1)
        if rows.numel() == 0:
            return scores
        selected = scores[rows]
        in_play = int((selected > self.filter_value).sum(-1).max())
        count = max(in_play, self.min_tokens_to_keep)
        # Ascending over the candidates, as in transformers; the rest are already filtered out.
        values, indices = torch.topk(selected, count, dim=-1, largest=True, sorted=True)
        values, indices = values.flip(-1), indices.flip(-1)
        cumulative = values.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p[rows]).unsqueeze(-1)
        remove[..., -self.min_tokens_to_keep :] = False
        mask = torch.zeros_like(selected, dtype=torch.bool).scatter(-1, indices, remove)
        scores[rows] = selected.masked_fill(mask, self.filter_value)
        return scores


class SequenceProcessors(ContinuousBatchingLogitsProcessor):
    """Each sequence's own processors on its row, looked up by request id; rows without any are untouched."""

    supported_kwargs: dict[str, type] = {}
    ignored_kwargs = ()

    def __init__(self, lists: Mapping[str, list[LogitsProcessor]]):
        self.lists = lists
        self.rows: list[tuple[int, list[LogitsProcessor], list[int]]] = []

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(0)

    def prepare_tensor_args(self, requests_with_new_token: list[FutureRequestState]) -> torch.Tensor:
        self.rows = []
        for row, request in enumerate(requests_with_new_token):
            processors = self.lists.get(request.state.request_id)
            if processors:
                self.rows.append((row, processors, request.state.initial_tokens + request.state.generated_tokens))
        return torch.zeros(len(requests_with_new_token), dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        for row, processors, tokens in self.rows:
            ids = torch.tensor([tokens], dtype=torch.long, device=scores.device)
            row_scores = scores[row : row + 1]
            for processor in processors:
                row_scores = processor(ids, row_scores)
            scores[row : row + 1] = row_scores
        return scores


class GreedySampler:
    """The manager's sampling step, with its greedy rows (top_k 1, see `continuous.processor_kwargs`)
    taking the argmax: only the sampled rows pay a softmax and a multinomial over the vocabulary.

    The token is the one the manager's multinomial drew from a greedy row's single candidate,
    so no text changes. Without this step's k per row (the warper did not run), it declines and
    the manager samples as it does."""

    def __init__(self, top_k: TopKWarper):
        self.top_k = top_k

    def __call__(self, scores: torch.Tensor, output_ids: torch.Tensor) -> bool:
        row_k, self.top_k.row_k = self.top_k.row_k, None
        rows = scores[0]
        if row_k is None or row_k.numel() != rows.size(0):
            return False
        tokens = rows.argmax(dim=-1)
        sampled = (row_k != 1).nonzero().squeeze(-1)
        if sampled.numel():
            probabilities = rows[sampled].softmax(dim=-1)
            tokens[sampled] = torch.multinomial(probabilities, num_samples=1).squeeze(-1)
        output_ids[0, : tokens.numel()].copy_(tokens)
        return True


OURS = {ContinuousBatchingTopKLogitsWarper: TopKWarper, ContinuousBatchingTopPLogitsWarper: TopPWarper}


def ours_for(processor: ContinuousBatchingLogitsProcessor) -> ContinuousBatchingLogitsProcessor:
    """Our warper in place of transformers' one, with its settings; any other processor as it is."""
    kind = OURS.get(type(processor))
    return processor if kind is None else retype(processor, kind)


def install(
    manager,
    eos_token_ids: list[int],
    front_lists: Mapping[str, list[LogitsProcessor]],
    sequence_lists: Mapping[str, list[LogitsProcessor]],
) -> None:
    """Our processors around the manager's, our top-k and top-p warpers in place of its own, and
    our sampling step (greedy rows take the argmax) in place of its.

    Each sequence's `front_lists` entry runs first, on the raw logits; its `sequence_lists`
    entry runs last, after the manager's warpers."""
    processors = manager.logit_processor.logits_processor
    processors[:] = [ours_for(processor) for processor in processors]
    front = [SequenceProcessors(front_lists), RepetitionPenaltyProcessor(), MinNewTokensProcessor(eos_token_ids)]
    add_processors(manager, front, [SequenceProcessors(sequence_lists)])
    top_k = next((processor for processor in processors if isinstance(processor, TopKWarper)), None)
    if top_k is not None:  # the manager's config always asks for top-k (`ContinuousScheduler._start_manager`)
        sample_with(manager, GreedySampler(top_k))
