"""The continuous batcher: transformers' continuous batching manager behind the scheduler interface.

One manager per worker generates on its own thread and adds or retires sequences at every
step, so a short request never waits for a long neighbour. Each prompt becomes
`num_return_sequences` manager requests; their tokens come back to the caller's event loop
through `loop.call_soon_threadsafe` (`register_result_handler`), feed one `SequenceState`
each, and a sequence that hits a stop string is cancelled in the manager. The loop never
blocks on generation. `deadline_seconds` counts from a sequence's submission: one still
running then is cancelled and answered with what it has, finish_reason "length". A sequence
whose request is cancelled (`Prompt.cancel`: its client went away) is cancelled in the manager
as a stop string's is, from the listener's thread through `call_soon_threadsafe`, so its KV
blocks are freed before the manager's next step; its caller gets what it has, to drop.

It honours exactly: max_new_tokens, EOS, min_new_tokens and repetition_penalty (our
processors in `batch_processors`), response_format (each sequence's `GrammarConstraint`, run
before every other processor; greedy's top_k=1 then takes the best token the grammar allows,
as the dynamic scheduler's argmax does), presence_penalty, frequency_penalty and logit_bias
(`sampling.front_processors`, on the raw logits), temperature, top_k, top_p (the manager's
per-request warpers; greedy is top_k=1), min_p (`sampling.sequence_processors`), do_sample,
stop strings, details, return_full_text, stream and num_return_sequences. The allow-list
`honours` names each of these; a warper added to `sequence_processors` runs here too, but its
field counts as honoured only once it is listed there, beside a test that shows its effect.
Not a `seed` (the manager samples from one generator shared by all its requests), beam search,
`typical_p`, `bad_words`, `logprobs` or `top_logprobs` (the manager hands its processors the
logits, but not back which token each row then drew with them), nor any field added to
`GenerationParams` before someone writes its code here and lists it: the `Router` sends those
prompts to the dynamic scheduler, which runs inside `exclusive()` (see `ModelTurns`).

On the CPU its steps attend row by row (`row_attention`), each row over its own keys, not every
row's, and a step that decodes every row's one token runs its fused int4 layers compiled
(`compiled_decode`).

The manager runs without async double-buffering and without CUDA graphs: the per-request
processors read each request's tokens on the host at every step, which needs the state of
the step being computed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable

from transformers import ContinuousBatchingConfig, GenerationConfig, LogitsProcessor

from handler.decoding.sampling import front_processors, sequence_processors
from handler.decoding.sequence import Completion, SequenceState
from handler.model.device import bind_device, cache_config
from handler.model.loading import LoadedModel
from handler.params import GenerationParams
from handler.pipeline.prompts import Prompt
from handler.schedulers.base import ChunkSink
from handler.schedulers.batch_processors import install as install_processors
from handler.schedulers.compat import GenerationOutput, RequestStatus, bind_loop_device, forget_result_handler, manager_rows
from handler.schedulers.compiled_decode import install as install_compiled_decode
from handler.schedulers.compiled_decode import seal as seal_compiled_decode
from handler.schedulers.compiled_decode import warm_up_steps
from handler.schedulers.row_attention import install as install_row_attention
from handler.schedulers.threads import run_on_passing_thread
from handler.settings import ContinuousBatchingSettings

logger = logging.getLogger(__name__)

# The most a warm-up request may take: compiling one shape of `compiled_decode` with a cold cache.
WARM_UP_TIMEOUT_SECONDS = 300


def processor_kwargs(params: GenerationParams, vocab_size: int) -> dict[str, Any]:
    """The manager's per-request processor arguments; every one is always given, so no default leaks in.

    Greedy is top_k=1 at temperature 1: the manager's `do_sample` is global, and sampling
    from a single candidate picks the argmax. top_k=0 (off) keeps the whole vocabulary.
    """
    common = {"repetition_penalty": float(params.repetition_penalty), "min_new_tokens": int(params.min_new_tokens)}
    if not params.sampling:
        return {**common, "temperature": 1.0, "top_k": 1, "top_p": 1.0}
    top_k = min(params.top_k, vocab_size) if params.top_k > 0 else vocab_size
    return {**common, "temperature": float(params.temperature), "top_k": top_k, "top_p": float(params.top_p)}


class ModelTurns:
    """Forward passes outside the manager run only while its loop is paused between two steps.

    transformers' model forward writes `config.is_causal` for its duration and restores it
    after (the manager passes False with its own masks; a plain `generate` relies on the
    default). Two threads in the model at once build wrong attention masks, and the racing
    restores can leave the config changed for good, breaking every later `generate`. So a
    thread inside `exclusive()` pauses the manager around each of its forward passes: the two
    take turns one forward pass at a time, and neither stalls the other for long.
    """

    def __init__(self, model, manager):
        self.manager = manager
        self.local = threading.local()
        self.hooks = [model.register_forward_pre_hook(self._before), model.register_forward_hook(self._after)]

    @contextmanager
    def exclusive(self):
        self.local.active = True
        try:
            yield
        finally:
            self.local.active = False
            self._release()

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def _before(self, module, args) -> None:
        if getattr(self.local, "active", False) and getattr(self.local, "pause", None) is None and self.manager.is_running():
            pause = ExitStack()
            pause.enter_context(self.manager.pause())
            self.local.pause = pause

    def _after(self, module, args, output) -> None:
        self._release()

    def _release(self) -> None:
        pause = getattr(self.local, "pause", None)
        if pause is not None:
            self.local.pause = None
            pause.close()


@dataclass
class _Sequence:
    """One manager request: its state (text, stops, stream), and the future its caller awaits."""

    request_id: str
    state: SequenceState
    future: asyncio.Future
    ids: list[int]
    in_manager: bool = True
    deadline: asyncio.TimerHandle | None = None
    unhook: Callable[[], None] | None = None


class ContinuousScheduler:
    honours = frozenset({
        "max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "min_p",
        "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "do_sample",
        "num_return_sequences", "stop", "return_full_text", "details", "stream", "response_format",
    })  # fmt: skip
    capabilities = {"continuous": honours}

    def __init__(self, loaded: LoadedModel, settings: ContinuousBatchingSettings, deadline_seconds: float | None = None):
        self.loaded = loaded
        self.settings = settings
        self.deadline_seconds = deadline_seconds
        self.vocab_size = loaded.model.config.get_text_config().vocab_size
        self.front_lists: dict[str, list[LogitsProcessor]] = {}
        self.processor_lists: dict[str, list[LogitsProcessor]] = {}
        self._ids = itertools.count()
        self.cache = cache_config(settings, loaded.device)
        self.compiled_layers = (
            install_compiled_decode(loaded.model) if settings.compile_decode_steps and loaded.device.type == "cpu" else 0
        )
        self.manager = self._start_manager()
        self.turns = ModelTurns(loaded.model, self.manager)

    @property
    def running(self) -> bool:
        return self.manager.is_running()

    @property
    def active_rows(self) -> int:
        """The sequences the manager decodes now (its own count: a cancel shows once it freed them)."""
        return manager_rows(self.manager)

    def exclusive(self):
        """Where another scheduler may run forward passes on the shared model."""
        return self.turns.exclusive()

    def stop(self) -> None:
        self.turns.remove()
        self.manager.stop(block=True, timeout=60)

    async def complete(self, prompts: list[Prompt], sink: ChunkSink | None = None) -> list[list[Completion]]:
        """`num_return_sequences` manager requests per prompt, all in flight together."""
        if not self.running:
            logger.error("the continuous batching manager stopped; starting a new one")
            self.manager.stop(block=True, timeout=60)
            self.manager = self.turns.manager = run_on_passing_thread(
                self._start_manager, name="manager-start", device=self.loaded.device
            )
        sequences = [
            [self._submit(prompt, index, n, sink) for n in range(prompt.params.num_return_sequences)]
            for index, prompt in enumerate(prompts)
        ]
        try:
            return [list(await asyncio.gather(*(s.future for s in group))) for group in sequences]
        finally:
            for group in sequences:
                for sequence in group:
                    self._retire(sequence)

    def _start_manager(self):
        """A manager with its cache allocated now, so a bad size fails the load rather than a request."""
        loaded = self.loaded
        # Placeholders that make the temperature, top-k and top-p warpers exist; every request
        # sends its own values. A config of its own, since the manager changes it in place.
        generation_config = GenerationConfig(
            do_sample=True,
            temperature=0.5,
            top_k=2,
            top_p=0.5,
            max_new_tokens=loaded.limits.max_total_tokens,
            eos_token_id=loaded.eos_token_ids,
            pad_token_id=loaded.tokenizer.pad_token_id,
        )
        config = ContinuousBatchingConfig(
            **self.cache,
            page_size=self.settings.page_size,
            max_batch_tokens=self.settings.max_batch_tokens,
            max_requests_per_batch=None if self.settings.max_rows == "auto" else self.settings.max_rows,
            per_request_processors=True,
            use_async_batching=False,
            use_cuda_graph=False,
        )
        install_row_attention()
        manager = loaded.model.init_continuous_batching(generation_config=generation_config, continuous_batching_config=config)
        install_processors(manager, loaded.eos_token_ids, self.front_lists, self.processor_lists)
        bind_loop_device(manager, lambda: bind_device(loaded.device))
        manager.start()
        if self.compiled_layers:
            self._compile_decode_steps(manager)
        return manager

    def _compile_decode_steps(self, manager) -> None:
        """Greedy requests sent in groups (`warm_up_steps`): their decode steps compile each row and
        key bucket now, at start, rather than on users' steps; then only those shapes run compiled."""
        started = time.perf_counter()
        limits, settings = self.loaded.limits, self.settings
        pages = self.cache.get("num_blocks") or 0
        for requests, length, new_tokens in warm_up_steps(
            limits.max_total_tokens, settings.max_batch_tokens, pages, settings.page_size
        ):
            params = GenerationParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=0)
            added = [
                manager.add_request(
                    input_ids=[0] * length,
                    max_new_tokens=new_tokens,
                    eos_token_id=self.loaded.eos_token_ids,
                    **processor_kwargs(params, self.vocab_size),
                )
                for _ in range(requests)
            ]
            if any(
                request_id is None or manager.get_result(request_id=request_id, timeout=WARM_UP_TIMEOUT_SECONDS) is None
                for request_id in added
            ):
                logger.warning("a warm-up request of %d tokens got no answer; shapes not compiled stay eager", length)
                break
        shapes = seal_compiled_decode(self.loaded.model)
        logger.info("compiled decode steps of %s (rows, keys) in %.1f s", shapes, time.perf_counter() - started)

    def _submit(self, prompt: Prompt, index: int, number: int, sink: ChunkSink | None) -> _Sequence:
        loop = asyncio.get_running_loop()
        send = (lambda text: sink(index, number, text)) if sink and prompt.params.stream else None
        constraint = prompt.grammar.constraint(len(prompt.input_ids)) if prompt.grammar else None
        state = SequenceState(prompt, self.loaded.tokenizer, self.loaded.eos_token_ids, send, constraint)
        sequence = _Sequence(f"ts-{next(self._ids)}", state, loop.create_future(), [])
        front = ([constraint] if constraint is not None else []) + front_processors(prompt.params, len(prompt.input_ids))
        if front:
            self.front_lists[sequence.request_id] = front
        processors = sequence_processors(prompt.params)
        if processors:
            self.processor_lists[sequence.request_id] = processors
        self.manager.register_result_handler(sequence.request_id, lambda output: self._on_output(sequence, output))
        added = self.manager.add_request(
            input_ids=list(prompt.input_ids),
            request_id=sequence.request_id,
            max_new_tokens=prompt.params.max_new_tokens,
            streaming=True,
            eos_token_id=self.loaded.eos_token_ids,
            **processor_kwargs(prompt.params, self.vocab_size),
        )
        if added is None:
            sequence.in_manager = False
            self._forget(sequence.request_id)
            sequence.future.set_exception(RuntimeError("the continuous batching manager refused the request"))
            return sequence
        if self.deadline_seconds:
            sequence.deadline = loop.call_later(self.deadline_seconds, self._expire, sequence)
        if prompt.cancel is not None:
            sequence.unhook = prompt.cancel.on_set(lambda: _call_on(loop, self._cancel, sequence))
        return sequence

    def _on_output(self, sequence: _Sequence, output: GenerationOutput) -> None:
        """Runs on the loop for each token the manager streams back."""
        if sequence.future.done():
            return
        if output.is_finished():
            sequence.in_manager = False
            self._drop_lists(sequence.request_id)
        if output.status == RequestStatus.FAILED or output.error is not None:
            sequence.future.set_exception(RuntimeError(f"generation failed: {output.error}"))
            return
        sequence.ids = output.generated_tokens
        if sequence.state.step(sequence.ids, out_of_time=output.is_finished()):
            sequence.future.set_result(sequence.state.completion())
            self._retire(sequence)

    def _expire(self, sequence: _Sequence) -> None:
        """The deadline: what was generated is the answer, with finish_reason length."""
        if not sequence.future.done():
            sequence.state.step(sequence.ids, out_of_time=True)
            sequence.future.set_result(sequence.state.completion())
            self._retire(sequence)

    def _cancel(self, sequence: _Sequence) -> None:
        """Its client went away: out of the manager now; the caller's answer is what it had, to be dropped."""
        if not sequence.future.done():
            sequence.state.abandon()
            sequence.future.set_result(sequence.state.completion())
            self._retire(sequence)

    def _retire(self, sequence: _Sequence) -> None:
        """Cancels a sequence still in the manager; after a cancel no final result comes, so its handler goes too."""
        if sequence.deadline is not None:
            sequence.deadline.cancel()
            sequence.deadline = None
        if sequence.unhook is not None:
            sequence.unhook()
            sequence.unhook = None
        if not sequence.in_manager:
            self._drop_lists(sequence.request_id)
            return
        sequence.in_manager = False
        self.manager.cancel_request(sequence.request_id)
        self._forget(sequence.request_id)
        if not sequence.future.done():
            sequence.future.cancel()

    def _forget(self, request_id: str) -> None:
        forget_result_handler(self.manager, request_id)
        self._drop_lists(request_id)

    def _drop_lists(self, request_id: str) -> None:
        self.front_lists.pop(request_id, None)
        self.processor_lists.pop(request_id, None)


def _call_on(loop: asyncio.AbstractEventLoop, callback: Callable[[_Sequence], None], sequence: _Sequence) -> None:
    """`callback(sequence)` on `loop`, from another thread; a loop that has closed has nothing left to cancel."""
    try:
        loop.call_soon_threadsafe(callback, sequence)
    except RuntimeError:
        pass
