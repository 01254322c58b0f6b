"""The CUDA path on a machine with no GPU: the device facts are stated, the decisions are real.

Each test fakes only what the hardware would say (`torch.cuda.is_available`, the capability,
free memory, `nvidia-smi` on PATH, `set_device`'s effect, a CUDA error's text) and runs our
code unchanged on them.
"""

import asyncio
import logging
import os
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import handler.torchserve_handler as adapter
from handler.model.device import (
    KV_MEMORY_MARGIN,
    cache_config,
    check_device_settings,
    is_sticky_device_error,
    pick_device,
    pick_dtype,
)
from handler.model.loading import load_model
from handler.schedulers.continuous import ContinuousScheduler
from handler.schedulers.threads import on_passing_thread, run_on_passing_thread
from handler.service import Service
from handler.settings import CPU_NUM_BLOCKS, ContinuousBatchingSettings, HandlerSettings, SettingsError
from tests.support.context import make_context, run_async, run_batch
from tests.support.prompts import make_prompt

GiB = 2**30
ILLEGAL_ADDRESS = "CUDA error: an illegal memory access was encountered"


def gpus(monkeypatch, count: int, nvidia_smi: bool = True) -> None:
    """A host with `count` CUDA devices, and `nvidia-smi` on PATH or not."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    which = shutil.which
    monkeypatch.setattr(
        shutil,
        "which",
        lambda name, *a, **k: (
            "/usr/local/nvidia/bin/nvidia-smi"
            if name == "nvidia-smi" and nvidia_smi
            else (None if name == "nvidia-smi" else which(name, *a, **k))
        ),
    )


def capabilities(monkeypatch, by_index: dict[int, tuple[int, int]]) -> list:
    asked = []

    def capability(device=None):
        index = torch.device(device).index if device is not None else 0
        asked.append(index)
        return by_index[index]

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    return asked


# --- which device -------------------------------------------------------------------------


@pytest.mark.parametrize("nvidia_smi", [True, False])
def test_the_gpu_torchserve_assigned_is_used(monkeypatch, nvidia_smi):
    gpus(monkeypatch, 2, nvidia_smi)
    assert pick_device(1) == torch.device("cuda", 1)


@pytest.mark.parametrize("nvidia_smi", [True, False])
def test_with_no_gpu_id_but_cuda_the_first_gpu_is_used_and_the_log_says_why(monkeypatch, caplog, nvidia_smi):
    gpus(monkeypatch, 1, nvidia_smi)
    with caplog.at_level(logging.WARNING, logger="handler.model.device"):
        assert pick_device(None) == torch.device("cuda", 0)
    assert "TorchServe assigned no GPU" in caplog.text
    assert ("not on PATH" in caplog.text) is (not nvidia_smi)


@pytest.mark.parametrize("nvidia_smi", [True, False])
def test_without_cuda_the_cpu_is_used_even_with_a_gpu_id(monkeypatch, caplog, nvidia_smi):
    gpus(monkeypatch, 0, nvidia_smi)
    with caplog.at_level(logging.WARNING, logger="handler.model.device"):
        assert pick_device(0) == torch.device("cpu")
    assert "torch sees no CUDA device" in caplog.text


def test_without_cuda_or_gpu_id_the_cpu_is_used_quietly(monkeypatch, caplog):
    gpus(monkeypatch, 0, False)
    with caplog.at_level(logging.WARNING, logger="handler.model.device"):
        assert pick_device(None) == torch.device("cpu")
    assert caplog.text == ""


def test_the_adapter_serves_on_the_gpu_when_torchserve_passed_none(monkeypatch):
    """TorchServe's context without `gpu_id` (no nvidia-smi), on a host where torch sees a GPU."""
    gpus(monkeypatch, 1, nvidia_smi=False)
    chosen = []

    def start(cls, settings, model_dir, device, name):
        """The device reaches the service here; nothing past it needs a real GPU to be asked."""
        chosen.append(device)
        raise StopIteration

    monkeypatch.setattr(Service, "start", classmethod(start))
    context = make_context("tiny", Path("/nonexistent"), {"handler": {"warmup": False}})
    with pytest.raises(StopIteration):
        adapter.LLMHandler().initialize(context)
    assert chosen == [torch.device("cuda", 0)]


