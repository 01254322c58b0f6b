"""The engine: load a causal LM and generate for a batch of prompts, each with its own parameters."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from handler.params import GenerationParams
from handler.prompts import Prompt, TokenLimits
from handler.quantization import quantize_for_cpu
from handler.sampling import PerRowSampler, RowSampling, request_generator, row_processors
from handler.settings import HandlerSettings, SettingsError
from handler.stopping import FinishReason, StopScan, find_stop, releasable_length

logger = logging.getLogger(__name__)

# (prompt index, sequence index, new text) for requests that stream.
StreamSink = Callable[[int, int, str], None]
MAX_ROWS_PER_GENERATE = 64


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    seconds: float = 0.0
    first_token_seconds: float | None = None


def pick_device(gpu_id: int | None) -> torch.device:
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{gpu_id}")
    return torch.device("cpu")


def cpu_budget() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 quota (`docker --cpus`,
    Kubernetes limits), which torch's own default ignores and so oversubscribes."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cpus


def pick_threads(settings: HandlerSettings) -> int:
    """torch's intra-op threads: as configured, or an even share of the CPU budget per worker."""
    if settings.torch_threads != "auto":
        return settings.torch_threads
    return max(1, cpu_budget() // settings.workers)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU, bf16 on GPUs that support it, else fp16, unless the app says otherwise."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def context_length(config, tokenizer) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    if 0 < tokenizer.model_max_length < 1_000_000:
        return tokenizer.model_max_length
    raise SettingsError("cannot tell the model's context length: set handler.max_total_tokens")


def check_weight_format(model_dir: Path, allow_pickle: bool) -> None:
    """Safetensors by default: pickle weights can run code when loaded."""
    if any(model_dir.glob("*.safetensors")) or allow_pickle:
        return
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise SettingsError(
            f"{model_dir} holds only pickle weights (.bin/.pt); convert them to safetensors "
            "or set handler.allow_pickle_weights: true if you trust them"
        )
    raise SettingsError(f"{model_dir} holds no model weights")


class Engine:
    def __init__(self, model, tokenizer, settings: HandlerSettings, device: torch.device):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.device = device
        context = context_length(model.config, tokenizer)
        max_total = min(settings.max_total_tokens or context, context)
        self.limits = TokenLimits(
            max_input_tokens=min(settings.max_input_tokens or max_total - 1, max_total - 1),
            max_total_tokens=max_total,
        )
        self.eos_token_ids = _eos_token_ids(model, tokenizer)

    @classmethod
    def load(cls, model_dir: Path, settings: HandlerSettings, device: torch.device) -> "Engine":
        check_weight_format(model_dir, settings.allow_pickle_weights)
        torch.set_num_threads(pick_threads(settings))
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=settings.trust_remote_code)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        dtype = pick_dtype(settings.dtype, device)
        load_args = {
            "dtype": dtype,
            "trust_remote_code": settings.trust_remote_code,
            "use_safetensors": None if settings.allow_pickle_weights else True,
        }
        if settings.device_map:
            load_args.update(device_map=settings.device_map, offload_folder=settings.offload_folder)
        model = AutoModelForCausalLM.from_pretrained(model_dir, **load_args)
        if not settings.device_map:
            model.to(device)
        model.eval()
        if settings.quantization != "none":
            model = quantize_for_cpu(model, settings.quantization)
        logger.info(
            "loaded %s on %s as %s, %d torch threads", model.config.model_type, device, dtype, torch.get_num_threads()
        )
        return cls(model, tokenizer, settings, model.device if settings.device_map else device)

    def warm_up(self) -> None:
        ids = tuple(self.tokenizer("Hello")["input_ids"])
        self.generate([Prompt("Hello", ids, GenerationParams(max_new_tokens=2, temperature=0))])

    def generate(self, prompts: list[Prompt], stream: StreamSink | None = None) -> list[list[Completion]]:
        """Completions for every prompt, `num_return_sequences` each, in prompt order."""
        results: list[list[Completion]] = [[] for _ in prompts]
        sampled = [i for i, p in enumerate(prompts) if not p.params.uses_beams]
        for chunk in _row_chunks(sampled, prompts):
            for index, completions in zip(chunk, self._generate_rows([prompts[i] for i in chunk], chunk, stream)):
                results[index] = completions
        for group in _beam_groups([i for i, p in enumerate(prompts) if p.params.uses_beams], prompts):
            for index, completions in zip(group, self._generate_beams([prompts[i] for i in group])):
                results[index] = completions
        return results

    def _generate_rows(self, prompts: list[Prompt], indices: list[int], stream: StreamSink | None):
        """All prompts in one `generate`, each row with its own processors, stops and length."""
        padded = self._pad([p.input_ids for p in prompts for _ in range(p.params.num_return_sequences)])
        prompt_length = padded["input_ids"].shape[1]
        rows: list[RowSampling] = []
        trackers: list[RowTracker] = []
        for prompt, index in zip(prompts, indices):
            generator = request_generator(prompt.params, self.device)
            bad_words = self._bad_words_ids(prompt.params.bad_words)
            for sequence in range(prompt.params.num_return_sequences):
                processors = row_processors(prompt.params, prompt_length, self.eos_token_ids, bad_words)
                rows.append(RowSampling(processors, generator))
                sink = _bind(stream, index, sequence) if stream and prompt.params.stream else None
                trackers.append(RowTracker(prompt, self.tokenizer, self.eos_token_ids, sink))
        criteria = BatchStopping(trackers, prompt_length, self.settings.deadline_seconds)
        config = self._config(max_new_tokens=max(p.params.max_new_tokens for p in prompts), do_sample=False)
        with torch.inference_mode():
            self.model.generate(
                **padded,
                generation_config=config,
                logits_processor=LogitsProcessorList([PerRowSampler(rows)]),
                stopping_criteria=StoppingCriteriaList([criteria]),
            )
        completions = [t.completion() for t in trackers]
        grouped, start = [], 0
        for prompt in prompts:
            grouped.append(completions[start : start + prompt.params.num_return_sequences])
            start += prompt.params.num_return_sequences
        return grouped

    def _generate_beams(self, prompts: list[Prompt]) -> list[list[Completion]]:
        """Beam search needs one parameter set per call; stops are trimmed after the fact."""
        params = prompts[0].params
        if params.seed is not None:
            torch.manual_seed(params.seed)
        padded = self._pad([p.input_ids for p in prompts])
        prompt_length = padded["input_ids"].shape[1]
        config = self._config(
            max_new_tokens=params.max_new_tokens,
            min_new_tokens=params.min_new_tokens or None,
            num_beams=params.num_beams,
            num_return_sequences=params.num_return_sequences,
            do_sample=params.sampling,
            temperature=params.temperature if params.sampling else None,
            top_k=params.top_k if params.sampling and params.top_k else None,
            top_p=params.top_p if params.sampling and params.top_p < 1 else None,
            typical_p=params.typical_p if params.sampling and params.typical_p < 1 else None,
            repetition_penalty=params.repetition_penalty if params.repetition_penalty != 1 else None,
            bad_words_ids=self._bad_words_ids(params.bad_words) or None,
            max_time=self.settings.deadline_seconds,
        )
        started = time.perf_counter()
        with torch.inference_mode():
            output = self.model.generate(**padded, generation_config=config)
        seconds = time.perf_counter() - started
        sequences = output[:, prompt_length:].tolist()
        n = params.num_return_sequences
        return [
            [self._finish_beam(prompt, sequences[i * n + j], seconds) for j in range(n)]
            for i, prompt in enumerate(prompts)
        ]

    def _finish_beam(self, prompt: Prompt, ids: list[int], seconds: float) -> Completion:
        pad = self.tokenizer.pad_token_id
        reason = FinishReason.LENGTH
        for position, token in enumerate(ids):
            if token in self.eos_token_ids:
                ids, reason = ids[:position], FinishReason.EOS
                break
        while ids and ids[-1] == pad and pad not in self.eos_token_ids:
            ids = ids[:-1]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = find_stop(text, prompt.params.stop)
        if cut is not None:
            text, reason = text[:cut], FinishReason.STOP
        return Completion(text, reason, len(prompt.input_ids), len(ids), seconds)

    def _pad(self, sequences: list[tuple[int, ...]]) -> dict[str, torch.Tensor]:
        padded = self.tokenizer.pad({"input_ids": [list(s) for s in sequences]}, padding=True, return_tensors="pt")
        return {name: tensor.to(self.device) for name, tensor in padded.items()}

    def _config(self, **values) -> GenerationConfig:
        """A fresh config each call, so the model's own generation_config.json never leaks into requests."""
        values = {k: v for k, v in values.items() if v is not None}
        return GenerationConfig(
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            bos_token_id=self.tokenizer.bos_token_id,
            **values,
        )

    def _bad_words_ids(self, words: tuple[str, ...]) -> list[list[int]]:
        """Each word as written and after a space, since most tokenizers encode the two differently."""
        ids = []
        for word in words:
            for variant in (word, " " + word):
                tokens = self.tokenizer(variant, add_special_tokens=False)["input_ids"]
                if tokens and tokens not in ids:
                    ids.append(tokens)
        return ids


