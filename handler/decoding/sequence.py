"""One generated sequence's state, fed by either scheduler: text, stops, finish reason, stream.

A scheduler calls `step` with the sequence's generated ids after each token, and
`completion` once it is done. Everything a sequence decides on its own lives here, so both
schedulers finish, trim and stream a sequence the same way (TGI's per-request
`StoppingCriteria`). A sequence asked for `logprobs` is also shown each step's raw logits
(`observe`) and records the log-probability of the token that step picked. A constrained
sequence holds its `GrammarConstraint`: its EOS means the grammar is complete (finish_reason
"stop"), and a constraint that failed fails the sequence's request (`Completion.error`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

from handler.decoding.detokenizer import IncrementalDetokenizer
from handler.decoding.logprobs import TokenLogprob, token_logprob
from handler.decoding.stopping import FinishReason, StopScan, matched_stop, releasable_length
from handler.errors import RequestError
from handler.pipeline.prompts import Prompt
from handler.structured.constraint import GrammarConstraint


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    seconds: float = 0.0
    first_token_seconds: float | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    error: RequestError | None = None
    stop_sequence: str | None = None  # the stop string that ended the text, when one did


class SequenceState:
    """Decodes incrementally, finds stop strings in the new tail, holds back what a stream may not send yet."""

    def __init__(
        self,
        prompt: Prompt,
        tokenizer,
        eos_token_ids: list[int],
        sink: Callable[[str], None] | None,
        constraint: GrammarConstraint | None = None,
    ):
        self.prompt = prompt
        self.tokenizer = tokenizer
        self.constraint = constraint
        self.eos_token_ids = eos_token_ids
        self.sink = sink
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.scan = StopScan(prompt.params.stop)
        self.text = ""
        self.sent = 0
        self.generated = 0
        self.reason: FinishReason | None = None
        self.stop_sequence: str | None = None
        self.started = time.perf_counter()
        self.first_token_seconds: float | None = None
        self.seconds = 0.0
        self.logprobs: list[TokenLogprob] = []
        self.pending = None

    def observe(self, logits) -> None:
        """This step's raw logits `[V]`, before any processor, for the token the step picks."""
        if self.reason is None:
            self.pending = logits.detach().clone()

    def step(self, ids: Sequence[int], out_of_time: bool = False) -> bool:
        """Take the sequence's generated ids so far; True once it is finished."""
        if self.reason is not None:
            return True
        self.seconds = time.perf_counter() - self.started
        if self.first_token_seconds is None:
            self.first_token_seconds = self.seconds
        self.generated = len(ids)
        if self.pending is not None and ids:
            if ids[-1] not in self.eos_token_ids:
                self.logprobs.append(token_logprob(self.pending, ids[-1], self.prompt.params.top_logprobs, self._token_text))
            self.pending = None
        if ids and ids[-1] in self.eos_token_ids:
            # A constraint allows EOS only where its grammar is complete.
            self.reason, ids = (FinishReason.EOS if self.constraint is None else FinishReason.STOP), ids[:-1]
        elif self.generated >= self.prompt.params.max_new_tokens or out_of_time:
            self.reason = FinishReason.LENGTH
        self.text = self.detokenizer.update(ids, final=self.reason is not None)
        cut = self.scan.scan(self.text)
        if cut is not None:
            self.stop_sequence = matched_stop(self.text, self.prompt.params.stop, cut)
            self.text, self.reason = self.text[:cut], FinishReason.STOP
        if self.reason is not None and self.constraint is not None:
            self.constraint.close()
        self._release(final=self.reason is not None)
        return self.reason is not None

    def abandon(self) -> None:
        """Its client went away: nothing more is sent, and its grammar's matcher is let go."""
        self.sink = None
        if self.reason is None and self.constraint is not None:
            self.constraint.close()

    def _release(self, final: bool) -> None:
        if self.sink is None:
            return
        end = len(self.text) if final else releasable_length(self.text, self.prompt.params.stop)
        if end > self.sent:
            self.sink(self.text[self.sent : end])
            self.sent = end

    def completion(self) -> Completion:
        return Completion(
            self.text,
            self.reason or FinishReason.LENGTH,
            len(self.prompt.input_ids),
            self.generated,
            self.seconds,
            self.first_token_seconds,
            self._kept_logprobs(),
            self.constraint.failure if self.constraint is not None else None,
            self.stop_sequence,
        )

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _kept_logprobs(self) -> tuple[TokenLogprob, ...]:
        """The tokens of the returned text: after a stop string, those that start before it."""
        if self.reason != FinishReason.STOP:
            return tuple(self.logprobs)
        kept, length = [], 0
        for token in self.logprobs:
            if length >= len(self.text):
                break
            kept.append(token)
            length += len(token.text)
        return tuple(kept)
