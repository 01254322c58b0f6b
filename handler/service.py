"""The handler without its server: the request pipeline in front of the schedulers.

`prepare` turns one request into its protocol's exchange (`protocols`) and prompts, or the
error that rejects it (shapes, then parameters, then prompts, then their response formats
compiled: `prepare_async` compiles off the event loop); `answer` completes the prompts of several requests through one
scheduler call and gives each request its answer or its own error, as data. A request whose
cancel signal is set (its client went away: `handler.cancellation`) is not generated, or stops
within a step, and is answered `CLIENT_GONE`, which nobody reads. Which server hosts this
(TorchServe today, through `torchserve_handler`) it does not know.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from handler.api.native import Answer, NativeExchange, prediction_offsets
from handler.api.protocols import Exchange, named_exchange, sniffed_exchange
from handler.cancellation import CancelSignal
from handler.errors import RequestError
from handler.model.device import is_sticky_device_error
from handler.model.loading import LoadedModel, load_model
from handler.pipeline.prompts import Prompt, encode
from handler.pipeline.shapes import RequestShape, read_body
from handler.response_format import ResponseFormat
from handler.schedulers.base import Router, Scheduler
from handler.schedulers.continuous import ContinuousScheduler
from handler.schedulers.dynamic import DynamicScheduler
from handler.schedulers.threads import run_on_passing_thread
from handler.settings import HandlerSettings
from handler.structured.constraint import CompiledFormat
from handler.structured.grammars import Grammars, tokenizer_info

logger = logging.getLogger(__name__)

# (request index, prediction index, new text): a stream chunk for one request of a batch.
RequestSink = Callable[[int, int, str], None]
Prepared = list[Prompt] | RequestError
# The answer of a request whose client went away (nginx's 499): its connection is gone, so no one reads it.
CLIENT_GONE = RequestError("the client closed the request", status=499)
# The warm-up's one constrained request: the simplest format, which every tokenizer can follow.
WARM_UP_FORMAT = ResponseFormat("json_object")


def warm_up_marker(settings: HandlerSettings, model_name: str) -> Path | None:
    """The file that says a worker of this TorchServe warmed up already; None when every start warms up.

    The warm-up shows at start that generation (and a grammar's mask) works on this device,
    and spares the first user its first-call costs. A worker started again within one
    TorchServe's life (a heal: the front empties TorchServe's temp folder at each of its starts)
    learns nothing new from it, and its first request is one the front holds for the heal
    anyway, so it skips it. A compiled model always warms up: that is where it compiles."""
    if settings.torchserve_tmp is None or settings.compile:
        return None
    return Path(settings.torchserve_tmp) / f"warmed-up-{model_name}"


def needs_compiling(prepared: Prepared) -> bool:
    return not isinstance(prepared, RequestError) and any(p.params.response_format for p in prepared)


class Service:
    def __init__(
        self,
        settings: HandlerSettings,
        loaded: LoadedModel,
        scheduler: Scheduler,
        continuous: ContinuousScheduler | None = None,
        model_name: str = "model",
        grammars: Grammars | None = None,
    ):
        self.settings = settings
        self.model_name = model_name  # what OpenAI answers call the model when a request names none
        self.loaded = loaded
        self.scheduler = scheduler
        self.continuous = continuous
        self._grammars = grammars
        # A CUDA error that broke this process's context for good; the adapter ends the worker.
        self.broken: BaseException | None = None
        self.shape = RequestShape(
            defaults=settings.defaults,
            limits=settings.limits,
            max_instances=settings.max_instances,
            max_prompt_chars=settings.max_prompt_chars,
        )

    @classmethod
    def start(cls, settings: HandlerSettings, model_dir: Path, device: torch.device, model_name: str) -> Service:
        """Loads the model and starts the schedulers `handler.batching` asks for, on a thread that
        ends with the start, so that its OpenMP pool does not slow the manager's (`handler.schedulers.threads`)."""
        return run_on_passing_thread(
            lambda: cls._start(settings, model_dir, device, model_name), name="model-start", device=device
        )

    @classmethod
    def _start(cls, settings: HandlerSettings, model_dir: Path, device: torch.device, model_name: str) -> Service:
        started = time.monotonic()
        marker = warm_up_marker(settings, model_name)
        restarted = marker is not None and marker.exists()  # a heal: nothing is timed or warmed up again
        loaded = load_model(model_dir, settings, device, first_start=not restarted)
        loading = time.monotonic() - started
        grammars = cls.grammars_for(loaded, settings)
        dynamic = DynamicScheduler(loaded, settings.deadline_seconds)
        warming = time.monotonic()
        if settings.warmup and not restarted:
            grammars.start()
            dynamic.warm_up(settings.batch_size if settings.compile else 1, cls.warm_up_format(grammars))
            if marker is not None:
                marker.touch()
            warm_up = f"warm-up {time.monotonic() - warming:.1f} s"
        else:
            warm_up = "no warm-up" if not settings.warmup else "no warm-up (this TorchServe warmed a worker already)"
        logger.info("model started in %.1f s: load %.1f s, %s", time.monotonic() - started, loading, warm_up)
        if settings.batching != "continuous":
            return cls(settings, loaded, dynamic, model_name=model_name, grammars=grammars)
        continuous = ContinuousScheduler(loaded, settings.continuous, settings.deadline_seconds)
        beside = DynamicScheduler(loaded, settings.deadline_seconds, threaded=True, guard=continuous.exclusive)
        return cls(settings, loaded, Router([continuous, beside]), continuous, model_name, grammars)

    @staticmethod
    def warm_up_format(grammars: Grammars) -> CompiledFormat | None:
        """The warm-up's constrained format; a compile that fails is logged, and the worker
        starts: unconstrained requests do not need it."""
        try:
            return grammars.compiled(WARM_UP_FORMAT)
        except RequestError as error:
            logger.error("the constrained warm-up is skipped: %s", error.message)
            return None

    @staticmethod
    def grammars_for(loaded: LoadedModel, settings: HandlerSettings) -> Grammars:
        """The compile cache for this model's vocabulary: the logits' width, its EOS ids as the ends."""
        vocab_size = loaded.model.config.get_text_config().vocab_size
        info = tokenizer_info(loaded.tokenizer, vocab_size, loaded.eos_token_ids)
        return Grammars(info, settings.structured_output)

    @property
    def grammars(self) -> Grammars:
        if self._grammars is None:
            self._grammars = self.grammars_for(self.loaded, self.settings)
        return self._grammars

    def active_rows(self) -> int:
        """Sequences being generated now, on every scheduler this service runs."""
        schedulers = getattr(self.scheduler, "schedulers", [self.scheduler])
        return sum(getattr(scheduler, "active_rows", 0) for scheduler in schedulers)

    def stop(self) -> None:
        if self.continuous is not None:
            self.continuous.stop()
        if self._grammars is not None:
            self._grammars.close()

    def prepare(self, item: Any, protocol: str | None = None) -> tuple[Exchange, Prepared]:
        """One request's exchange and its prompts, formats compiled, or the error that rejects it;
        never raises for bad input."""
        exchange, prepared = self.parse(item, protocol)
        return exchange, self.compile_formats(prepared)

    async def prepare_async(self, item: Any, protocol: str | None = None) -> tuple[Exchange, Prepared]:
        """`prepare` for an event loop: a compile (up to its time limit) runs in a thread."""
        exchange, prepared = self.parse(item, protocol)
        if not needs_compiling(prepared):
            return exchange, prepared
        return exchange, await asyncio.to_thread(self.compile_formats, prepared)

    def compile_formats(self, prepared: Prepared) -> Prepared:
        """Each prompt's response format compiled onto it, or the request's own compile error."""
        if isinstance(prepared, RequestError) or not needs_compiling(prepared):
            return prepared
        try:
            return [self.attach_format(prompt) for prompt in prepared]
        except RequestError as error:
            return error
        except Exception:  # a compiler fault answers its own request only
            logger.exception("could not compile a response format")
            return RequestError("could not compile the response format; see the server log", status=500)

    def attach_format(self, prompt: Prompt) -> Prompt:
        """`prompt` with its response format compiled onto it; raises the request's error."""
        if prompt.params.response_format is None:
            return prompt
        return replace(prompt, grammar=self.grammars.compiled(prompt.params.response_format))

    def parse(self, item: Any, protocol: str | None = None) -> tuple[Exchange, Prepared]:
        """One request's exchange (its protocol: named by `protocol`, else by its body's shape) and
        its prompts, or the error that rejects it; never raises for bad input."""
        exchange: Exchange = NativeExchange()
        try:
            exchange = named_exchange(protocol, self.model_name)
            body = read_body(item)
            if protocol is None:
                exchange = sniffed_exchange(body, self.model_name)
            instances = exchange.parse(body, self.shape)
            tokenizer, template, limits = self.loaded.tokenizer, self.settings.prompt_template, self.loaded.limits
            tool_prompt = self.settings.tool_prompt
            prompts = [encode(instance, tokenizer, template, limits, tool_prompt) for instance in instances]
            exchange.begin(prompts)
            return exchange, prompts if exchange.generates else []
        except RequestError as error:
            return exchange, error
        except Exception:  # a bug on one request's path must not fail the rest of its batch
            logger.exception("could not prepare a request")
            return exchange, RequestError("could not prepare this request; see the server log", status=500)

    async def answer(
        self, requests: list[Prepared], sink: RequestSink | None = None, cancels: Sequence[CancelSignal | None] | None = None
    ) -> list[Answer | RequestError]:
        """Every valid request's prompts in one scheduler call; a failed call answers each of them with a 500.
        `cancels` holds each request's cancel signal (or None); a request cancelled already is not generated."""
        signals = list(cancels) if cancels is not None else [None] * len(requests)
        requests = [CLIENT_GONE if _is_set(signal) else entry for entry, signal in zip(requests, signals)]
        owners = [
            (index, replace(prompt, cancel=signals[index]) if signals[index] is not None else prompt)
            for index, entry in enumerate(requests)
            if not isinstance(entry, RequestError)
            for prompt in entry
        ]
        if not owners:  # every request refused, or asking for no generation (a token count)
            return [entry if isinstance(entry, RequestError) else [] for entry in requests]
        offsets = [o for entry in requests if not isinstance(entry, RequestError) for o in prediction_offsets(entry)]

        def on_chunk(prompt_index: int, sequence: int, text: str) -> None:
            if sink is not None:
                sink(owners[prompt_index][0], offsets[prompt_index] + sequence, text)

        prompts = [prompt for _, prompt in owners]
        try:
            completions = await self.scheduler.complete(prompts, on_chunk if sink else None)
        except Exception as error:  # a failed generation must still answer every request in it
            logger.exception("generation failed for %d prompts", len(prompts))
            if is_sticky_device_error(error):
                self.broken = error
            failure = RequestError("generation failed; see the server log", status=500)
            return [entry if isinstance(entry, RequestError) else failure for entry in requests]
        answers: list[Answer | RequestError] = [
            entry if isinstance(entry, RequestError) else CLIENT_GONE if _is_set(signal) else []
            for entry, signal in zip(requests, signals)
        ]
        for (index, prompt), sequences in zip(owners, completions):
            refusal = next((c.error for c in sequences if c.error is not None), None)
            answer = answers[index]
            if answer is CLIENT_GONE:
                continue
            if refusal is not None:
                answers[index] = refusal
                continue
            elif not isinstance(answer, RequestError):
                answer.append((prompt, sequences))
        return answers


def _is_set(signal: CancelSignal | None) -> bool:
    return signal is not None and signal.is_set()
