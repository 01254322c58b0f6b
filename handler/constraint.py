"""One sequence's grammar: the tokens it may write next, and whether its answer is complete.

A `GrammarConstraint` is a transformers `LogitsProcessor` for one row (`input_ids` `[1, L]`,
`scores` `[1, V]`). Each call first accepts the tokens the row gained since the last call,
read from `input_ids` past the prompt, then leaves possible only the tokens the grammar
allows. It keeps no link to a scheduler: the dynamic one calls it from `generate`, the
continuous one from the manager's thread, and both hand it the whole row.

It must run before temperature, top-k and top-p, which pick among the allowed tokens; run
after them, a greedy row's only candidate may be one the grammar forbids. It never raises:
a token the grammar refuses (a bug, or a processor that left the row nothing allowed) sets
`error`, and the row is then given only EOS, so it ends at once while its batch neighbours
go on.
"""

from __future__ import annotations

import logging

import torch
import xgrammar

logger = logging.getLogger(__name__)


class GrammarConstraint:
    def __init__(self, grammar: xgrammar.CompiledGrammar, prompt_length: int, eos_token_ids: list[int]):
        self.matcher = xgrammar.GrammarMatcher(grammar)
        self.vocab_size = grammar.tokenizer_info.vocab_size
        self.bitmask = xgrammar.allocate_token_bitmask(1, self.vocab_size)
        self.prompt_length = prompt_length
        self.eos_token_ids = eos_token_ids
        self.accepted = 0
        self.closed = False
        self.error: str | None = None

    @property
    def terminated(self) -> bool:
        """True once the grammar is complete and the row has written its end (EOS)."""
        return self.matcher.is_terminated()

    def close(self) -> None:
        """The sequence ended (length, stop string, deadline): later tokens are padding, not text."""
        self.closed = True

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.closed or self.terminated:
            return scores
        if self.error is None:
            try:
                self._accept(input_ids[0, self.prompt_length + self.accepted :].tolist())
                if self.error is None and not self.terminated:
                    self.matcher.fill_next_token_bitmask(self.bitmask)
                    self._mask(scores)
                    return scores
            except (RuntimeError, ValueError) as failure:
                self.error = f"the grammar matcher failed: {failure}"
                logger.error("%s", self.error)
        if self.error is not None:
            self._only_eos(scores)
        return scores

    def _accept(self, tokens: list[int]) -> None:
        for token in tokens:
            self.accepted += 1
            if self.terminated:
                return
            if not self.matcher.accept_token(token):
                self.error = f"token {token} does not fit the response format"
                logger.error("constrained row: %s", self.error)
                return

    def _mask(self, scores: torch.FloatTensor) -> None:
        bitmask = self.bitmask.to(scores.device, non_blocking=True)
        if scores.device.type == "cpu" and scores.dtype != torch.float32:
            widened = scores.float()
            xgrammar.apply_token_bitmask_inplace(widened, bitmask, vocab_size=self.vocab_size)
            scores.copy_(widened)
        else:
            xgrammar.apply_token_bitmask_inplace(scores, bitmask, vocab_size=self.vocab_size)
        if scores.shape[-1] > self.vocab_size:
            scores[..., self.vocab_size :] = float("-inf")

    def _only_eos(self, scores: torch.FloatTensor) -> None:
        scores.fill_(float("-inf"))
        scores[..., self.eos_token_ids[0]] = 0.0
