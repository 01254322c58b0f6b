"""Continuous batching: TorchServe's async worker hands each request to one shared manager.

With `handler.batching: continuous` (and `asyncCommunication: true`, `batchSize: 1` in
model-config.yaml) `LLMHandler.handle` returns `handle_one(...)`, a coroutine that
TorchServe awaits on its single asyncio loop. Each request is parsed and validated by the
handler's own `prepare`; its prompts join transformers' continuous batching manager, which
generates on its own thread and adds or retires sequences at every step, so a short request
never waits for a long neighbour. The manager's results come back to the loop through
`loop.call_soon_threadsafe` (its `register_result_handler`), and the loop never blocks on
generation.

Routing rule, per prompt (one instance of a request):
- the manager serves it when it can honour every parameter exactly: max_new_tokens, EOS,
  min_new_tokens and repetition_penalty (the two per-request processors below), temperature,
  top_k, top_p (its own per-request warpers; greedy is top_k=1), do_sample, stop strings
  (checked here on each streamed token, then the request is cancelled), details,
  return_full_text, stream, and num_return_sequences (one manager request per sequence);
- a prompt with a `seed` (the manager samples from one generator shared by all its
  requests), beam search (`num_beams > 1`), `typical_p < 1` or `bad_words` goes to the
  classic `Engine.generate` in a worker thread instead, one classic generate at a time, so
  that those parameters are honoured rather than silently dropped.

Streaming sends the same chunks as the classic path: a JSON line `{"index": prediction,
"text": ...}` per new piece (`index` is the position in the final `predictions`), holding
back text that may start a stop string or a half-decoded character; the handler's return
value ends the stream. `handler.deadline_seconds`
counts from a sequence's submission: one still running then is cancelled and answered with
what it has, finish_reason "length".

The manager runs without async double-buffering and without CUDA graphs: the two
per-request processors read each request's tokens on the host at every step, which needs
the state of the step being computed. The classic engine and the manager share the model
but never run a forward pass at the same time (see `ModelTurns`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from transformers import ContinuousBatchingConfig, GenerationConfig
from transformers.generation.continuous_batching.requests import GenerationOutput, RequestStatus

from handler.batch_processors import install as install_processors
from handler.engine import Completion, Engine, RowTracker
from handler.errors import RequestError
from handler.metrics import GenerationStats, report
from handler.params import GenerationParams
from handler.prompts import Prompt
from handler.settings import ContinuousBatchingSettings
from handler.torchserve_handler import prediction, prediction_offsets, send_chunk

logger = logging.getLogger(__name__)
JSON = "application/json"

# (sequence index, new text) for one streaming request; the index counts within the request.
ChunkSink = Callable[[int, str], None]


def classic_reason(params: GenerationParams) -> str | None:
    """The parameter that the manager cannot honour exactly, or None when it can serve the prompt."""
    if params.seed is not None:
        return "seed"
    if params.uses_beams:
        return "num_beams"
    if params.typical_p < 1.0:
        return "typical_p"
    if params.bad_words:
        return "bad_words"
    return None


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
    """Classic forward passes run only while the manager's loop is paused between two steps.

    transformers' model forward writes `config.is_causal` for its duration and restores it
    after (the manager passes False with its own masks; a plain `generate` relies on the
    default). Two threads in the model at once build wrong attention masks, and the racing
    restores can leave the config changed for good, breaking every later classic generate.
    So a thread inside `classic()` pauses the manager around each of its forward passes:
    the two take turns one forward pass at a time, and neither stalls the other for long.
    """

    def __init__(self, model, manager):
        self.manager = manager
        self.local = threading.local()
        self.hooks = [model.register_forward_pre_hook(self._before), model.register_forward_hook(self._after)]

    @contextmanager
    def classic(self):
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
    """One manager request: its tracker (text, stops, stream), and the future its caller awaits."""

    request_id: str
    tracker: RowTracker
    future: asyncio.Future
    ids: list[int]
    in_manager: bool = True
    deadline: asyncio.TimerHandle | None = None


class ContinuousEngine:
    """One continuous batching manager per worker, plus the classic engine for what it cannot honour."""

    def __init__(self, engine: Engine, settings: ContinuousBatchingSettings, deadline_seconds: float | None = None):
        self.engine = engine
        self.deadline_seconds = deadline_seconds
        self.vocab_size = engine.model.config.get_text_config().vocab_size
        # Placeholders that make the temperature, top-k and top-p warpers exist; every request
        # sends its own values. A config of its own, since the manager changes it in place.
        generation_config = GenerationConfig(
            do_sample=True,
            temperature=0.5,
            top_k=2,
            top_p=0.5,
            max_new_tokens=engine.limits.max_total_tokens,
            eos_token_id=engine.eos_token_ids,
            pad_token_id=engine.tokenizer.pad_token_id,
        )
        config = ContinuousBatchingConfig(
            num_blocks=settings.num_blocks,
            page_size=settings.page_size,
            max_batch_tokens=settings.max_batch_tokens,
            per_request_processors=True,
            use_async_batching=False,
            use_cuda_graph=False,
        )
        self.manager = engine.model.init_continuous_batching(generation_config=generation_config, continuous_batching_config=config)
        install_processors(self.manager, engine.eos_token_ids)
        self.manager.start()
        self.turns = ModelTurns(engine.model, self.manager)
        self._ids = itertools.count()
        self._classic_locks: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}

    @property
    def running(self) -> bool:
        return self.manager.is_running()

    def stop(self) -> None:
        self.turns.remove()
        self.manager.stop(block=True, timeout=60)

    async def complete(self, prompt: Prompt, stream: ChunkSink | None = None) -> list[Completion]:
        """`num_return_sequences` completions of one prompt, each one manager request."""
        sequences = [self._submit(prompt, n, stream) for n in range(prompt.params.num_return_sequences)]
        try:
            return list(await asyncio.gather(*(s.future for s in sequences)))
        finally:
            for sequence in sequences:
                self._retire(sequence)

    async def classic(self, prompts: list[Prompt], stream: Callable[[int, int, str], None] | None = None):
        """The classic engine in a worker thread, one generate at a time; its chunks reach the loop in order."""
        loop = asyncio.get_running_loop()
        lock = self._classic_locks.setdefault(loop, asyncio.Lock())

        def sink(prompt_index: int, sequence: int, text: str) -> None:
            loop.call_soon_threadsafe(stream, prompt_index, sequence, text)

        def generate() -> list[list[Completion]]:
            with self.turns.classic():
                return self.engine.generate(prompts, sink if stream else None)

        async with lock:
            return await asyncio.to_thread(generate)

    def _submit(self, prompt: Prompt, index: int, stream: ChunkSink | None) -> _Sequence:
        loop = asyncio.get_running_loop()
        sink = (lambda text: stream(index, text)) if stream and prompt.params.stream else None
        tracker = RowTracker(prompt, self.engine.tokenizer, self.engine.eos_token_ids, sink)
        sequence = _Sequence(f"ts-{next(self._ids)}", tracker, loop.create_future(), [])
        self.manager.register_result_handler(sequence.request_id, lambda output: self._on_output(sequence, output))
        added = self.manager.add_request(
            input_ids=list(prompt.input_ids),
            request_id=sequence.request_id,
            max_new_tokens=prompt.params.max_new_tokens,
            streaming=True,
            eos_token_id=self.engine.eos_token_ids,
            **processor_kwargs(prompt.params, self.vocab_size),
        )
        if added is None:
            sequence.in_manager = False
            self._forget(sequence.request_id)
            sequence.future.set_exception(RuntimeError("the continuous batching manager refused the request"))
        elif self.deadline_seconds:
            sequence.deadline = loop.call_later(self.deadline_seconds, self._expire, sequence)
        return sequence

    def _on_output(self, sequence: _Sequence, output: GenerationOutput) -> None:
        """Runs on the loop for each token the manager streams back."""
        if sequence.future.done():
            return
        if output.is_finished():
            sequence.in_manager = False
        if output.status == RequestStatus.FAILED or output.error is not None:
            sequence.future.set_exception(RuntimeError(f"generation failed: {output.error}"))
            return
        sequence.ids = output.generated_tokens
        finished = sequence.tracker.step(sequence.ids, out_of_time=output.is_finished())
        if finished:
            sequence.future.set_result(sequence.tracker.completion())
            self._retire(sequence)

    def _expire(self, sequence: _Sequence) -> None:
        """The deadline: what was generated is the answer, with finish_reason length."""
        if not sequence.future.done():
            sequence.tracker.step(sequence.ids, out_of_time=True)
            sequence.future.set_result(sequence.tracker.completion())
            self._retire(sequence)

    def _retire(self, sequence: _Sequence) -> None:
        """Cancels a sequence still in the manager; after a cancel no final result comes, so its handler goes too."""
        if sequence.deadline is not None:
            sequence.deadline.cancel()
            sequence.deadline = None
        if not sequence.in_manager:
            return
        sequence.in_manager = False
        self.manager.cancel_request(sequence.request_id)
        self._forget(sequence.request_id)
        if not sequence.future.done():
            sequence.future.cancel()

    def _forget(self, request_id: str) -> None:
        router = self.manager.output_router
        with router._lock:
            router.result_handlers.pop(request_id, None)


def continuous_engine(handler) -> ContinuousEngine:
    """The worker's engine, made on first use; made again if the manager's thread died."""
    current = getattr(handler, "continuous_engine", None)
    if current is not None and current.running:
        return current
    if current is not None:
        logger.error("the continuous batching manager stopped; starting a new one")
        current.stop()
    handler.continuous_engine = ContinuousEngine(handler.engine, handler.settings.continuous, handler.settings.deadline_seconds)
    return handler.continuous_engine


def handle_one(handler, data: list[Any], context) -> Any:
    """The coroutine TorchServe's async worker awaits: one body per request of `data`."""

    async def run() -> list[str]:
        engine = continuous_engine(handler)
        return list(await asyncio.gather(*(_serve(handler, engine, item, i, context) for i, item in enumerate(data))))

    return run()


