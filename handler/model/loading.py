"""Loading: host resources (threads, dtype), the weight-format policy, the model and tokenizer.

The device's own facts (which one, its dtype rule, its memory) are `handler.model.device`'s.

Nothing here generates; the schedulers share the `LoadedModel` this returns.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from handler.model.device import bind_device, check_device_settings, describe_device, pick_dtype
from handler.model.dtype_cache import DecisionCache, host_fingerprint
from handler.model.dtype_probe import DtypeChoice, candidate_names, decided_cpu_dtype
from handler.model.fusion import fuse_llama_layers
from handler.model.quantization import quantize_for_cpu
from handler.pipeline.prompts import TokenLimits
from handler.settings import HandlerSettings, SettingsError

logger = logging.getLogger(__name__)

# transformers imports torchao whenever it is installed (the dev and bench extras install it
# for `quantization: int8-weight-only`), and torchao then warns about CUDA kernels and Triton
# that a CPU build never has. Those warnings say nothing about the model being loaded.
QUIET_LOGGERS = ("torchao", "torchao.kernel.intmm", "torch.utils._pytree")


def quiet_optional_backends() -> None:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


@dataclass
class LoadedModel:
    """The model, its tokenizer and what both schedulers need to know about them."""

    model: torch.nn.Module
    tokenizer: Any  # a transformers tokenizer: slow, fast or a tokenizers-backed one
    device: torch.device
    limits: TokenLimits
    eos_token_ids: list[int]
    dtype_choice: DtypeChoice | None = None  # `dtype: auto` on CPU: what was chosen, from which timings


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
    if isinstance(settings.torch_threads, int):
        return settings.torch_threads
    return max(1, cpu_budget() // settings.workers)


def measures_dtype(settings: HandlerSettings, device: torch.device) -> bool:
    """`dtype: auto` on a CPU with a candidate besides fp32 is decided by timing them (handler.model.dtype_probe);
    a quantized or device-mapped model keeps fp32, as the quantizers and offloading expect."""
    return (
        settings.dtype == "auto"
        and device.type == "cpu"
        and settings.quantization == "none"
        and not settings.device_map
        and len(candidate_names()) > 1
    )


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


def token_limits(model, tokenizer, settings: HandlerSettings) -> TokenLimits:
    context = context_length(model.config, tokenizer)
    max_total = min(settings.max_total_tokens or context, context)
    return TokenLimits(
        max_input_tokens=min(settings.max_input_tokens or max_total - 1, max_total - 1),
        max_total_tokens=max_total,
    )


def compile_forward(model: torch.nn.Module) -> None:
    """`handler.compile`: the model's forward through `torch.compile`, for one stream on CPU.

    Shapes are dynamic and the cache is transformers' dynamic one: a static cache made every
    step attend over its whole length, which cost more than compiling saved (SmolLM2 on 2 cores,
    docs/bench.md). Inductor's freezing folds the weights in as constants, which inference allows.
    The graphs compile on the first calls of each kind (prefill and decode, one row and several),
    which the warm-up makes (`DynamicScheduler.warm_up`); that takes minutes, not seconds.
    """
    model.forward = torch.compile(model.forward, dynamic=True, options={"freezing": True})


def eos_token_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def load_model(model_dir: Path, settings: HandlerSettings, device: torch.device, first_start: bool = True) -> LoadedModel:
    check_device_settings(settings, device)
    check_weight_format(model_dir, settings.allow_pickle_weights)
    bind_device(device)
    logger.info("serving on %s", describe_device(device))
    quiet_optional_backends()
    torch.set_num_threads(pick_threads(settings))
    started = time.monotonic()
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
    if device.type == "cpu" and not settings.device_map:
        fuse_llama_layers(model)
    loaded = time.monotonic()
    choice = None
    if measures_dtype(settings, device):
        rows = settings.dtype_probe_rows or 1
        cache = DecisionCache(Path(settings.dtype_cache_file)) if settings.dtype_cache_file else None
        names = candidate_names(model)
        fingerprint = host_fingerprint(model_dir, rows, names)
        model, choice = decided_cpu_dtype(model, rows, cache, fingerprint, names, retime_provisional=first_start)
        dtype = choice.dtype
        logger.info(
            "dtype auto on this CPU: %s at %d rows; decision kept in %s",
            choice.describe(),
            rows,
            settings.dtype_cache_file or "no file (handler.dtype_cache_file unset)",
        )
    if settings.quantization != "none":
        model = quantize_for_cpu(model, settings.quantization, compiled=settings.compile)
    if settings.compile:
        compile_forward(model)
    logger.info(
        "loaded %s on %s as %s, %d torch threads: tokenizer and weights %.1f s, dtype and quantization %.1f s",
        model.config.model_type,
        device,
        dtype,
        torch.get_num_threads(),
        loaded - started,
        time.monotonic() - loaded,
    )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=model.device if settings.device_map else device,
        limits=token_limits(model, tokenizer, settings),
        eos_token_ids=eos_token_ids(model, tokenizer),
        dtype_choice=choice,
    )
