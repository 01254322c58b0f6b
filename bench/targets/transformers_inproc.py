"""Raw transformers `generate` in the benchmark's own process: no HTTP, no handler, no queue.

Requests are batched the way a simple static-batching server would: whenever the model is
free it takes up to `concurrency` requests that have already arrived and runs them as one
left-padded `generate`. For the uniform workload this is the ceiling the servers are
measured against. For the mixed one it is plain static batching without a server, not a
ceiling: a batch runs until its longest request is done.

Each row's times come from a stopping criterion that notes the clock after every step:
a row's first token is out after step 1, and the row is answered after its own
`new_tokens`-th step (as if streamed), even though the batch runs on for longer rows.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from bench.stats import RequestResult
from bench.targets import TargetUnavailable
from bench.workloads import BenchRequest, Workload


class _StepClock:
    """A `StoppingCriteria`: stamps each decoding step and stops each row at its own length."""

    def __init__(self, prompt_length: int, lengths: list[int]):
        self.prompt_length = prompt_length
        self.lengths = torch.tensor(lengths)
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        generated = input_ids.shape[1] - self.prompt_length
        return (generated >= self.lengths).to(input_ids.device)


class TransformersTarget:
    kind = "transformers"

    def __init__(self, label: str, model_dir: Path, dtype: str = "float32", quantization: str = "none"):
        self.label = label
        self.model_dir = model_dir
        self.dtype = dtype
        self.quantization = quantization
        self.model = None
        self.tokenizer = None

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "model_dir": str(self.model_dir),
            "dtype": self.dtype,
            "quantization": self.quantization,
            "threads": torch.get_num_threads(),
        }

    def start(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not (self.model_dir / "config.json").exists():
            raise TargetUnavailable(f"no checkpoint in {self.model_dir}; run `make model APP=<app>` or pass --model-dir")
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=getattr(torch, self.dtype)).eval()
        if self.quantization != "none":
            from handler.model.quantization import quantize_for_cpu

            model = quantize_for_cpu(model, self.quantization)
        self.model = model
        self._generate([BenchRequest(-1, "Hello", 2, 0.0)])  # warm-up

    def stop(self) -> None:
        self.model = None
        self.tokenizer = None

    def run(self, workload: Workload, concurrency: int) -> list[RequestResult]:
        pending = sorted(workload.requests, key=lambda r: r.arrival_s)
        results: list[RequestResult] = []
        start = time.perf_counter()
        while pending:
            now = time.perf_counter() - start
            arrived = [r for r in pending if r.arrival_s <= now]
            if not arrived:
                time.sleep(max(0.0, pending[0].arrival_s - now))
                continue
            batch = arrived[:concurrency]
            taken = {r.index for r in batch}
            pending = [r for r in pending if r.index not in taken]
            results.extend(self._run_batch(batch, start))
        return sorted(results, key=lambda r: r.index)

    def _run_batch(self, batch: list[BenchRequest], start: float) -> list[RequestResult]:
        sent = time.perf_counter()
        results = []
        try:
            rows, clock = self._generate(batch)
        except Exception as error:  # noqa: BLE001 - a failed batch is data for the report
            done = time.perf_counter()
            for request in batch:
                result = RequestResult(
                    index=request.index, new_tokens=request.new_tokens, error=f"{type(error).__name__}: {error}"
                )
                result.sent_s, result.done_s, result.latency_s = sent - start, done - start, done - sent
                results.append(result)
            return results
        for request, row in zip(batch, rows):
            result = RequestResult(index=request.index, new_tokens=request.new_tokens)
            result.sent_s = sent - start
            result.queued_s = max(0.0, result.sent_s - request.arrival_s)
            result.ttft_s = clock.stamps[0] - sent
            done = clock.stamps[min(request.new_tokens, len(clock.stamps)) - 1]
            result.done_s, result.latency_s = done - start, done - sent
            tokens = row[: request.new_tokens]
            result.generated_tokens, result.tokens_source = len(tokens), "counted"
            result.text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            result.finish_reason = "length"
            results.append(result)
        return results

    def _generate(self, batch: list[BenchRequest]) -> tuple[list[list[int]], _StepClock]:
        from transformers import StoppingCriteriaList

        encoded = self.tokenizer([r.prompt for r in batch], return_tensors="pt", padding=True)
        prompt_length = encoded["input_ids"].shape[1]
        lengths = [r.new_tokens for r in batch]
        clock = _StepClock(prompt_length, lengths)
        longest = max(lengths)
        with torch.inference_mode():
            output = self.model.generate(
                **encoded,
                max_new_tokens=longest,
                min_new_tokens=longest,  # EOS blocked: every row runs its full length
                do_sample=False,
                stopping_criteria=StoppingCriteriaList([clock]),
                pad_token_id=self.tokenizer.pad_token_id,
            )
        return output[:, prompt_length:].tolist(), clock
