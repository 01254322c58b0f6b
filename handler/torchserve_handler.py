"""The TorchServe adapter, and the only module that imports `ts`.

It translates TorchServe's lifecycle into calls on `service.Service` and owns everything
TorchServe-specific for both batching modes: the protocol header the front sets
(`X-LLM-Protocol`), statuses, content types, stream chunks and metrics. With `handler.batching:
dynamic` TorchServe hands `handle` a batch of requests and every valid prompt of it is completed
together. With `handler.batching: continuous` (and `asyncCommunication: true` in
model-config.yaml) `handle` returns a coroutine that TorchServe's async worker awaits on its one
event loop, and each request is answered on its own. TorchServe loads this file as a top-level
module, so it imports the package absolutely.

Cancel on disconnect (`handler.cancellation`): the front names each request in
`X-LLM-Request-Id`; the adapter watches that id in the worker's registry while the request is
served, and a listener thread, started here, sets it when the front says the client left.
The adapter reports the rows being generated (`ActiveRows`, sampled every ROWS_SAMPLE_S and
sent when it changes) and the requests being served whose cancel the worker heard
(`CancelledRequests`, at once, from the listener's thread).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path
from typing import Any

from ts.handler_utils.utils import send_intermediate_predict_response
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from handler.api.native import JSON, Answer
from handler.api.protocols import PROTOCOL_HEADER, Exchange
from handler.cancellation import REQUEST_ID_HEADER, CancelListener, CancelRegistry
from handler.errors import RequestError
from handler.metrics import (
    ACTIVE_ROWS_METRIC,
    CANCELLED_METRIC,
    DTYPE_METRIC,
    UNITS,
    GenerationStats,
    dtype_metric_values,
    metric_values,
)
from handler.model.device import pick_device
from handler.model.dtype_cache import write_json
from handler.model.sources import weights_dir
from handler.service import Prepared, Service
from handler.settings import DTYPE_REPORTS, HandlerSettings

logger = logging.getLogger(__name__)
METRIC_TYPES = {"counter": MetricTypes.COUNTER, "gauge": MetricTypes.GAUGE}
# After a CUDA error that broke the context, the worker ends this long after it answered, so
# that TorchServe has sent the answers; it then starts a new worker, with a new context.
BROKEN_EXIT_DELAY_S = 2.0
BROKEN_EXIT_CODE = 70
# How often the worker's row count is read for its gauge: well inside the 1 s a freed row must show in.
ROWS_SAMPLE_S = 0.1
# A request's exchange, its answer (or error), and whether pieces of it were already sent.
Answered = tuple[Exchange, Answer | RequestError, bool]


def send_piece(context, index: int, exchange: Exchange, prediction_index: int, text: str) -> None:
    """One piece of a streaming request's text, in its protocol's form, in its own HTTP chunk."""
    context.set_response_content_type(index, exchange.content_type)
    piece = exchange.piece(prediction_index, text)
    send_intermediate_predict_response({index: piece}, {index: context.request_ids[index]}, "", 200, context)


def header_of(context, index: int, name: str) -> str | None:
    """Request `index`'s header `name`, whatever its case."""
    wanted = name.lower()
    headers = context.get_all_request_header(index) or {}
    return next((str(value) for key, value in headers.items() if str(key).lower() == wanted), None)


def protocol_of(context, index: int) -> str | None:
    """The protocol the front named for request `index` (`X-LLM-Protocol`)."""
    return header_of(context, index, PROTOCOL_HEADER)


def request_id_of(context, index: int) -> str | None:
    """The id the front gave request `index` (`X-LLM-Request-Id`), which its cancel names."""
    return header_of(context, index, REQUEST_ID_HEADER)


def seconds_since_process_start() -> float | None:
    """How long this worker process has run (Linux's /proc): its Python start and imports, when
    `initialize` begins; None where /proc does not say."""
    try:
        # Field 22 of /proc/self/stat, after the command name in parentheses (which may hold spaces).
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