# --- which dtype --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "capability, dtype",
    [
        ((6, 0), torch.float16),
        ((7, 0), torch.float16),
        ((7, 5), torch.float16),
        ((8, 0), torch.bfloat16),
        ((8, 9), torch.bfloat16),
        ((9, 0), torch.bfloat16),
    ],
)
def test_auto_is_bf16_only_from_compute_capability_8(monkeypatch, capability, dtype):
    capabilities(monkeypatch, {0: capability})
    assert pick_dtype("auto", torch.device("cuda", 0)) == dtype


def test_the_chosen_gpus_capability_decides_not_gpu_0s(monkeypatch):
    asked = capabilities(monkeypatch, {0: (9, 0), 1: (7, 5)})
    assert pick_dtype("auto", torch.device("cuda", 1)) == torch.float16
    assert asked == [1]


def test_auto_is_fp32_on_cpu_and_a_named_dtype_is_kept():
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("bfloat16", torch.device("cuda", 0)) == torch.bfloat16


def test_a_gpu_dtype_from_the_deploy_is_refused_on_cpu(monkeypatch):
    gpus(monkeypatch, 0, nvidia_smi=False)
    settings = HandlerSettings.from_config({"handler": {}}, {"LLM_DTYPE": "bfloat16"})
    assert settings.dtype_source == "LLM_DTYPE"
    with pytest.raises(SettingsError, match="LLM_DTYPE=bfloat16 is a GPU dtype.*no CUDA device.*nvidia-smi not on PATH"):
        check_device_settings(settings, torch.device("cpu"))


def test_a_half_dtype_the_app_chose_for_its_cpu_and_fp32_from_the_deploy_stay_allowed():
    check_device_settings(HandlerSettings.from_config({"handler": {"dtype": "bfloat16"}}, {}), torch.device("cpu"))
    check_device_settings(HandlerSettings.from_config({"handler": {}}, {"LLM_DTYPE": "float32"}), torch.device("cpu"))
    check_device_settings(HandlerSettings.from_config({"handler": {}}, {"LLM_DTYPE": "float16"}), torch.device("cuda", 0))


def test_compile_is_refused_on_cuda_and_kept_on_cpu():
    settings = HandlerSettings(compile=True)
    with pytest.raises(SettingsError, match="handler.compile"):
        check_device_settings(settings, torch.device("cuda", 0))
    check_device_settings(settings, torch.device("cpu"))


def test_cpu_quantization_is_refused_on_cuda():
    with pytest.raises(SettingsError, match="handler.quantization: int8-dynamic quantizes for CPU kernels"):
        check_device_settings(HandlerSettings(quantization="int8-dynamic"), torch.device("cuda", 0))
    check_device_settings(HandlerSettings(quantization="int8-dynamic"), torch.device("cpu"))


def test_load_refuses_a_gpu_dtype_on_cpu_before_reading_weights(tmp_path):
    settings = HandlerSettings.from_config({"handler": {}}, {"LLM_DTYPE": "float16"})
    with pytest.raises(SettingsError, match="LLM_DTYPE=float16"):
        load_model(tmp_path, settings, torch.device("cpu"))


# --- the current device of every thread that touches the model --------------------------------


def record_set_device(monkeypatch) -> list[tuple[str, torch.device]]:
    calls = []
    monkeypatch.setattr(
        torch.cuda, "set_device", lambda device: calls.append((threading.current_thread().name, torch.device(device)))
    )
    return calls


def test_passing_threads_bind_the_models_gpu_before_their_work(monkeypatch):
    calls = record_set_device(monkeypatch)
    gpu = torch.device("cuda", 1)
    seen = run_on_passing_thread(lambda: list(calls), name="model-start", device=gpu)
    assert seen == [("model-start", gpu)]
    seen = asyncio.run(on_passing_thread(lambda: list(calls), name="generate-beside", device=gpu))
    assert seen[-1] == ("generate-beside", gpu)


def test_a_cpu_model_binds_nothing(monkeypatch):
    calls = record_set_device(monkeypatch)
    run_on_passing_thread(lambda: None, device=torch.device("cpu"))
    assert calls == []