class RowTracker:
    """One generated sequence: its decoded text, why it stopped, and what it has streamed."""

    def __init__(self, prompt: Prompt, tokenizer, eos_token_ids: list[int], sink: Callable[[str], None] | None):
        self.prompt = prompt
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.sink = sink
        self.scan = StopScan(prompt.params.stop)
        self.text = ""
        self.sent = 0
        self.generated = 0
        self.reason: FinishReason | None = None
        self.started = time.perf_counter()
        self.first_token_seconds: float | None = None
        self.seconds = 0.0

    def step(self, new_ids: list[int], out_of_time: bool) -> bool:
        """Take the row's generated ids so far; True once it is finished."""
        if self.reason is not None:
            return True
        self.seconds = time.perf_counter() - self.started
        if self.first_token_seconds is None:
            self.first_token_seconds = self.seconds
        self.generated = len(new_ids)
        if new_ids and new_ids[-1] in self.eos_token_ids:
            self.reason, new_ids = FinishReason.EOS, new_ids[:-1]
        self.text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        cut = self.scan.scan(self.text)
        if cut is not None:
            self.text, self.reason = self.text[:cut], FinishReason.STOP
        elif self.reason is None and (self.generated >= self.prompt.params.max_new_tokens or out_of_time):
            self.reason = FinishReason.LENGTH
        self._release(final=self.reason is not None)
        return self.reason is not None

    def _release(self, final: bool) -> None:
        if self.sink is None:
            return
        end = len(self.text) if final else releasable_length(self.text, self.prompt.params.stop)
        if end > self.sent:
            self.sink(self.text[self.sent : end])
            self.sent = end

    def completion(self) -> Completion:
        return Completion(
            self.text,
            self.reason or FinishReason.LENGTH,
            len(self.prompt.input_ids),
            self.generated,
            self.seconds,
            self.first_token_seconds,
        )