class LLMHandler(BaseHandler):
    def initialize(self, context) -> None:
        before = seconds_since_process_start()
        if before is not None:
            logger.info("worker process up %.1f s before initialize (Python's start and imports)", before)
        settings = HandlerSettings.from_config(context.model_yaml_config, os.environ)
        properties = context.system_properties
        model_dir = weights_dir(Path(properties["model_dir"]), settings.model_dir_override, settings.storage_uri)
        self.service = Service.start(settings, model_dir, pick_device(properties.get("gpu_id")), context.model_name)
        self.model_name = context.model_name
        self._report_dtype(context)
        self.cancels = CancelRegistry(on_cancel=lambda: self._emit(context, CANCELLED_METRIC, 1))
        self.listener = CancelListener.start_for(self.cancels, settings.run_dir, context.model_name)
        self._closing = threading.Event()
        self._watch_rows(context)
        self.initialized = True

    def close(self) -> None:
        """Stops the worker's own threads (the cancel listener, the row gauge); TorchServe never calls it, tests do."""
        self._closing.set()
        if self.listener is not None:
            self.listener.close()

    def handle(self, data, context):
        if self.service.settings.batching == "continuous":
            return self._handle_each(data, context)
        return super().handle(data, context)

    def preprocess(self, data: list[Any]) -> list[tuple[Exchange, Prepared]]:
        return [self.service.prepare(item, protocol_of(self.context, index)) for index, item in enumerate(data)]

    def inference(self, batch: list[tuple[Exchange, Prepared]], *args, **kwargs) -> list[Answered]:
        context = self.context
        exchanges = [exchange for exchange, _ in batch]
        streamed: set[int] = set()

        def sink(index: int, prediction_index: int, text: str) -> None:
            streamed.add(index)
            send_piece(context, index, exchanges[index], prediction_index, text)

        ids = [request_id_of(context, index) for index in range(len(batch))]
        signals = [self.cancels.watch(request_id) for request_id in ids]
        try:
            answers = asyncio.run(self.service.answer([prepared for _, prepared in batch], sink, signals))
        finally:
            for request_id in ids:
                self.cancels.forget(request_id)
        return [(exchange, answer, index in streamed) for index, (exchange, answer) in enumerate(zip(exchanges, answers))]

    def postprocess(self, answered: list[Answered]) -> list[str]:
        bodies = [self._body(self.context, index, *entry) for index, entry in enumerate(answered)]
        self._end_if_broken()
        return bodies

    def _end_if_broken(self) -> None:
        """A sticky CUDA error leaves every later request failing while the worker stays READY:
        the process ends (`os._exit`, as no clean-up can run on a broken context) once its
        answers are out, and TorchServe's restart gives the next worker a working GPU."""
        error = self.service.broken
        if error is None or getattr(self, "_ending", False):
            return
        self._ending = True
        logger.critical("the GPU context is broken (%s): this worker exits in %.0f s to be restarted", error, BROKEN_EXIT_DELAY_S)
        timer = threading.Timer(BROKEN_EXIT_DELAY_S, os._exit, args=(BROKEN_EXIT_CODE,))
        timer.daemon = True
        timer.start()

    async def _handle_each(self, data: list[Any], context) -> list[str]:
        """The coroutine TorchServe's async worker awaits: each request completed and answered on its own."""

        async def one(index: int, item: Any) -> str:
            request_id = request_id_of(context, index)
            signal = self.cancels.watch(request_id)
            try:
                exchange, prepared = await self.service.prepare_async(item, protocol_of(context, index))
                streamed = False

                def sink(_: int, prediction_index: int, text: str) -> None:
                    nonlocal streamed
                    streamed = True
                    send_piece(context, index, exchange, prediction_index, text)

                [answer] = await self.service.answer([prepared], sink, [signal])
            finally:
                self.cancels.forget(request_id)
            return self._body(context, index, exchange, answer, streamed)

        bodies = list(await asyncio.gather(*(one(index, item) for index, item in enumerate(data))))
        self._end_if_broken()
        return bodies

    def _body(self, context, index: int, exchange: Exchange, answer: Answer | RequestError, streamed: bool) -> str:
        """The last part of a response: the whole body, the end of a stream, or an error in the exchange's shape.

        An error after an SSE stream began is an event of that stream: its status line has gone."""
        if isinstance(answer, RequestError):
            if streamed:
                return exchange.stream_error(answer)
            context.set_response_content_type(index, JSON)
            context.set_response_status(answer.status, answer.message, index)
            return exchange.error_body(answer)
        context.set_response_content_type(index, exchange.content_type)
        for _, completions in answer:
            for completion in completions:
                self._report(context, GenerationStats.of(completion))
        return exchange.body(answer)

    def _report(self, context, stats: GenerationStats) -> None:
        dimensions = [Dimension("ModelName", self.model_name), Dimension("Level", "Model")]
        for name, value in metric_values(stats).items():
            unit, kind = UNITS[name]
            context.metrics.add_metric(name, value, unit, None, dimensions, METRIC_TYPES[kind])

    def _emit(self, context, metric: tuple[str, str, str], value: float) -> None:
        name, unit, kind = metric
        dimensions = [Dimension("ModelName", self.model_name), Dimension("Level", "Model")]
        context.metrics.add_metric(name, value, unit, None, dimensions, METRIC_TYPES[kind])

    def _watch_rows(self, context) -> None:
        """`ActiveRows` now and on every change: a thread reads the schedulers' counts (a few ints) every
        ROWS_SAMPLE_S, so a row that a cancel freed shows while the worker is inside a `generate`."""
        self._emit(context, ACTIVE_ROWS_METRIC, 0)

        def watch() -> None:
            shown = 0
            while not self._closing.wait(ROWS_SAMPLE_S):
                rows = self.service.active_rows()
                if rows != shown:
                    self._emit(context, ACTIVE_ROWS_METRIC, rows)
                    shown = rows

        threading.Thread(target=watch, name="active-rows", daemon=True).start()

    def _report_dtype(self, context) -> None:
        """`dtype: auto`'s decision, once per start: which format serves, from which step times, as
        metrics and in the run folder, where the front's /health reads it."""
        choice = self.service.loaded.dtype_choice
        if choice is None:
            return
        if self.service.settings.run_dir:
            report = Path(self.service.settings.run_dir) / DTYPE_REPORTS / f"{self.model_name}.json"
            write_json(report, choice.report(), "dtype report")
        name, unit, kind = DTYPE_METRIC
        for value, extra in dtype_metric_values(choice):
            dimensions = [Dimension("ModelName", self.model_name), Dimension("Level", "Model")]
            dimensions += [Dimension(key, text) for key, text in extra.items()]
            context.metrics.add_metric(name, value, unit, None, dimensions, METRIC_TYPES[kind])