def test_the_continuous_managers_thread_binds_the_models_gpu(monkeypatch, tiny_model_dir):
    """The manager's generation thread binds the worker's GPU first thing; the model itself is on
    the CPU here, so the manager then generates as usual."""
    calls = record_set_device(monkeypatch)
    loaded = load_model(tiny_model_dir, HandlerSettings(dtype="float32", max_total_tokens=200), torch.device("cpu"))
    gpu = torch.device("cuda", 1)
    scheduler = ContinuousScheduler(
        replace(loaded, device=gpu), ContinuousBatchingSettings(num_blocks=48, page_size=16, max_batch_tokens=256)
    )
    try:
        [[completion]] = asyncio.run(scheduler.complete([make_prompt(loaded, "Hello", max_new_tokens=3, temperature=0)]))
        assert completion.generated_tokens == 3
        threads = [name for name, device in calls if device == gpu]
        assert threads and all(name != threading.current_thread().name for name in threads)
    finally:
        scheduler.stop()


# --- the continuous path's KV cache ------------------------------------------------------------


def test_auto_on_a_gpu_lets_transformers_fill_free_memory_less_the_margin():
    assert cache_config(ContinuousBatchingSettings(), torch.device("cuda", 1)) == {
        "num_blocks": None,
        "max_memory_percent": 1 - KV_MEMORY_MARGIN,
    }
    assert KV_MEMORY_MARGIN == 0.20


def test_auto_on_a_cpu_keeps_the_default_and_a_number_is_kept_on_either():
    assert (
        cache_config(ContinuousBatchingSettings(), torch.device("cpu")) == {"num_blocks": CPU_NUM_BLOCKS} == {"num_blocks": 128}
    )
    for device in (torch.device("cpu"), torch.device("cuda", 0)):
        assert cache_config(ContinuousBatchingSettings(num_blocks=7), device) == {"num_blocks": 7}


def test_transformers_sizes_the_cache_from_the_free_memory_of_the_device_it_is_shown(monkeypatch, tiny_model_dir):
    """transformers' own memory handler, given our config and a GPU's stated memory (4 of 16 GiB
    free), budgets at most the free memory less the margin for the cache and what grows with it."""
    from transformers import AutoConfig, ContinuousBatchingConfig
    from transformers.generation.continuous_batching.cache import PagedAttentionMemoryHandler

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * GiB, 16 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    cb_config = ContinuousBatchingConfig(
        page_size=64, max_batch_tokens=1024, **cache_config(ContinuousBatchingSettings(), torch.device("cuda", 0))
    )
    per_block = (
        2 * config.num_hidden_layers * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 64 * 2
    )
    handler = PagedAttentionMemoryHandler(config, cb_config, torch.bfloat16, per_block, 64, per_block, ["full_attention"])
    assert handler.available_memory == int(4 * GiB * (1 - KV_MEMORY_MARGIN))
    max_batch_tokens, sectors = handler.infer_max_batch_tokens_and_num_sectors()
    assert max_batch_tokens == 1024 and sectors > CPU_NUM_BLOCKS
    assert handler.compute_memory_footprint(max_batch_tokens, sectors) <= 4 * GiB * (1 - KV_MEMORY_MARGIN)


def test_num_blocks_auto_is_the_default_and_other_words_are_refused():
    assert HandlerSettings.from_config({"handler": {}}, {}).continuous.num_blocks == "auto"
    config = {"asyncCommunication": True, "handler": {"batching": "continuous", "continuous": {"num_blocks": "auto"}}}
    assert HandlerSettings.from_config(config, {}).continuous.num_blocks == "auto"
    with pytest.raises(SettingsError, match="num_blocks must be a positive integer or auto"):
        HandlerSettings.from_config({"handler": {"continuous": {"num_blocks": "lots"}}}, {})
    with pytest.raises(SettingsError, match="page_size must be a positive integer, got 'auto'"):
        HandlerSettings.from_config({"handler": {"continuous": {"page_size": "auto"}}}, {})


# --- a sticky CUDA error ends the worker ------------------------------------------------------


