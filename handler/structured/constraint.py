"""One sequence's grammar: the tokens it may write next, and whether its answer is complete.

A `GrammarConstraint` is a transformers `LogitsProcessor` for one row (`input_ids` `[1, L]`,
`scores` `[1, V]`). Each call first accepts the tokens the row gained since the last call,
read from `input_ids` past the prompt, then leaves possible only the tokens the grammar
allows. It keeps no link to a scheduler: the dynamic one calls it from `generate`, the
continuous one from the manager's thread, and both hand it the whole row.

It must run before temperature, top-k and top-p, which pick among the allowed tokens; run
after them, a greedy row's only candidate may be one the grammar forbids. It never raises:
a failure sets `failure`, the error its request gets, and the row is then given only EOS,
so it ends at once while its batch neighbours go on. Failures: a token the grammar refuses
(a bug, or a processor that left the row nothing allowed), and a grammar too ambiguous to
follow: xgrammar's matcher slows down with every token on some (`(a*)*b`; docs/structured-output.md
has the figures), and each step of the whole batch waits for it, so a step over `max_mask_ms`
of CPU time ends its request with a 422. Applying the mask can fail
too (a device fault, a kernel that cannot launch); that also ends only its own row.

On CUDA the mask is applied by xgrammar's `torch_native` backend, plain torch operations.
Its default there is a Triton kernel, which compiles a C stub at its first launch: that needs
a C compiler, which the runtime image does not have, and a writable `~/.triton` cache, which
a read-only root does not give.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import xgrammar

from handler.errors import LIMIT_EXCEEDED, RequestError

logger = logging.getLogger(__name__)


def mask_backend(device: torch.device) -> str:
    """xgrammar's backend for logits on `device`: torch operations on a GPU, which need no compiler
    at run time (see the module's docstring), and xgrammar's own C++ kernel on the CPU."""
    return "torch_native" if device.type == "cuda" else "cpu"


@dataclass(frozen=True)
class CompiledFormat:
    """A request's compiled response format, which makes one constraint per sequence."""

    grammar: xgrammar.CompiledGrammar
    where: str
    max_mask_ms: int

    def constraint(self, prompt_length: int) -> GrammarConstraint:
        return GrammarConstraint(self.grammar, prompt_length, self.where, self.max_mask_ms)


class GrammarConstraint:
    def __init__(self, grammar: xgrammar.CompiledGrammar, prompt_length: int, where: str, max_mask_ms: int):
        self.matcher = xgrammar.GrammarMatcher(grammar)
        self.vocab_size = grammar.tokenizer_info.vocab_size
        self.eos_token_id = grammar.tokenizer_info.stop_token_ids[0]
        self.bitmask = xgrammar.allocate_token_bitmask(1, self.vocab_size)
        self.prompt_length = prompt_length
        self.where = where
        self.max_mask_ms = max_mask_ms
        self.accepted = 0
        self.closed = False
        self.failure: RequestError | None = None

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
        if self.failure is None:
            started = time.thread_time()
            try:
                self._accept(input_ids[0, self.prompt_length + self.accepted :].tolist())
                if self.failure is None and not self.terminated:
                    self.matcher.fill_next_token_bitmask(self.bitmask)
            except (RuntimeError, ValueError) as error:
                self._fail(RequestError(f"the grammar matcher failed: {error}", self.where, 500))
            spent_ms = (time.thread_time() - started) * 1000
            if self.failure is None and spent_ms > self.max_mask_ms:
                self._fail(
                    RequestError(
                        f"{self.where} is too ambiguous to follow: a token took {spent_ms:.0f} ms, "
                        f"over the {self.max_mask_ms} ms limit",
                        self.where,
                        LIMIT_EXCEEDED,
                        {"limit": self.max_mask_ms, "limit_name": "structured_output.max_mask_ms"},
                    )
                )
            if self.failure is None and not self.terminated:
                try:
                    self._mask(scores)
                    return scores
                except (RuntimeError, ValueError) as error:
                    self._fail(RequestError(f"applying the grammar's mask failed: {error}", self.where, 500))
        if self.failure is not None:
            scores.fill_(float("-inf"))
            scores[..., self.eos_token_id] = 0.0
        return scores

    def _accept(self, tokens: list[int]) -> None:
        for token in tokens:
            self.accepted += 1
            if self.terminated:
                return
            if not self.matcher.accept_token(token):
                self._fail(RequestError(f"token {token} does not fit {self.where}", self.where, 500))
                return

    def _fail(self, failure: RequestError) -> None:
        self.failure = failure
        logger.warning("a constrained sequence ends early: %s", failure.message)

    def _mask(self, scores: torch.FloatTensor) -> None:
        bitmask = self.bitmask.to(scores.device, non_blocking=True)
        backend = mask_backend(scores.device)
        if scores.device.type == "cpu" and scores.dtype != torch.float32:
            widened = scores.float()
            xgrammar.apply_token_bitmask_inplace(widened, bitmask, vocab_size=self.vocab_size, backend=backend)
            scores.copy_(widened)
        else:
            xgrammar.apply_token_bitmask_inplace(scores, bitmask, vocab_size=self.vocab_size, backend=backend)
        if scores.shape[-1] > self.vocab_size:
            scores[..., self.vocab_size :] = float("-inf")