async def _serve(handler, engine: ContinuousEngine, item: Any, index: int, context) -> str:
    context.set_response_content_type(index, JSON)
    prepared = handler.prepare(item)
    if isinstance(prepared, RequestError):
        context.set_response_status(prepared.status, prepared.message, index)
        return prepared.json()
    try:
        results = await _generate(engine, prepared, partial(send_chunk, context, index))
    except Exception:  # a failed generation answers its own request only
        logger.exception("generation failed for %d prompts", len(prepared))
        error = RequestError("generation failed; see the server log", status=500)
        context.set_response_status(error.status, error.message, index)
        return error.json()
    predictions = []
    for prompt, completions in zip(prepared, results):
        for completion in completions:
            predictions.append(prediction(completion, prompt))
            stats = GenerationStats(
                completion.prompt_tokens, completion.generated_tokens, completion.seconds, completion.first_token_seconds
            )
            report(context.metrics, handler.model_name, stats)
    return json.dumps({"predictions": predictions})


async def _generate(engine: ContinuousEngine, prompts: list[Prompt], send: ChunkSink) -> list[list[Completion]]:
    """Every prompt's completions in order: manager prompts one task each, classic ones in one generate."""
    classic = [i for i, p in enumerate(prompts) if classic_reason(p.params)]
    offsets = prediction_offsets(prompts)

    def sender(offset: int) -> ChunkSink:
        return lambda sequence, text: send(offset + sequence, text)

    tasks: dict[int, asyncio.Future] = {
        i: asyncio.ensure_future(engine.complete(p, sender(offsets[i]))) for i, p in enumerate(prompts) if i not in classic
    }
    pending = list(tasks.values())
    if classic:

        def classic_sink(position: int, sequence: int, text: str) -> None:
            send(offsets[classic[position]] + sequence, text)

        group = asyncio.ensure_future(engine.classic([prompts[i] for i in classic], classic_sink))
        pending.append(group)
    try:
        await asyncio.gather(*pending)
    except BaseException:
        for task in pending:
            task.cancel()
        raise
    results = {i: task.result() for i, task in tasks.items()}
    if classic:
        results.update(zip(classic, group.result()))
    return [results[i] for i in range(len(prompts))]