@pytest.mark.parametrize(
    "error, sticky",
    [
        (torch.AcceleratorError(ILLEGAL_ADDRESS), True),
        (RuntimeError("CUDA error: device-side assert triggered\nCompile with `TORCH_USE_CUDA_DSA`"), True),
        (RuntimeError("generation failed: CUDA error: unspecified launch failure"), True),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
        (RuntimeError("shape mismatch: an illegal memory access pattern in the docs"), False),
        (ValueError("bad input"), False),
    ],
)
def test_sticky_cuda_errors_are_told_from_the_others(error, sticky):
    assert is_sticky_device_error(error) is sticky


@pytest.fixture
def tiny_handler(tiny_model_dir):
    context = make_context(
        "tiny",
        tiny_model_dir,
        {"handler": {"warmup": False, "dtype": "float32", "defaults": {"max_new_tokens": 3, "temperature": 0}}},
    )
    llm = adapter.LLMHandler()
    llm.initialize(context)
    yield llm, context
    llm.service.stop()


def exits(monkeypatch) -> tuple[list[int], threading.Event]:
    """`os._exit` recorded instead of ending pytest, and the adapter's delay made short."""
    codes = []
    ended = threading.Event()
    monkeypatch.setattr(os, "_exit", lambda code: codes.append(code) or ended.set())
    monkeypatch.setattr(adapter, "BROKEN_EXIT_DELAY_S", 0.05)
    return codes, ended


def fail_forward(llm, error: BaseException):
    def raise_error(module, args):
        raise error

    return llm.service.loaded.model.register_forward_pre_hook(raise_error)


def test_a_sticky_cuda_error_answers_its_batch_then_ends_the_worker(monkeypatch, tiny_handler):
    llm, context = tiny_handler
    codes, ended = exits(monkeypatch)
    hook = fail_forward(llm, torch.AcceleratorError(ILLEGAL_ADDRESS))
    try:
        results = run_batch(llm, context, [{"instances": ["Hello"]}, {"instances": ["Hi"]}])
    finally:
        hook.remove()
    assert [status for status, _ in results] == [500, 500]
    assert ended.wait(5) and codes == [adapter.BROKEN_EXIT_CODE]


def test_an_ordinary_generation_error_keeps_the_worker(monkeypatch, tiny_handler):
    llm, context = tiny_handler
    codes, ended = exits(monkeypatch)
    hook = fail_forward(llm, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    try:
        results = run_batch(llm, context, [{"instances": ["Hello"]}])
    finally:
        hook.remove()
    assert [status for status, _ in results] == [500]
    assert not ended.wait(0.3) and llm.service.broken is None
    assert [status for status, _ in run_batch(llm, context, [{"instances": ["Hello"]}])] == [200]


# --- warm-up ---------------------------------------------------------------------------------


def test_the_warm_up_runs_one_constrained_request(tiny_model_dir, caplog):
    settings = HandlerSettings(dtype="float32", max_total_tokens=200)
    with caplog.at_level(logging.INFO):
        service = Service.start(settings, tiny_model_dir, torch.device("cpu"), "tiny")
    try:
        assert service.grammars.compiles == 1
        assert "the constrained warm-up failed" not in caplog.text
        assert "serving on cpu" in caplog.text
    finally:
        service.stop()


def test_a_sticky_cuda_error_on_the_continuous_path_ends_the_worker_too(monkeypatch, tiny_model_dir):
    """The manager's thread meets the error; its requests fail with its text, then the worker ends."""
    context = make_context(
        "tiny",
        tiny_model_dir,
        {
            "asyncCommunication": True,
            "handler": {
                "batching": "continuous",
                "warmup": False,
                "dtype": "float32",
                "max_total_tokens": 200,
                "continuous": {"num_blocks": 48, "page_size": 16, "max_batch_tokens": 256},
                "defaults": {"max_new_tokens": 3, "temperature": 0},
            },
        },
    )
    llm = adapter.LLMHandler()
    llm.initialize(context)
    codes, ended = exits(monkeypatch)
    hook = fail_forward(llm, torch.AcceleratorError(ILLEGAL_ADDRESS))
    try:
        results, _ = run_async(llm, context, [{"instances": ["Hello"]}])
    finally:
        hook.remove()
        llm.service.stop()
    assert [status for status, _ in results] == [500]
    assert ended.wait(5) and codes == [adapter.BROKEN_EXIT_CODE]
