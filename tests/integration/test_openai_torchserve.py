"""The OpenAI protocol through a real TorchServe serving SmolLM2 on both batching paths.

The front relays `/v1/...` bodies to `/predictions/APP` with `X-LLM-Protocol`; here the
requests carry that header themselves, so what is checked is TorchServe's part: statuses, the
SSE content type and chunking of a stream, greedy text, usage, stop strings.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any, Iterator

import pytest
from transformers import AutoTokenizer

from tests.support.torchserve import TorchServe, build_archive, continuous_model_config, dynamic_model_config

PATHS = ("dynamic", "continuous")
CHAT = {"X-LLM-Protocol": "openai-chat"}
COMPLETIONS = {"X-LLM-Protocol": "openai-completions"}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[TorchServe]:
    workdir = tmp_path_factory.mktemp("torchserve-openai")
    store = workdir / "store"
    store.mkdir()
    configs = {"dynamic": dynamic_model_config("smollm2"), "continuous": continuous_model_config("smollm2")}
    models = {f"smollm2-{path}": build_archive("smollm2", f"smollm2-{path}", store, config) for path, config in configs.items()}
    served = TorchServe(workdir, models)
    try:
        served.start()
        yield served
    finally:
        served.stop()


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def send(server: TorchServe, path: str, body: Any, headers: dict[str, str]) -> tuple[int, dict[str, str], list[bytes]]:
    """The status, headers and each read of the response as it arrived."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        connection.request("POST", f"/predictions/smollm2-{path}", body=data, headers={"Content-Type": "application/json", **headers})
        response = connection.getresponse()
        reads = []
        while block := response.read1(65536):
            reads.append(block)
        return response.status, {k.lower(): v for k, v in response.getheaders()}, reads
    finally:
        connection.close()


def answer(server: TorchServe, path: str, body: Any, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    status, _, reads = send(server, path, body, headers)
    return status, json.loads(b"".join(reads))


@pytest.mark.parametrize("path", PATHS)
def test_chat_answers_with_the_tokenizers_usage(server, tokenizer, path):
    status, body = answer(server, path, {"model": "smollm2", "messages": QUESTION, "max_tokens": 12, "temperature": 0}, CHAT)
    assert status == 200 and body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert "Paris" in choice["message"]["content"]
    prompt_ids = tokenizer.apply_chat_template(QUESTION, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)
    completion = len(tokenizer(choice["message"]["content"], add_special_tokens=False)["input_ids"])
    assert body["usage"]["completion_tokens"] == completion + (choice["finish_reason"] == "stop")


@pytest.mark.parametrize("path", PATHS)
def test_a_stream_is_sse_in_chunks_whose_deltas_make_the_greedy_text(server, path):
    body = {"messages": QUESTION, "max_tokens": 24, "temperature": 0}
    whole = answer(server, path, body, CHAT)[1]["choices"][0]["message"]["content"]
    status, headers, reads = send(server, path, {**body, "stream": True}, CHAT)
    assert status == 200 and headers["content-type"] == "text/event-stream"
    events = [e for e in b"".join(reads).decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and len(reads) >= 3
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole


@pytest.mark.parametrize("path", PATHS)
def test_stop_strings_end_the_text_with_finish_reason_stop(server, path):
    body = {"model": "smollm2", "prompt": "One, two, three, four,", "max_tokens": 16, "temperature": 0}
    plain = answer(server, path, body, COMPLETIONS)[1]["choices"][0]["text"]
    stop = plain.split(",")[1] if plain.count(",") >= 2 else plain[3:6]
    status, stopped = answer(server, path, {**body, "stop": [stop]}, COMPLETIONS)
    choice = stopped["choices"][0]
    assert status == 200 and choice["finish_reason"] == "stop" and choice["text"] == plain[: plain.index(stop)]


@pytest.mark.parametrize("path", PATHS)
def test_bad_input_gets_openai_errors_and_the_server_serves_on(server, path):
    status, body = answer(server, path, {"messages": QUESTION, "tools": []}, CHAT)
    assert status == 400 and body["error"]["param"] == "tools"
    status, body = answer(server, path, b"{broken", CHAT)
    assert status == 400 and body["error"]["param"] == "body"
    assert answer(server, path, {"messages": QUESTION, "max_tokens": 1}, CHAT)[0] == 200
