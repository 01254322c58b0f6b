"""Our TorchServe server, over HTTP: `POST /predictions/<APP>` with the handler's request schema."""

from __future__ import annotations

import time
from typing import Any

from bench.driver import drive
from bench.http_stream import HttpStatusError, JsonStream, chunk_text, post_stream
from bench.stats import RequestResult
from bench.targets import TargetUnavailable
from bench.workloads import BenchRequest, Workload


class TorchServeTarget:
    """One server URL. Several can be benchmarked side by side (e.g. the dynamic and continuous paths).

    `extra_params` are merged into every request's `parameters` (the defaults pin greedy
    decoding with no repetition penalty, so every target does the same work).
    """

    kind = "torchserve"

    def __init__(
        self,
        label: str,
        url: str,
        stream: bool = True,
        timeout_s: float = 600.0,
        probe_timeout_s: float = 60.0,
        extra_params: dict[str, Any] | None = None,
    ):
        self.label = label
        self.url = url
        self.stream = stream
        self.timeout_s = timeout_s
        self.probe_timeout_s = probe_timeout_s
        self.extra_params = {"repetition_penalty": 1.0, **(extra_params or {})}

    def describe(self) -> dict:
        return {"kind": self.kind, "url": self.url, "stream": self.stream, "extra_params": self.extra_params}

    def payload(self, prompt: str, new_tokens: int) -> dict:
        parameters = {
            "max_new_tokens": new_tokens,
            "min_new_tokens": new_tokens,
            "temperature": 0,
            "details": True,
            **self.extra_params,
        }
        if self.stream:
            parameters["stream"] = True
        return {"instances": [{"prompt": prompt}], "parameters": parameters}

    def start(self) -> None:
        """A short warm-up request, which is also the reachability check."""
        probe = BenchRequest(index=-1, prompt="Hello", new_tokens=2, arrival_s=0.0)
        result = RequestResult(index=-1, new_tokens=2)
        try:
            self._send(probe, result, timeout_s=self.probe_timeout_s)
        except HttpStatusError as error:
            raise TargetUnavailable(f"{self.url} answered the warm-up request with {error}") from error
        except OSError as error:
            raise TargetUnavailable(
                f"{self.url} is not reachable ({type(error).__name__}: {error}); "
                "start it with `make serve APP=<app>` or pass --server-url"
            ) from error

    def run(self, workload: Workload, concurrency: int) -> list[RequestResult]:
        return drive(self.send, workload, concurrency)

    def stop(self) -> None:
        """The server is not ours to stop."""

    def send(self, request: BenchRequest, result: RequestResult) -> None:
        self._send(request, result, self.timeout_s)

    def _send(self, request: BenchRequest, result: RequestResult, timeout_s: float) -> None:
        sent = time.perf_counter()
        parser = JsonStream()
        pieces: list[str] = []
        final: dict = {}
        raw = bytearray()

        def on_data(now: float, data: bytes) -> None:
            raw.extend(data)
            for obj in parser.feed(data):
                if isinstance(obj, dict) and isinstance(obj.get("predictions"), list):
                    final.update(obj["predictions"][0] if obj["predictions"] else {})
                    text = chunk_text(obj)
                    if text and result.ttft_s is None:  # a server that does not stream
                        result.ttft_s = now - sent
                    continue
                text = chunk_text(obj)
                if text:
                    pieces.append(text)
                    if result.ttft_s is None:
                        result.ttft_s = now - sent

        post_stream(self.url, self.payload(request.prompt, request.new_tokens), timeout_s, on_data)
        if not final and not pieces:
            raise ValueError(f"no JSON in the response: {bytes(raw[:200])!r}")
        result.text = final.get("generated_text") if isinstance(final.get("generated_text"), str) else "".join(pieces)
        result.finish_reason = final.get("finish_reason")
        if isinstance(final.get("generated_tokens"), int):
            result.generated_tokens, result.tokens_source = final["generated_tokens"], "reported"
        elif pieces:
            result.generated_tokens, result.tokens_source = len(pieces), "counted"
        else:
            result.generated_tokens, result.tokens_source = request.new_tokens, "requested"