class BatchStopping(StoppingCriteria):
    """Per-row stopping for a batch: each row's own length, stop strings, EOS, and the deadline."""

    def __init__(self, trackers: list[RowTracker], prompt_length: int, deadline_seconds: float | None):
        self.trackers = trackers
        self.prompt_length = prompt_length
        self.deadline = time.monotonic() + deadline_seconds if deadline_seconds else None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        out_of_time = self.deadline is not None and time.monotonic() >= self.deadline
        generated = input_ids[:, self.prompt_length :].tolist()
        done = [tracker.step(ids, out_of_time) for tracker, ids in zip(self.trackers, generated)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _bind(stream: StreamSink, index: int, sequence: int) -> Callable[[str], None]:
    return lambda text: stream(index, sequence, text)


def _eos_token_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _row_chunks(indices: list[int], prompts: list[Prompt]) -> list[list[int]]:
    """Split prompts so no single `generate` holds more than MAX_ROWS_PER_GENERATE rows."""
    chunks: list[list[int]] = []
    rows = 0
    for index in indices:
        size = prompts[index].params.num_return_sequences
        if chunks and rows + size <= MAX_ROWS_PER_GENERATE:
            chunks[-1].append(index)
            rows += size
        else:
            chunks.append([index])
            rows = size
    return chunks


def _beam_groups(indices: list[int], prompts: list[Prompt]) -> list[list[int]]:
    """Beam prompts grouped by identical parameters, since beam search takes one set per call."""
    groups: dict[GenerationParams, list[int]] = {}
    for index in indices:
        groups.setdefault(prompts[index].params, []).append(index)
    return list(groups.values())
