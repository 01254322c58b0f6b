"""The thin TorchServe adapter: translates the handler lifecycle into calls on the other modules.

In the classic path TorchServe hands `handle` a batch of requests; each one is parsed and
validated on its own, bad ones get their own 4xx, and every valid prompt of the batch is
generated together. With `handler.batching: continuous` (and `asyncCommunication: true`
in model-config.yaml) `handle` returns a coroutine that TorchServe's async worker awaits,
one request at a time, and transformers' continuous batching serves them together.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ts.handler_utils.utils import send_intermediate_predict_response
from ts.torch_handler.base_handler import BaseHandler

from handler.engine import Completion, Engine, pick_device
from handler.errors import RequestError
from handler.metrics import GenerationStats, report
from handler.prompts import Prompt, encode
from handler.requests import RequestShape, parse_request
from handler.settings import HandlerSettings
from handler.sources import weights_dir

logger = logging.getLogger(__name__)
JSON = "application/json"


def prediction(completion: Completion, prompt: Prompt) -> dict[str, Any]:
    text = prompt.text + completion.text if prompt.params.return_full_text else completion.text
    result: dict[str, Any] = {"generated_text": text}
    if prompt.params.details:
        result.update(
            finish_reason=completion.finish_reason.value,
            prompt_tokens=completion.prompt_tokens,
            generated_tokens=completion.generated_tokens,
        )
    return result


def prediction_offsets(prompts: list[Prompt]) -> list[int]:
    """Where each prompt's first sequence sits in its request's `predictions`; a stream chunk's
    `index` is that position plus the sequence number, so every chunk names its prediction."""
    offsets, total = [], 0
    for prompt in prompts:
        offsets.append(total)
        total += prompt.params.num_return_sequences
    return offsets


def send_chunk(context, index: int, prediction_index: int, text: str) -> None:
    """One piece of a streaming request's text, as a JSON line in its own HTTP chunk."""
    chunk = json.dumps({"index": prediction_index, "text": text}) + "\n"
    send_intermediate_predict_response({index: chunk}, {index: context.request_ids[index]}, "", 200, context)


class LLMHandler(BaseHandler):
    def initialize(self, context) -> None:
        self.settings = HandlerSettings.from_config(context.model_yaml_config, os.environ)
        properties = context.system_properties
        device = pick_device(properties.get("gpu_id"))
        model_dir = weights_dir(Path(properties["model_dir"]), self.settings.model_dir_override, self.settings.storage_uri)
        self.engine = Engine.load(model_dir, self.settings, device)
        self.shape = RequestShape(
            defaults=self.settings.defaults,
            limits=self.settings.limits,
            max_instances=self.settings.max_instances,
            max_prompt_chars=self.settings.max_prompt_chars,
        )
        if self.settings.warmup:
            self.engine.warm_up()
        if self.settings.batching == "continuous":
            from handler.continuous import continuous_engine

            continuous_engine(self)  # allocates the manager's cache now, so a bad size fails the load
        self.model_name = context.model_name
        self.initialized = True

    def handle(self, data, context):
        if self.settings.batching == "continuous":
            from handler.continuous import handle_one

            return handle_one(self, data, context)
        return super().handle(data, context)

    def preprocess(self, data: list[Any]) -> list[list[Prompt] | RequestError]:
        return [self.prepare(item) for item in data]

    def prepare(self, item: Any) -> list[Prompt] | RequestError:
        """One request's prompts, or the error that rejects it; never raises for bad input."""
        try:
            instances = parse_request(item, self.shape)
            return [
                encode(instance, self.engine.tokenizer, self.settings.prompt_template, self.engine.limits, f"instances[{i}]")
                for i, instance in enumerate(instances)
            ]
        except RequestError as error:
            return error
        except Exception:  # a bug on one request's path must not fail the rest of its batch
            logger.exception("could not prepare a request")
            return RequestError("could not prepare this request; see the server log", status=500)

    def inference(self, batch: list[list[Prompt] | RequestError], *args, **kwargs) -> list[Any]:
        owners = [(index, prompt) for index, entry in enumerate(batch) if not isinstance(entry, RequestError) for prompt in entry]
        if not owners:
            return batch
        prompts = [prompt for _, prompt in owners]
        try:
            completions = self.engine.generate(prompts, stream=self._streamer(batch))
        except Exception:  # a failed generate must still answer every request in it
            logger.exception("generation failed for %d prompts", len(prompts))
            failure = RequestError("generation failed; see the server log", status=500)
            return [entry if isinstance(entry, RequestError) else failure for entry in batch]
        results: list[Any] = list(batch)
        for index, entry in enumerate(batch):
            if not isinstance(entry, RequestError):
                results[index] = []
        for (index, prompt), sequences in zip(owners, completions):
            results[index].append((prompt, sequences))
            self._report(sequences)
        return results

    def postprocess(self, results: list[Any]) -> list[str]:
        bodies = []
        for index, result in enumerate(results):
            self.context.set_response_content_type(index, JSON)
            if isinstance(result, RequestError):
                self.context.set_response_status(result.status, result.message, index)
                bodies.append(result.json())
                continue
            predictions = [prediction(c, prompt) for prompt, sequences in result for c in sequences]
            bodies.append(json.dumps({"predictions": predictions}))
        return bodies

    def _streamer(self, batch: list[list[Prompt] | RequestError]):
        """Sends each streaming request's new text as an HTTP chunk of JSON lines."""
        prepared = [(index, entry) for index, entry in enumerate(batch) if not isinstance(entry, RequestError)]
        owners = [index for index, prompts in prepared for _ in prompts]
        offsets = [offset for _, prompts in prepared for offset in prediction_offsets(prompts)]

        def send(prompt_index: int, sequence: int, text: str) -> None:
            send_chunk(self.context, owners[prompt_index], offsets[prompt_index] + sequence, text)

        return send

    def _report(self, sequences: list[Completion]) -> None:
        for completion in sequences:
            report(
                self.context.metrics,
                self.model_name,
                GenerationStats(
                    completion.prompt_tokens,
                    completion.generated_tokens,
                    completion.seconds,
                    completion.first_token_seconds,
                ),
            )
