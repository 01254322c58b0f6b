"""An unexpected error while preparing one request fails that request, not its batch.

The model here is a tiny random Llama whose chat template divides by zero for system
messages: a real bug of the kind a Hub template can carry, raising a ZeroDivisionError
(not a RequestError) inside `prepare`. Before the fix TorchServe answered 503 to every
request in the batch.
"""

import shutil
from pathlib import Path

import pytest
from ts.context import Context

from handler.torchserve_handler import LLMHandler
from tests.support.context import make_context, run_batch

BROKEN_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ 1 / 0 }}{% endif %}"
    "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}assistant:"
)


@pytest.fixture(scope="module")
def handler(tiny_model_dir: Path, tmp_path_factory) -> tuple[LLMHandler, Context]:
    model_dir = tmp_path_factory.mktemp("broken-template")
    shutil.copytree(tiny_model_dir, model_dir, dirs_exist_ok=True)
    (model_dir / "chat_template.jinja").write_text(BROKEN_TEMPLATE)
    context = make_context(
        "tiny", model_dir, {"handler": {"warmup": False, "dtype": "float32", "defaults": {"max_new_tokens": 3, "temperature": 0}}}
    )
    llm = LLMHandler()
    llm.initialize(context)
    return llm, context


def test_a_request_that_breaks_the_template_fails_alone(handler):
    llm, context = handler
    results = run_batch(
        llm,
        context,
        [
            {"instances": [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}]},
            {"instances": ["Hello"]},
            {"instances": [{"messages": [{"role": "user", "content": "hi"}]}]},
        ],
    )
    assert [status for status, _ in results] == [500, 200, 200]
    assert "see the server log" in results[0][1]["error"]
    assert "predictions" in results[1][1] and "predictions" in results[2][1]


def test_a_bad_min_p_is_refused_alone_on_the_dynamic_path(handler):
    llm, context = handler
    results = run_batch(llm, context, [{"inputs": "Hello", "parameters": {"min_p": -1}}, {"instances": ["Hello"]}])
    assert [status for status, _ in results] == [400, 200]
    assert results[0][1]["field"] == "parameters.min_p" and "min_p" in results[0][1]["error"]
