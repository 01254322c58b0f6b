"""The GPU check: the CUDA path exercised end to end on one GPU, in minutes, with no Hub access.

A random Llama is built on the spot around SmolLM2's tokenizer (its files only, from
`GPU_CHECK_TOKENIZER`, default models/smollm2), and the handler is driven as TorchServe drives
it: `LLMHandler.initialize` with TorchServe's own `Context` and `gpu_id`, then `handle` on
batches (dynamic batching) and on the async worker's coroutine (continuous batching). Checks:

- load: the adapter serves on the GPU it was given, in the dtype `auto` picks for it;
- every generation parameter on the dynamic path, each in a request of its own in one batch;
- 16 concurrent requests of mixed lengths on the continuous path, a seeded and a logprobs
  request beside them (those go to the dynamic scheduler, taking turns with the manager);
- `response_format` (a regex and a JSON schema) on both paths;
- greedy decoding in fp32 on the GPU gives the CPU's tokens;
- peak memory and tokens/s at 1 and at 16 concurrent requests.

`GPU_CHECK_DEVICE=cpu` runs the same checks on the CPU with a smaller model (the dry mode
CI runs, so the script itself is tested); there the "GPU against CPU" check compares the
CPU with itself. The report (markdown and JSON) goes to `$OUT`, else bench/results/.

    python -m bench.gpu_check            (scripts/gpu_check.sh, make gpu-check)
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import re
import resource
import shutil
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
# The model's shape: on a GPU big enough that a step is GPU work rather than launch overhead,
# on the CPU (dry mode) small enough to run in seconds on a shared 2-core machine.
SHAPES = {
    "cuda": {
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
    },
    "cpu": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
}
# A wider initial spread than Llama's default makes the random model's logits peaked, so that
# greedy decoding has clear winners and the GPU-against-CPU comparison is not decided by ties.
INIT_RANGE = 0.2
MAX_POSITIONS = 2048
LOAD_TOKENS = {"cuda": 64, "cpu": 16}
BOUNDED_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}, "score": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["answer", "score"],
}
# One request per parameter, each on top of a greedy 8-token base, so each is seen to work alone.
PARAMETER_CASES: dict[str, dict[str, Any]] = {
    "max_new_tokens": {"max_new_tokens": 5},
    "min_new_tokens": {"min_new_tokens": 8},
    "temperature": {"temperature": 0.8},
    "top_k": {"temperature": 0.8, "top_k": 20},
    "top_p": {"temperature": 0.8, "top_p": 0.9},
    "min_p": {"temperature": 0.8, "min_p": 0.05},
    "typical_p": {"temperature": 0.8, "typical_p": 0.9},
    "do_sample": {"temperature": 0.8, "do_sample": False},
    "seed": {"temperature": 0.8, "seed": 7},
    "repetition_penalty": {"repetition_penalty": 1.3},
    "presence_penalty": {"presence_penalty": 0.5},
    "frequency_penalty": {"frequency_penalty": 0.5},
    "logit_bias": {"logit_bias": {"100": 5.0}},
    "num_beams": {"num_beams": 2},
    "penalty_alpha": {"penalty_alpha": 0.0},
    "num_return_sequences": {"temperature": 0.8, "num_return_sequences": 2},
    "stop": {"stop": ["\n"]},
    "bad_words": {"bad_words": ["the"]},
    "return_full_text": {"return_full_text": True},
    "details": {"details": True},
    "logprobs": {"logprobs": True, "top_logprobs": 2, "details": True},
    "top_logprobs": {"logprobs": True, "top_logprobs": 3, "details": True},
    "stream": {"stream": True},
    "response_format": {"response_format": {"type": "regex", "pattern": "(yes|no)"}},
}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    seconds: float
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    device: str
    started: str
    host: dict[str, Any]
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(check.ok for check in self.checks)

    def markdown(self) -> str:
        lines = [
            f"# GPU check on {self.device}: {'passed' if self.ok else 'FAILED'}",
            "",
            f"Started {self.started}. " + ", ".join(f"{k}: {v}" for k, v in self.host.items()),
            "",
            "| check | result | seconds | detail |",
            "| --- | --- | --- | --- |",
        ]
        for check in self.checks:
            detail = check.detail.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {check.name} | {'ok' if check.ok else 'FAILED'} | {check.seconds:.1f} | {detail} |")
        return "\n".join(lines) + "\n"


class CheckFailed(AssertionError):
    """A check's condition did not hold; its message is the report's detail."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def host_facts(device: torch.device) -> dict[str, Any]:
    facts: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
        facts["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        facts["memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
        facts["nvidia_smi"] = shutil.which("nvidia-smi") or "not on PATH"
    else:
        facts["cpu"] = platform.processor() or platform.machine()
        facts["threads"] = torch.get_num_threads()
    return facts


def build_model(tokenizer_dir: Path, out: Path, kind: str) -> Path:
    """A random Llama with SmolLM2's tokenizer and chat template, saved as safetensors in `out`."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        initializer_range=INIT_RANGE,
        **SHAPES[kind],
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for name in ("chat_template.jinja",):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


def make_context(model_dir: Path, config: dict, gpu_id: int | None, batch_size: int):
    """TorchServe's own Context, as its worker builds it (`gpu_id` is what TorchServe assigned)."""
    from ts.context import Context
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    metrics = MetricsCacheYamlImpl(str(ROOT / "metrics.yaml"))
    metrics.initialize_cache()
    context = Context("gpu-check", str(model_dir), {}, batch_size, gpu_id, "0.12.0", metrics=metrics, model_yaml_config=config)
    metrics.model_name = "gpu-check"
    return context


def start_batch(context, bodies: list) -> list[dict]:
    from ts.context import RequestProcessor

    context.request_ids = {i: f"request-{i}" for i in range(len(bodies))}
    context.request_processor = [RequestProcessor({}) for _ in bodies]
    context.metrics.request_ids = context.request_ids
    return [{"body": body} for body in bodies]


def answers(context, outputs: list[str]) -> list[tuple[int, Any]]:
    results = []
    for index, output in enumerate(outputs):
        status = context.get_response_status(index)[0]
        try:
            results.append((status, json.loads(output)))
        except (TypeError, ValueError):
            results.append((status, output))
    return results


def drained(context, run: Callable[[], list[str]]) -> list[str]:
    """`run()` with the context's socket read on the side, so stream chunks never fill it."""
    reader, writer = socket.socketpair()
    context.cl_socket = writer
    reader.setblocking(False)
    received = bytearray()
    stop = False

    def drain() -> None:
        while not stop:
            try:
                block = reader.recv(1 << 16)
                if block:
                    received.extend(block)
                    continue
            except BlockingIOError:
                pass
            time.sleep(0.005)

    import threading

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    try:
        return run()
    finally:
        stop = True
        thread.join()
        reader.close()
        writer.close()


def run_dynamic(handler, context, bodies: list) -> list[tuple[int, Any]]:
    return answers(context, drained(context, lambda: handler.handle(start_batch(context, bodies), context)))


def run_continuous(handler, context, bodies: list) -> list[tuple[int, Any]]:
    return answers(context, drained(context, lambda: asyncio.run(handler.handle(start_batch(context, bodies), context))))


def body(text: str, **parameters) -> dict:
    return {"instances": [text], "parameters": {"max_new_tokens": 8, "temperature": 0, **parameters}}


def texts(answer: Any) -> list[str]:
    predictions = answer["predictions"] if isinstance(answer, dict) else []
    return [p["generated_text"] if isinstance(p, dict) else p for p in predictions]


class GpuCheck:
    def __init__(self, kind: str, tokenizer_dir: Path, work: Path):
        from handler.torchserve_handler import LLMHandler

        self.kind = kind
        self.device = torch.device("cuda", 0) if kind == "cuda" else torch.device("cpu")
        self.gpu_id = 0 if kind == "cuda" else None
        self.tokens = LOAD_TOKENS[kind]
        self.model_dir = build_model(tokenizer_dir, work / "model", kind)
        self.handler_class = LLMHandler
        self.dynamic = self.continuous = None

    def adapter(self, batching: str):
        """An adapter initialised as TorchServe's worker does; dtype auto on a GPU, fp32 on the CPU
        (auto there would time dtypes, which the dry mode need not)."""
        handler_config = {"batching": batching, "max_total_tokens": 1024, "dtype": "auto" if self.kind == "cuda" else "float32"}
        config = {"batchSize": 1 if batching == "continuous" else 16, "handler": handler_config}
        if batching == "continuous":
            config["asyncCommunication"] = True
            if self.kind == "cpu":
                handler_config["continuous"] = {"num_blocks": 64, "page_size": 32, "max_batch_tokens": 512}
        context = make_context(self.model_dir, config, self.gpu_id, config["batchSize"])
        handler = self.handler_class()
        handler.initialize(context)
        return handler, context

    # --- the checks ------------------------------------------------------------------------

    def load(self) -> str:
        self.dynamic = self.adapter("dynamic")
        self.continuous = self.adapter("continuous")
        expected = torch.float32
        if self.kind == "cuda":
            major, _ = torch.cuda.get_device_capability(self.device)
            expected = torch.bfloat16 if major >= 8 else torch.float16
        found = []
        for handler, _ in (self.dynamic, self.continuous):
            loaded = handler.service.loaded
            parameter = next(loaded.model.parameters())
            expect(loaded.device == self.device, f"loaded.device is {loaded.device}, not {self.device}")
            expect(parameter.device == self.device, f"weights are on {parameter.device}, not {self.device}")
            expect(parameter.dtype == expected, f"weights are {parameter.dtype}, not {expected}")
            found.append(f"{parameter.device} {parameter.dtype}")
        cache = self.continuous[0].service.continuous.cache
        return f"both adapters on {found[0]}; continuous cache {cache}"

    def every_parameter(self) -> str:
        from handler.params import PARAMETER_NAMES

        missing = sorted(set(PARAMETER_NAMES) - set(PARAMETER_CASES))
        expect(not missing, f"no case for {missing}: add one to PARAMETER_CASES")
        handler, context = self.dynamic
        names = list(PARAMETER_CASES)
        results = run_dynamic(handler, context, [body("Tell me a story.", **PARAMETER_CASES[n]) for n in names])
        failed = [f"{name}: {status} {str(answer)[:120]}" for name, (status, answer) in zip(names, results) if status != 200]
        expect(not failed, "; ".join(failed))
        by_name = dict(zip(names, (answer for _, answer in results)))
        expect(len(texts(by_name["num_return_sequences"])) == 2, "num_return_sequences: 2 gave another count")
        expect(re.fullmatch("(yes|no)", texts(by_name["response_format"])[0]) is not None, "the regex format was not followed")
        expect(texts(by_name["return_full_text"])[0].startswith("Tell me a story."), "return_full_text lost the prompt")
        return f"{len(names)} parameters, each answered 200 in one batch of {len(names)}"

    def continuous_mixed(self) -> str:
        handler, context = self.continuous
        bodies = [
            body(
                f"Request {i}: write something.", max_new_tokens=4 + (i * 7) % (self.tokens - 3), temperature=0.7 if i % 2 else 0
            )
            for i in range(16)
        ]
        bodies.append(body("A seeded one.", temperature=0.8, seed=11, max_new_tokens=self.tokens // 2))
        bodies.append(body("One with logprobs.", logprobs=True, top_logprobs=2, details=True, max_new_tokens=self.tokens // 2))
        started = time.perf_counter()
        results = run_continuous(handler, context, bodies)
        seconds = time.perf_counter() - started
        failed = [f"request {i}: {status} {str(answer)[:120]}" for i, (status, answer) in enumerate(results) if status != 200]
        expect(not failed, "; ".join(failed))
        logprobs = results[-1][1]["predictions"][0].get("logprobs") or []
        expect(
            len(logprobs) == self.tokens // 2 and all(len(t["top_logprobs"]) == 2 for t in logprobs),
            "the logprobs request came back without a log-probability and 2 alternatives per token",
        )
        again = run_continuous(handler, context, [bodies[16]])
        expect(texts(again[0][1]) == texts(results[16][1]), "the seeded request gave other text alone than beside 16 others")
        return f"16 mixed + seeded + logprobs requests, all 200, in {seconds:.1f} s; the seeded text repeats alone"

    def response_formats(self) -> str:
        json_format = {"type": "json_schema", "json_schema": {"schema": BOUNDED_SCHEMA}}
        out = []
        for label, (handler, context), run in (
            ("dynamic", self.dynamic, run_dynamic),
            ("continuous", self.continuous, run_continuous),
        ):
            results = run(
                handler,
                context,
                [
                    body("Yes or no?", response_format={"type": "regex", "pattern": "(yes|no)"}),
                    body("Answer in JSON.", response_format=json_format, max_new_tokens=48),
                ],
            )
            for (status, answer), kind in zip(results, ("regex", "json_schema")):
                expect(status == 200, f"{label} {kind}: {status} {answer}")
            regex_text, json_text = texts(results[0][1])[0], texts(results[1][1])[0]
            expect(re.fullmatch("(yes|no)", regex_text) is not None, f"{label} regex gave {regex_text!r}")
            try:
                value = json.loads(json_text)
            except ValueError:
                raise CheckFailed(f"{label} json_schema gave text that is not JSON: {json_text!r}") from None
            expect(
                value.get("answer") in ("yes", "no") and isinstance(value.get("score"), int),
                f"{label} json_schema gave {value!r}",
            )
            out.append(f"{label}: {regex_text!r}, {json_text!r}")
        return "; ".join(out)

    def greedy_matches_cpu(self) -> str:
        from handler.model.loading import load_model
        from handler.params import GenerationParams
        from handler.pipeline.prompts import Prompt
        from handler.schedulers.dynamic import DynamicScheduler
        from handler.settings import HandlerSettings

        settings = HandlerSettings(dtype="float32", max_total_tokens=1024, warmup=False)
        params = GenerationParams(max_new_tokens=32, temperature=0)
        prompts_text = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]
        outputs = {}
        for device in (self.device, torch.device("cpu")):
            loaded = load_model(self.model_dir, settings, device)
            scheduler = DynamicScheduler(loaded)
            prompts = [Prompt(t, tuple(loaded.tokenizer(t)["input_ids"]), params) for t in prompts_text]
            outputs[str(device)] = [c[0].text for c in scheduler.generate(prompts)]
            del loaded, scheduler
        here, cpu = outputs[str(self.device)], outputs["cpu"]
        differ = [f"{t!r}: {a!r} vs {b!r}" for t, a, b in zip(prompts_text, here, cpu) if a != b]
        expect(not differ, "greedy fp32 differs from the CPU's: " + "; ".join(differ))
        return f"{len(prompts_text)} prompts x 32 tokens: {self.device} fp32 = cpu fp32"

    def throughput(self) -> tuple[str, dict[str, Any]]:
        handler, context = self.continuous
        data: dict[str, Any] = {}
        for concurrency in (1, 16):
            if self.kind == "cuda":
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            bodies = [
                body(f"Load {i}: go on.", max_new_tokens=self.tokens, min_new_tokens=self.tokens, details=True)
                for i in range(concurrency)
            ]
            started = time.perf_counter()
            results = run_continuous(handler, context, bodies)
            seconds = time.perf_counter() - started
            expect(all(status == 200 for status, _ in results), f"c={concurrency}: {[s for s, _ in results]}")
            tokens = sum(p["generated_tokens"] for _, answer in results for p in answer["predictions"])
            peak = (
                torch.cuda.max_memory_allocated(self.device)
                if self.kind == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            )
            data[f"c{concurrency}"] = {
                "tokens": tokens,
                "seconds": round(seconds, 3),
                "tokens_per_s": round(tokens / seconds, 1),
                "peak_memory_mib": round(peak / 2**20, 1),
            }
        summary = ", ".join(f"{k}: {v['tokens_per_s']} tok/s, peak {v['peak_memory_mib']} MiB" for k, v in data.items())
        memory = "GPU allocated" if self.kind == "cuda" else "process max RSS"
        return f"{summary} ({memory})", data

    def close(self) -> None:
        for pair in (self.dynamic, self.continuous):
            if pair is not None:
                pair[0].service.stop()


def timed(report: Report, name: str, step: Callable[[], Any]) -> bool:
    started = time.perf_counter()
    try:
        outcome = step()
        detail, data = outcome if isinstance(outcome, tuple) else (outcome, {})
        report.checks.append(Check(name, True, detail, time.perf_counter() - started, data))
        return True
    except CheckFailed as failure:
        report.checks.append(Check(name, False, str(failure), time.perf_counter() - started))
    except Exception as error:  # a crash in one check is that check's result; the others still run
        report.checks.append(
            Check(
                name,
                False,
                f"{type(error).__name__}: {error}",
                time.perf_counter() - started,
                {"traceback": traceback.format_exc()},
            )
        )
    return False


def tokenizer_dir() -> Path:
    named = os.environ.get("GPU_CHECK_TOKENIZER")
    for candidate in [Path(named)] if named else [ROOT / "models" / "smollm2-tokenizer", ROOT / "models" / "smollm2"]:
        if (candidate / "tokenizer.json").exists():
            return candidate
    raise SystemExit("no SmolLM2 tokenizer: set GPU_CHECK_TOKENIZER, or run `make gpu-check-tokenizer` (docs/gpu.md)")


def out_dir() -> Path:
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "results"


def run(kind: str) -> Report:
    if kind == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"GPU_CHECK_DEVICE=cuda but torch sees no CUDA device (torch {torch.__version__}, CUDA {torch.version.cuda})"
        )
    device = torch.device("cuda", 0) if kind == "cuda" else torch.device("cpu")
    report = Report(kind, datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), host_facts(device))
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        check = GpuCheck(kind, tokenizer_dir(), Path(work))
        try:
            if timed(report, "load through the adapter", check.load):
                timed(report, "every parameter, dynamic path", check.every_parameter)
                timed(report, "16 mixed + seeded + logprobs, continuous path", check.continuous_mixed)
                timed(report, "response_format on both paths", check.response_formats)
                timed(report, "tokens/s and peak memory at c=1 and c=16", check.throughput)
            timed(report, "greedy fp32 equals the CPU's", check.greedy_matches_cpu)
        finally:
            check.close()
    return report


def write(report: Report, folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"gpu-check-{report.device}"
    markdown, data = folder / f"{stem}.md", folder / f"{stem}.json"
    markdown.write_text(report.markdown())
    data.write_text(json.dumps({**asdict(report), "ok": report.ok}, indent=2) + "\n")
    return markdown, data


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    kind = os.environ.get("GPU_CHECK_DEVICE", "cuda")
    if kind not in SHAPES:
        raise SystemExit(f"GPU_CHECK_DEVICE must be cuda or cpu, got {kind!r}")
    report = run(kind)
    markdown, _ = write(report, out_dir())
    sys.stdout.write(markdown.read_text())
    sys.stdout.write(f"report: {markdown} (and .json)\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
