"""Every use of transformers' private continuous batching internals, behind one door.

transformers 5.23 gives no public way to drop a result handler, to read a re-queued
request's generated tokens, to add processors to a running manager, to swap one of its
warpers for another class, to sample some rows its own way, or for an attention function to
read a step's rows and write the paged cache. The functions below do it
with private attributes; nothing else in `handler/` touches them. `problems(manager)` lists what a transformers upgrade moved,
and `tests/unit/test_compat.py` fails with that list.
"""

from __future__ import annotations

import inspect
from dataclasses import fields
from typing import Any, Callable

import torch
from transformers.generation.continuous_batching.cache import PagedAttentionCache
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
    ContinuousBatchingTopKLogitsWarper,
    ContinuousBatchingTopPLogitsWarper,
)
from transformers.generation.continuous_batching.model_runner import ModelRunner
from transformers.generation.continuous_batching.requests import (
    FutureRequestState,
    GenerationOutput,
    RequestState,
    RequestStatus,
)

__all__ = [
    "ContinuousBatchingLogitsProcessor",
    "ContinuousBatchingTopKLogitsWarper",
    "ContinuousBatchingTopPLogitsWarper",
    "FutureRequestState",
    "GenerationOutput",
    "PagedAttentionCache",
    "RequestState",
    "RequestStatus",
    "add_processors",
    "bind_loop_device",
    "forget_result_handler",
    "generated_ids",
    "manager_rows",
    "paged_update",
    "paged_write",
    "pending_result_handlers",
    "problems",
    "retype",
    "sample_with",
    "step_row_ends",
]


def forget_result_handler(manager, request_id: str) -> None:
    """Drops a request's result handler; after `cancel_request` no final result comes to remove it."""
    router = manager.output_router
    with router._lock:
        router.result_handlers.pop(request_id, None)


def pending_result_handlers(manager) -> int:
    router = manager.output_router
    with router._lock:
        return len(router.result_handlers)


def manager_rows(manager) -> int:
    """The requests the manager's scheduler holds as active (decoding or prefilling, KV blocks
    allocated); 0 before its loop built its batch processor. Read from other threads: a dict's length."""
    processor = getattr(manager, "batch_processor", None)
    if processor is None:
        return 0
    return len(processor.scheduler.active_requests)


def generated_ids(state: RequestState) -> list[int]:
    """A request's generated tokens, also after the manager re-queued it with them folded into its prompt."""
    if state._true_initial_tokens:
        return state.initial_tokens[state._true_initial_tokens :] + state.generated_tokens
    return state.generated_tokens


def add_processors(manager, front: list, back: list) -> None:
    """Runs `front` before the manager's own processors and `back` after them, each with its own
    tensor argument, and makes the manager accept their per-request keyword arguments."""
    processors: ContinuousBatchingLogitsProcessorList = manager.logit_processor
    processors.logits_processor[0:0] = front
    processors.logits_processor.extend(back)
    processors.tensors_required += len(front) + len(back)
    processors._retrieve_processors_kwargs()
    processors.do_processing = True


def bind_loop_device(manager, bind: Callable[[], None]) -> None:
    """Runs `bind()` first on the manager's generation thread, which `start()` creates with the
    bound method `_run_generation_loop` as its target: the thread then uses the model's GPU
    as its current device from its first allocation on."""
    loop = manager._run_generation_loop

    def run_generation_loop() -> None:
        bind()
        loop()

    manager._run_generation_loop = run_generation_loop


def sample_with(manager, sampler: Callable[[torch.Tensor, torch.Tensor], bool]) -> None:
    """The manager's sampling step asks `sampler(scores, output_ids)` first, and samples as it
    does where that returns False (or where log probabilities are wanted).

    The manager builds its `ModelRunner` on its own thread when its loop starts, so the step is
    rerouted on the class, once, to whatever sampler the runner's processor list carries;
    a runner whose list carries none samples as before."""
    manager.logit_processor.sampler = sampler
    if getattr(ModelRunner._sample, "asks_sampler", False):
        return
    manager_sample = ModelRunner._sample

    def _sample(runner, scores: torch.Tensor, output_ids: torch.Tensor) -> None:
        sampler = getattr(runner.logit_processor, "sampler", None)
        if sampler is None or runner.return_logprobs or not sampler(scores, output_ids):
            manager_sample(runner, scores, output_ids)

    _sample.asks_sampler = True  # type: ignore[attr-defined]
    ModelRunner._sample = _sample


