"""The device facts: which device a worker serves on, the dtype it serves best, its cache, its faults.

Everything here reads the device through `torch.cuda` (and `nvidia-smi` on PATH), so that a
test on a machine with no GPU can state the facts of one and check the decisions made from them.
"""

from __future__ import annotations

import logging
import shutil

import torch

from handler.settings import CPU_NUM_BLOCKS, ContinuousBatchingSettings, HandlerSettings, SettingsError

logger = logging.getLogger(__name__)

HALF_DTYPES = ("float16", "bfloat16")
# Ampere (8.0) is the first architecture with bfloat16 units; torch's `is_bf16_supported()` also
# counts the emulation older GPUs (T4 7.5, V100 7.0) do in float32, slower than their float16.
BF16_CAPABILITY = (8, 0)
# `num_blocks: auto` on a GPU leaves this share of the free memory (after the weights) to what
# transformers' cache sizing does not count: the per-request logits processors' temporary
# tensors (transformers keeps the same 20% when processors run), the dynamic scheduler's
# `generate` beside the manager, and the allocator's fragmentation.
KV_MEMORY_MARGIN = 0.20
# Phrases of CUDA errors after which the context is unusable: every later kernel launch fails
# the same way, and only a new process gets a new context.
STICKY_CUDA_ERRORS = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "uncorrectable ecc error",
    "cudaerrorlaunchfailure",
)


def pick_device(gpu_id: int | None) -> torch.device:
    """The GPU TorchServe assigned (`gpu_id`), else the first GPU torch sees, else the CPU.

    TorchServe passes a `gpu_id` only when it counted GPUs, which it does by running
    `nvidia-smi`; where that is not on PATH (a driver mounted at `/usr/local/nvidia`, a PATH
    the image reset) it passes none although torch can use the GPU, and serving on the CPU
    would then be slow while every health check says 200. So CUDA is used whenever torch sees it.
    """
    if torch.cuda.is_available():
        if gpu_id is None:
            nvidia_smi = shutil.which("nvidia-smi")
            logger.warning(
                "TorchServe assigned no GPU (nvidia-smi %s), but torch sees %d: serving on cuda:0",
                f"at {nvidia_smi}" if nvidia_smi else "not on PATH",
                torch.cuda.device_count(),
            )
            return torch.device("cuda", 0)
        return torch.device("cuda", int(gpu_id))
    if gpu_id is not None:
        logger.warning(
            "TorchServe assigned GPU %s, but torch sees no CUDA device (a CPU build of torch, or no driver): serving on CPU",
            gpu_id,
        )
    return torch.device("cpu")


def supports_bf16(device: torch.device) -> bool:
    """bfloat16 in hardware on the chosen GPU (compute capability 8.0 or higher)."""
    return device.type == "cuda" and tuple(torch.cuda.get_device_capability(device)) >= BF16_CAPABILITY


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype to load in: fp32 on CPU (where `measures_dtype` may then pick bf16 or fp16 weights), bf16 on GPUs
    with bfloat16 units, else fp16, unless the app says otherwise."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if supports_bf16(device) else torch.float16
    return torch.float32


def check_device_settings(settings: HandlerSettings, device: torch.device) -> None:
    """Settings that cannot work on `device`, refused before the weights are read.

    `LLM_DTYPE` float16 or bfloat16 is what a deploy sets for a GPU machine (`vertex.machines`);
    on a CPU it means the GPU was not found, and serving there would be many times slower
    behind a healthy health check. A half dtype in the app's own config is a CPU choice
    that app made (it pairs with CPU quantization), and stays allowed. `handler.compile` on
    CUDA needs inductor's Triton kernels, which compile with a C compiler the image lacks.
    `handler.quantization` is post-load quantization for CPU kernels (`handler.model.quantization`).
    """
    if device.type == "cpu" and settings.dtype in HALF_DTYPES and settings.dtype_source == "LLM_DTYPE":
        raise SettingsError(
            f"LLM_DTYPE={settings.dtype} is a GPU dtype, but this worker has no CUDA device "
            f"(torch.cuda.is_available() is False; nvidia-smi "
            f"{'found' if shutil.which('nvidia-smi') else 'not on PATH'}): check the machine's GPUs and driver, "
            "or set LLM_DTYPE=float32 to serve on CPU"
        )
    if device.type == "cuda" and settings.compile:
        raise SettingsError(
            "handler.compile is for CPUs: on CUDA, inductor's kernels need a C compiler the image does not have; "
            "set handler.compile: false"
        )
    if device.type == "cuda" and settings.quantization != "none":
        raise SettingsError(
            f"handler.quantization: {settings.quantization} quantizes for CPU kernels; on CUDA serve "
            "bfloat16 or float16 weights (handler.quantization: none)"
        )


def bind_device(device: torch.device) -> None:
    """Makes `device` the current CUDA device of the calling thread.

    The current device is per thread and starts at 0: a thread that touches the model
    without this opens a context on GPU 0, allocates there and launches kernels there.
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)


def describe_device(device: torch.device) -> str:
    """One line for the start log: the device, and for a GPU its name, capability, CUDA and memory."""
    if device.type != "cuda":
        return f"{device} (torch {torch.__version__}, CUDA available: {torch.cuda.is_available()})"
    major, minor = torch.cuda.get_device_capability(device)
    free, total = torch.cuda.mem_get_info(device)
    return (
        f"{device} {torch.cuda.get_device_name(device)}, compute capability {major}.{minor}, "
        f"CUDA {torch.version.cuda}, torch {torch.__version__}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free"
    )


def cache_config(settings: ContinuousBatchingSettings, device: torch.device) -> dict:
    """The continuous manager's cache size, as `ContinuousBatchingConfig` arguments: a configured
    `num_blocks` as it is; `auto` on a CPU, CPU_NUM_BLOCKS; `auto` on a GPU, no block count and
    the share of the device's free memory transformers may fill (1 - KV_MEMORY_MARGIN).

    transformers sizes the cache from that share by its own account of everything that grows
    with it (the cache, the attention masks, each step's activations and indices) and checks
    the total against it, so its sizing is used rather than a count of ours, which it would
    refuse whenever the extras did not fit. It reads the current device's memory on the
    manager's thread, which `bind_device` has pointed at the worker's GPU."""
    if settings.num_blocks != "auto":
        return {"num_blocks": settings.num_blocks}
    if device.type != "cuda":
        return {"num_blocks": CPU_NUM_BLOCKS}
    return {"num_blocks": None, "max_memory_percent": 1 - KV_MEMORY_MARGIN}


def is_sticky_device_error(error: BaseException) -> bool:
    """A CUDA error that leaves the process's context broken for good (see STICKY_CUDA_ERRORS).

    Out-of-memory is not one: the next, smaller batch can succeed."""
    if isinstance(error, torch.OutOfMemoryError):
        return False
    text = str(error).lower()
    seen_cuda = isinstance(error, torch.AcceleratorError) or "cuda" in text
    return seen_cuda and any(phrase in text for phrase in STICKY_CUDA_ERRORS)
