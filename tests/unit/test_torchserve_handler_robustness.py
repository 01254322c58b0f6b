"""An unexpected error while preparing one request fails that request, not its batch.

The model here is a tiny random Llama whose chat template divides by zero for system
messages: a real bug of the kind a Hub template can carry, raising a ZeroDivisionError
(not a RequestError) inside `prepare`. Before the fix TorchServe answered 503 to every
request in the batch.
"""

import json
import shutil
from pathlib import Path

import pytest
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from handler.torchserve_handler import LLMHandler
from tests.support.torchserve import ROOT

BROKEN_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ 1 / 0 }}{% endif %}"
    "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}assistant:"
)


@pytest.fixture(scope="module")
def handler(tiny_model_dir: Path, tmp_path_factory) -> tuple[LLMHandler, Context]:
    model_dir = tmp_path_factory.mktemp("broken-template")
    shutil.copytree(tiny_model_dir, model_dir, dirs_exist_ok=True)
    (model_dir / "chat_template.jinja").write_text(BROKEN_TEMPLATE)
    metrics = MetricsCacheYamlImpl(str(ROOT / "metrics.yaml"))
    metrics.initialize_cache()
    context = Context("tiny", str(model_dir), {}, 4, None, "0.12.0", metrics=metrics,
                      model_yaml_config={"handler": {"warmup": False, "defaults": {"max_new_tokens": 3, "temperature": 0}}})
    metrics.model_name = "tiny"
    llm = LLMHandler()
    llm.initialize(context)
    return llm, context


def run_batch(llm: LLMHandler, context: Context, bodies: list) -> list[tuple[int, dict]]:
    context.request_ids = {i: f"request-{i}" for i in range(len(bodies))}
    context.request_processor = [RequestProcessor({}) for _ in bodies]
    context.metrics.request_ids = context.request_ids
    outputs = llm.handle([{"body": body} for body in bodies], context)
    return [(context.get_response_status(i)[0], json.loads(out)) for i, out in enumerate(outputs)]


def test_a_request_that_breaks_the_template_fails_alone(handler):
    llm, context = handler
    results = run_batch(llm, context, [
        {"instances": [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}]},
        {"instances": ["Hello"]},
        {"instances": [{"messages": [{"role": "user", "content": "hi"}]}]},
    ])
    assert [status for status, _ in results] == [500, 200, 200]
    assert "see the server log" in results[0][1]["error"]
    assert "predictions" in results[1][1] and "predictions" in results[2][1]