def step_row_ends(kwargs: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cumulative query and key lengths of a manager step's rows (0 first), from the keyword
    arguments its forward hands each attention call, when every layer attends over the full
    context; None otherwise."""
    query_ends, key_ends = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if query_ends is None or not isinstance(key_ends, dict) or list(key_ends) != ["full_attention"]:
        return None
    return query_ends, key_ends["full_attention"]


def paged_update(
    cache: PagedAttentionCache, key: torch.Tensor, value: torch.Tensor, layer_idx: int, kwargs: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """Writes a layer's new keys and values into the paged cache and returns every key and value
    of the step's rows, in the rows' order (what transformers' paged attention reads)."""
    return cache.update(key_states=key, value_states=value, layer_idx=layer_idx, kwargs=kwargs)


def paged_write(
    cache: PagedAttentionCache, key: torch.Tensor, value: torch.Tensor, layer_idx: int, kwargs: dict
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Writes a layer's new keys and values into the paged cache, as `paged_update` does, without
    reading every row's keys back: returns the layer's key and value slots (slots, kv heads, head
    dim) and the slot of each of the step's key positions, for the caller to gather only what it
    reads. None, with nothing written, when the step reads nothing from the cache or the cache is
    not the index-based kind (then `paged_update`)."""
    allocator = cache.layer_to_allocator[layer_idx]
    views = getattr(allocator, "_kv_token_views", None)
    if kwargs.get("block_table") is not None or not isinstance(views, dict) or layer_idx not in views:
        return None
    read_index = kwargs["read_index"][allocator.index]
    if read_index.numel() == 0:
        return None
    key_slots, value_slots = views[layer_idx]
    write_index = kwargs["write_index"][allocator.index]
    key_slots.index_copy_(0, write_index, key[0].transpose(0, 1))
    value_slots.index_copy_(0, write_index, value[0].transpose(0, 1))
    return key_slots, value_slots, read_index


def retype(processor: Any, kind: type) -> Any:
    """`processor`'s settings in an instance of `kind`, a subclass with another `__call__`; its
    constructor takes a regular warper, which the manager no longer holds."""
    replacement: Any = object.__new__(kind)
    replacement.__dict__.update(vars(processor))
    return replacement


def problems(manager) -> list[str]:
    """What moved in transformers, one line each; empty while every internal above is where we use it."""
    found = []
    router = getattr(manager, "output_router", None)
    if router is None:
        found.append("the manager has no output_router (forget_result_handler)")
    else:
        if not hasattr(getattr(router, "_lock", None), "__enter__"):
            found.append("manager.output_router._lock is gone or is no lock (forget_result_handler)")
        if not isinstance(getattr(router, "result_handlers", None), dict):
            found.append("manager.output_router.result_handlers is no longer a dict (forget_result_handler)")
    state_fields = {f.name for f in fields(RequestState)}
    for name in ("_true_initial_tokens", "request_id", "initial_tokens", "generated_tokens", "logit_processor_kwargs"):
        if name not in state_fields:
            found.append(f"RequestState has no field {name} (generated_ids, batch processors)")
    processors = getattr(manager, "logit_processor", None)
    if not isinstance(processors, ContinuousBatchingLogitsProcessorList):
        found.append("manager.logit_processor is no ContinuousBatchingLogitsProcessorList (add_processors)")
    else:
        for name in ("logits_processor", "tensors_required", "do_processing"):
            if not hasattr(processors, name):
                found.append(f"manager.logit_processor has no attribute {name} (add_processors)")
        if not callable(getattr(processors, "_retrieve_processors_kwargs", None)):
            found.append("ContinuousBatchingLogitsProcessorList._retrieve_processors_kwargs() is gone (add_processors)")
    if not {"state", "has_new_token"} <= set(getattr(FutureRequestState, "__slots__", ())):
        found.append("FutureRequestState lost its state or has_new_token slot (batch processors)")
    processor = getattr(manager, "batch_processor", None)
    if processor is not None and not isinstance(getattr(getattr(processor, "scheduler", None), "active_requests", None), dict):
        found.append("manager.batch_processor.scheduler.active_requests is gone or no dict (manager_rows)")
    if not callable(getattr(manager, "_run_generation_loop", None)):
        found.append("the manager has no _run_generation_loop (bind_loop_device)")
    if not callable(getattr(ModelRunner, "_sample", None)):
        found.append("ModelRunner._sample is gone (sample_with)")
    update = set(inspect.signature(PagedAttentionCache.update).parameters)
    if not {"key_states", "value_states", "layer_idx", "kwargs"} <= update:
        found.append(f"PagedAttentionCache.update takes {sorted(update)} now (paged_update)")
    for kind in (ContinuousBatchingTopKLogitsWarper, ContinuousBatchingTopPLogitsWarper):
        if kind.__dictoffset__ == 0:
            found.append(f"{kind.__name__} instances have no __dict__: retype's copy no longer works")
    return found
