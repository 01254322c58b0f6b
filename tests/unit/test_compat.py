"""The contract with transformers' private internals (handler.schedulers.compat), on a real manager.

When a transformers upgrade moves one of them, these fail with a message naming it.
"""

from pathlib import Path

import pytest
import torch
from transformers import ContinuousBatchingConfig, GenerationConfig, TopKLogitsWarper, TopPLogitsWarper

from handler.model.loading import load_model
from handler.schedulers import compat
from handler.schedulers.batch_processors import TopKWarper, TopPWarper
from handler.settings import HandlerSettings


@pytest.fixture(scope="module")
def manager(tiny_model_dir: Path):
    loaded = load_model(tiny_model_dir, HandlerSettings(warmup=False, max_total_tokens=64), torch.device("cpu"))
    config = GenerationConfig(do_sample=True, temperature=0.5, top_k=2, top_p=0.5, max_new_tokens=8)
    cb = ContinuousBatchingConfig(num_blocks=8, page_size=16, max_batch_tokens=64, per_request_processors=True)
    yield loaded.model.init_continuous_batching(generation_config=config, continuous_batching_config=cb)


def test_every_private_internal_we_use_is_where_we_use_it(manager):
    found = compat.problems(manager)
    assert not found, "transformers changed internals handler.schedulers.compat relies on:\n" + "\n".join(found)


def test_a_forgotten_result_handler_is_gone(manager):
    manager.output_router.result_handlers["ts-contract"] = (print, None)
    compat.forget_result_handler(manager, "ts-contract")
    assert "ts-contract" not in manager.output_router.result_handlers, "forget_result_handler no longer removes the handler"


def test_retype_keeps_the_settings_of_transformers_warpers():
    top_k = compat.ContinuousBatchingTopKLogitsWarper(TopKLogitsWarper(top_k=7, min_tokens_to_keep=2))
    top_p = compat.ContinuousBatchingTopPLogitsWarper(TopPLogitsWarper(top_p=0.3, min_tokens_to_keep=3))
    ours_k, ours_p = compat.retype(top_k, TopKWarper), compat.retype(top_p, TopPWarper)
    assert (ours_k.top_k, ours_k.min_tokens_to_keep, ours_k.filter_value) == (7, 2, top_k.filter_value), (
        "ContinuousBatchingTopKLogitsWarper keeps its settings elsewhere: retype's __dict__ copy lost them"
    )
    assert (ours_p.top_p, ours_p.min_tokens_to_keep) == (0.3, 3), (
        "ContinuousBatchingTopPLogitsWarper keeps its settings elsewhere: retype's __dict__ copy lost them"
    )


def test_added_processors_run_and_their_arguments_are_accepted(manager):
    processors = manager.logit_processor
    before = (len(processors.logits_processor), processors.tensors_required)
    compat.add_processors(manager, [], [])
    assert (len(processors.logits_processor), processors.tensors_required) == before
    assert {"temperature", "top_k", "top_p"} <= set(processors.supported_keys), (
        "_retrieve_processors_kwargs() no longer fills supported_keys"
    )


def test_generated_ids_include_tokens_folded_into_a_requeued_prompt():
    state = compat.RequestState(request_id="r", initial_tokens=[1, 2, 3, 4, 5], _true_initial_tokens=3)
    state.generated_tokens = [6]
    assert compat.generated_ids(state) == [4, 5, 6], "RequestState no longer folds generated tokens as compat expects"
