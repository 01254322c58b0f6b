"""The dynamic batcher: every prompt of a TorchServe batch in one batched `generate`.

Sampled and greedy prompts share one `generate`, each row with its own processors, stops
and length (`sampling`, `sequence`); a constrained prompt's rows each get their own
`GrammarConstraint` in front of their processors. Beam search takes one parameter set per call, so beam
prompts are grouped by identical parameters; which of the two strategies ("dynamic" rows,
"dynamic-beams") serves a prompt is the same capability check the `Router` makes
(`scheduler.assign`), against each strategy's allow-list in `capabilities`.

On its own (dynamic batching) it generates on the caller's thread, as TorchServe's
synchronous worker expects. Beside the continuous batcher it generates in a thread of its
own per call (`handler.schedulers.threads`: a pooled thread's OpenMP pool would slow the manager's), one
`generate` at a time, inside `guard` (the manager pauses around each forward pass), and
its stream chunks reach the caller's loop in order.

A row whose request was cancelled (`Prompt.cancel`: its client went away) is done at the next
step: it sends nothing more, and `generate` ends as soon as every row is done. Until then a done
row stays in the batch's tensors (transformers keeps its width), so the compute it frees comes
back when the batch ends; `active_rows` counts the rows still generating. Beam search is not
cancelled: it does not stream, and it ends by its length or the deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from typing import Callable, ContextManager

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from handler.cancellation import CancelSignal
from handler.decoding.sampling import PerRowSampler, RowSampling, request_generator, row_processors
from handler.decoding.sequence import Completion, SequenceState
from handler.decoding.stopping import FinishReason, find_stop, matched_stop
from handler.model.loading import LoadedModel
from handler.params import GenerationParams
from handler.pipeline.prompts import Prompt
from handler.schedulers.base import ChunkSink, assign
from handler.schedulers.threads import on_passing_thread
from handler.structured.constraint import CompiledFormat

logger = logging.getLogger(__name__)

MAX_ROWS_PER_GENERATE = 64
# Per-row processors (`sampling.row_processors`), per-row stops and state (`SequenceState`).
ROWS_HONOUR = frozenset({
    "max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "min_p", "typical_p",
    "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "do_sample",
    "num_return_sequences", "seed", "stop", "bad_words", "return_full_text", "details",
    "logprobs", "top_logprobs", "stream", "response_format",
})  # fmt: skip
# transformers' own beam search, one GenerationConfig per call; `verify_params` refuses stream,
# the OpenAI penalties, logit_bias, logprobs (so top_logprobs) and response_format with beams.
BEAMS_HONOUR = frozenset({
    "max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "min_p", "typical_p",
    "repetition_penalty", "do_sample", "num_beams", "num_return_sequences", "seed", "stop",
    "bad_words", "return_full_text", "details",
})  # fmt: skip


class DynamicScheduler:
    capabilities = {"dynamic": ROWS_HONOUR, "dynamic-beams": BEAMS_HONOUR}
    honours = ROWS_HONOUR | BEAMS_HONOUR

    def __init__(
        self,
        loaded: LoadedModel,
        deadline_seconds: float | None = None,
        threaded: bool = False,
        guard: Callable[[], ContextManager] = contextlib.nullcontext,
    ):
        self.loaded = loaded
        self.deadline_seconds = deadline_seconds
        self.threaded = threaded
        self.guard = guard
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()
        # Rows of the running `generate` still generating; read from other threads (the worker's gauge).
        self.active_rows = 0

    async def complete(self, prompts: list[Prompt], sink: ChunkSink | None = None) -> list[list[Completion]]:
        if not self.threaded:
            return self.generate(prompts, sink)
        loop = asyncio.get_running_loop()
        lock = self._locks.setdefault(loop, asyncio.Lock())

        def on_loop(prompt_index: int, sequence: int, text: str) -> None:
            if sink is not None:
                loop.call_soon_threadsafe(sink, prompt_index, sequence, text)

        def generate() -> list[list[Completion]]:
            with self.guard():
                return self.generate(prompts, on_loop if sink else None)

        async with lock:
            return await on_passing_thread(generate, name="generate-beside", device=self.loaded.device)

    def warm_up(self, rows: int = 1, grammar: CompiledFormat | None = None) -> None:
        """Greedy runs of one prompt and, for `rows` > 1, of two of different lengths: a compiled
        forward (`handler.compile`) compiles its graphs for one row and for several here. Every
        prompt is several tokens long: torch.compile specializes a size of 1, so a one-token
        prompt would leave the first real one to compile its own prefill, and the first decode
        step's graph is specialized to its cache, so a few steps compile the general one too.

        With `grammar`, one constrained run as well: the grammar's mask on this device is then
        applied once before a client's request needs it, and a mask that cannot be applied
        here (a missing kernel, a device fault) is in the log at start, not first seen by a user."""
        params = GenerationParams(max_new_tokens=4, temperature=0)
        texts = ["Hello, how are you?"], ["Hello, how are you?", "Hi there"]
        for batch in texts[: 1 if rows == 1 else 2]:
            self.generate([Prompt(text, tuple(self.loaded.tokenizer(text)["input_ids"]), params) for text in batch])
        if grammar is not None:
            text = texts[0][0]
            [[completion]] = self.generate([Prompt(text, tuple(self.loaded.tokenizer(text)["input_ids"]), params, grammar)])
            if completion.error is not None:
                logger.error("the constrained warm-up failed: %s", completion.error.message)

    def generate(self, prompts: list[Prompt], sink: ChunkSink | None = None) -> list[list[Completion]]:
        """Completions for every prompt, `num_return_sequences` each, in prompt order, on this thread."""
        results: list[list[Completion]] = [[] for _ in prompts]
        rows, beams = assign(prompts, [ROWS_HONOUR, BEAMS_HONOUR])
        for chunk in _row_chunks(rows, prompts):
            for index, completions in zip(chunk, self._generate_rows([prompts[i] for i in chunk], chunk, sink)):
                results[index] = completions
        for group in _beam_groups(beams, prompts):
            for index, completions in zip(group, self._generate_beams([prompts[i] for i in group])):
                results[index] = completions
        return results

    def _generate_rows(self, prompts: list[Prompt], indices: list[int], sink: ChunkSink | None):
        """All prompts in one `generate`, each row with its own processors, stops and length."""
        loaded = self.loaded
        padded = self._pad([p.input_ids for p in prompts for _ in range(p.params.num_return_sequences)])
        prompt_length = padded["input_ids"].shape[1]
        rows: list[RowSampling] = []
        states: list[SequenceState] = []
        cancels: list[CancelSignal | None] = []
        for prompt, index in zip(prompts, indices):
            generator = request_generator(prompt.params, loaded.device)
            bad_words = self._bad_words_ids(prompt.params.bad_words)
            for sequence in range(prompt.params.num_return_sequences):
                processors = row_processors(prompt.params, prompt_length, loaded.eos_token_ids, bad_words)
                # The grammar's mask goes first: the warpers then choose among the tokens it allows.
                constraint = prompt.grammar.constraint(prompt_length) if prompt.grammar else None
                if constraint is not None:
                    processors.insert(0, constraint)
                send = _bind(sink, index, sequence) if sink and prompt.params.stream else None
                state = SequenceState(prompt, loaded.tokenizer, loaded.eos_token_ids, send, constraint)
                rows.append(RowSampling(processors, generator, state.observe if prompt.params.logprobs else None))
                states.append(state)
                cancels.append(prompt.cancel)
        criteria = BatchStopping(states, prompt_length, self.deadline_seconds, cancels, self._count_rows)
        config = self._config(max_new_tokens=max(p.params.max_new_tokens for p in prompts), do_sample=False)
        self.active_rows += len(states)
        try:
            with torch.inference_mode():
                loaded.model.generate(
                    **padded,
                    generation_config=config,
                    logits_processor=LogitsProcessorList([PerRowSampler(rows)]),
                    stopping_criteria=StoppingCriteriaList([criteria]),
                )
        finally:
            self.active_rows -= criteria.active
        completions = [state.completion() for state in states]
        grouped, start = [], 0
        for prompt in prompts:
            grouped.append(completions[start : start + prompt.params.num_return_sequences])
            start += prompt.params.num_return_sequences
        return grouped

    def _count_rows(self, ended: int) -> None:
        self.active_rows -= ended

    def _generate_beams(self, prompts: list[Prompt]) -> list[list[Completion]]:
        """Beam search needs one parameter set per call; stops are trimmed after the fact."""
        params = prompts[0].params
        if params.seed is not None:
            torch.manual_seed(params.seed)
        padded = self._pad([p.input_ids for p in prompts])
        prompt_length = padded["input_ids"].shape[1]
        sampling = params.sampling
        config = self._config(
            max_new_tokens=params.max_new_tokens,
            min_new_tokens=params.min_new_tokens or None,
            num_beams=params.num_beams,
            num_return_sequences=params.num_return_sequences,
            do_sample=sampling,
            temperature=params.temperature if sampling else None,
            top_k=params.top_k if sampling and params.top_k else None,
            top_p=params.top_p if sampling and params.top_p < 1 else None,
            min_p=params.min_p if sampling and params.min_p > 0 else None,
            typical_p=params.typical_p if sampling and params.typical_p < 1 else None,
            repetition_penalty=params.repetition_penalty if params.repetition_penalty != 1 else None,
            bad_words_ids=self._bad_words_ids(params.bad_words) or None,
            max_time=self.deadline_seconds,
        )
        started = time.perf_counter()
        with torch.inference_mode():
            output = self.loaded.model.generate(**padded, generation_config=config)
        seconds = time.perf_counter() - started
        sequences = output[:, prompt_length:].tolist()
        n = params.num_return_sequences
        return [[self._finish_beam(prompt, sequences[i * n + j], seconds) for j in range(n)] for i, prompt in enumerate(prompts)]

    def _finish_beam(self, prompt: Prompt, ids: list[int], seconds: float) -> Completion:
        tokenizer, eos = self.loaded.tokenizer, self.loaded.eos_token_ids
        reason = FinishReason.LENGTH
        for position, token in enumerate(ids):
            if token in eos:
                ids, reason = ids[:position], FinishReason.EOS
                break
        while ids and ids[-1] == tokenizer.pad_token_id and tokenizer.pad_token_id not in eos:
            ids = ids[:-1]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        cut, stop = find_stop(text, prompt.params.stop), None
        if cut is not None:
            stop = matched_stop(text, prompt.params.stop, cut)
            text, reason = text[:cut], FinishReason.STOP
        return Completion(text, reason, len(prompt.input_ids), len(ids), seconds, stop_sequence=stop)

    def _pad(self, sequences: list[tuple[int, ...]]) -> dict[str, torch.Tensor]:
        padded = self.loaded.tokenizer.pad({"input_ids": [list(s) for s in sequences]}, padding=True, return_tensors="pt")
        return {name: tensor.to(self.loaded.device) for name, tensor in padded.items()}

    def _config(self, **values) -> GenerationConfig:
        """A fresh config each call, so the model's own generation_config.json never leaks into requests."""
        values = {k: v for k, v in values.items() if v is not None}
        tokenizer = self.loaded.tokenizer
        return GenerationConfig(
            eos_token_id=self.loaded.eos_token_ids,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            **values,
        )

    def _bad_words_ids(self, words: tuple[str, ...]) -> list[list[int]]:
        """Each word as written and after a space, since most tokenizers encode the two differently."""
        ids = []
        for word in words:
            for variant in (word, " " + word):
                tokens = self.loaded.tokenizer(variant, add_special_tokens=False)["input_ids"]
                if tokens and tokens not in ids:
                    ids.append(tokens)
        return ids


