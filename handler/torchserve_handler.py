"""The TorchServe adapter, and the only module that imports `ts`.

It translates TorchServe's lifecycle into calls on `service.Service` and owns everything
TorchServe-specific for both batching modes: statuses, content types, stream chunks and
metrics. With `handler.batching: dynamic` TorchServe hands `handle` a batch of requests and
every valid prompt of it is completed together. With `handler.batching: continuous` (and
`asyncCommunication: true` in model-config.yaml) `handle` returns a coroutine that
TorchServe's async worker awaits on its one event loop, and each request is answered on its
own. TorchServe loads this file as a top-level module, so it imports the package absolutely.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from ts.handler_utils.utils import send_intermediate_predict_response
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from handler import responses
from handler.errors import RequestError
from handler.loading import pick_device
from handler.metrics import UNITS, GenerationStats, metric_values
from handler.responses import JSON, Answer
from handler.service import Prepared, Service
from handler.settings import HandlerSettings
from handler.sources import weights_dir

logger = logging.getLogger(__name__)
METRIC_TYPES = {"counter": MetricTypes.COUNTER, "gauge": MetricTypes.GAUGE}


def send_chunk(context, index: int, prediction_index: int, text: str) -> None:
    """One piece of a streaming request's text, as a JSON line in its own HTTP chunk."""
    chunk = responses.chunk(prediction_index, text)
    send_intermediate_predict_response({index: chunk}, {index: context.request_ids[index]}, "", 200, context)


class LLMHandler(BaseHandler):
    def initialize(self, context) -> None:
        settings = HandlerSettings.from_config(context.model_yaml_config, os.environ)
        properties = context.system_properties
        model_dir = weights_dir(Path(properties["model_dir"]), settings.model_dir_override, settings.storage_uri)
        self.service = Service.start(settings, model_dir, pick_device(properties.get("gpu_id")))
        self.model_name = context.model_name
        self.initialized = True

    def handle(self, data, context):
        if self.service.settings.batching == "continuous":
            return self._handle_each(data, context)
        return super().handle(data, context)

    def preprocess(self, data: list[Any]) -> list[Prepared]:
        return [self.service.prepare(item) for item in data]

    def inference(self, batch: list[Prepared], *args, **kwargs) -> list[Answer | RequestError]:
        context = self.context
        return asyncio.run(self.service.answer(batch, lambda index, at, text: send_chunk(context, index, at, text)))

    def postprocess(self, answers: list[Answer | RequestError]) -> list[str]:
        return [self._body(self.context, index, answer) for index, answer in enumerate(answers)]

    async def _handle_each(self, data: list[Any], context) -> list[str]:
        """The coroutine TorchServe's async worker awaits: each request completed and answered on its own."""

        async def one(index: int, item: Any) -> str:
            def sink(_: int, prediction_index: int, text: str) -> None:
                send_chunk(context, index, prediction_index, text)

            [answer] = await self.service.answer([await self.service.prepare_async(item)], sink)
            return self._body(context, index, answer)

        return list(await asyncio.gather(*(one(index, item) for index, item in enumerate(data))))

    def _body(self, context, index: int, answer: Answer | RequestError) -> str:
        context.set_response_content_type(index, JSON)
        if isinstance(answer, RequestError):
            context.set_response_status(answer.status, answer.message, index)
            return answer.json()
        for _, completions in answer:
            for completion in completions:
                self._report(context, GenerationStats.of(completion))
        return responses.body(answer)

    def _report(self, context, stats: GenerationStats) -> None:
        dimensions = [Dimension("ModelName", self.model_name), Dimension("Level", "Model")]
        for name, value in metric_values(stats).items():
            unit, kind = UNITS[name]
            context.metrics.add_metric(name, value, unit, None, dimensions, METRIC_TYPES[kind])