class BatchStopping(StoppingCriteria):
    """Per-row stopping for a batch: each row's own length, stop strings, EOS, the deadline, and its cancel.

    A cancelled row is done without another step of its state (nothing more is streamed);
    `on_ended(n)` hears of the rows that ended at each step, and `active` counts those left."""

    def __init__(
        self,
        states: list[SequenceState],
        prompt_length: int,
        deadline_seconds: float | None,
        cancels: list[CancelSignal | None] | None = None,
        on_ended: Callable[[int], None] | None = None,
    ):
        self.states = states
        self.prompt_length = prompt_length
        self.deadline = time.monotonic() + deadline_seconds if deadline_seconds else None
        self.cancels = cancels or [None] * len(states)
        self.on_ended = on_ended
        self.done = [False] * len(states)

    @property
    def active(self) -> int:
        return self.done.count(False)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        out_of_time = self.deadline is not None and time.monotonic() >= self.deadline
        generated = input_ids[:, self.prompt_length :].tolist()
        before = self.active
        for row, (state, ids, cancel) in enumerate(zip(self.states, generated, self.cancels)):
            if cancel is not None and cancel.is_set():
                if not self.done[row]:
                    state.abandon()
                self.done[row] = True
            elif not self.done[row]:
                self.done[row] = state.step(ids, out_of_time)
        if self.on_ended is not None and self.active != before:
            self.on_ended(before - self.active)
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


def _bind(sink: ChunkSink, index: int, sequence: int) -> Callable[[str], None]:
    return lambda text: sink(index, sequence, text)


def _row_chunks(indices: list[int], prompts: list[Prompt]) -> list[list[int]]:
    """Split prompts so no single `generate` holds more than MAX_ROWS_PER_GENERATE rows."""
    chunks: list[list[int]] = []
    rows = 0
    for index in indices:
        size = prompts[index].params.num_return_sequences
        if chunks and rows + size <= MAX_ROWS_PER_GENERATE:
            chunks[-1].append(index)
            rows += size
        else:
            chunks.append([index])
            rows = size
    return chunks


def _beam_groups(indices: list[int], prompts: list[Prompt]) -> list[list[int]]:
    """Beam prompts grouped by identical parameters, since beam search takes one set per call."""
    groups: dict[GenerationParams, list[int]] = {}
    for index in indices:
        groups.setdefault(prompts[index].params, []).append(index)
    return list(groups.values())
