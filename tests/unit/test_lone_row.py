"""handler.schedulers.lone_row on a tiny Llama whose weights sit on 4-bit grids, served with int4 weights
as SmolLM2's GGUF is: a lone row's decode steps go through the compiled layer, and keep the eager text."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import torch

from handler.model.loading import LoadedModel, load_model
from handler.schedulers import lone_row
from handler.schedulers.compat import pending_result_handlers
from handler.schedulers.continuous import ContinuousScheduler
from handler.schedulers.dynamic import DynamicScheduler
from handler.settings import ContinuousBatchingSettings, HandlerSettings, SettingsError
from tests.support.models import on_4bit_grids, tiny_llama
from tests.support.prompts import make_prompt

CACHE = ContinuousBatchingSettings(num_blocks=48, page_size=16, max_batch_tokens=256)
TEXTS = ("The capital of France is", "Once upon a time, in a land far away, a")


@pytest.fixture(scope="module")
def grid_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A tiny random Llama (hidden size 64: int4's groups of 32 fit) on 4-bit grids, with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-llama-grid")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id)
    on_4bit_grids(model).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def int4_model(path: Path) -> LoadedModel:
    return load_model(
        path, HandlerSettings(dtype="float32", quantization="int4-dynamic", max_total_tokens=200), torch.device("cpu")
    )


@pytest.fixture(scope="module")
def loaded(grid_model_dir: Path) -> LoadedModel:
    return int4_model(grid_model_dir)


@pytest.fixture(scope="module")
def continuous(loaded: LoadedModel):
    served = ContinuousScheduler(loaded, CACHE)
    yield served
    served.stop()


def wrappers(loaded: LoadedModel) -> list[lone_row._LoneRowForward]:
    return [
        layer.forward.func
        for layer in loaded.model.model.layers
        if isinstance(getattr(layer.forward, "func", None), lone_row._LoneRowForward)
    ]


@pytest.fixture
def compiled_calls(loaded: LoadedModel, continuous: ContinuousScheduler, monkeypatch) -> list[int]:
    """Counts the calls each layer makes to the compiled function (the scheduler installed it)."""
    calls: list[int] = []
    for wrapper in wrappers(loaded):
        compiled = wrapper.compiled
        monkeypatch.setattr(wrapper, "compiled", lambda *args, compiled=compiled: calls.append(1) or compiled(*args))
    return calls


def test_every_fused_int4_layer_is_routed_and_a_second_manager_keeps_them(loaded: LoadedModel, continuous: ContinuousScheduler):
    layers = loaded.model.config.num_hidden_layers
    assert len(wrappers(loaded)) == layers
    assert lone_row.install(loaded.model) == layers
    assert len(wrappers(loaded)) == layers, "installing again wrapped a wrapper"


def test_a_lone_row_decodes_through_the_compiled_layers_with_the_eager_text(loaded, continuous, compiled_calls):
    alone = make_prompt(loaded, TEXTS[0], max_new_tokens=8, temperature=0)
    (sequence,) = asyncio.run(continuous.complete([alone]))[0]
    assert sequence.generated_tokens == 8
    # The eager reference: `generate` passes no manager cache, so every layer runs eagerly.
    assert sequence.text == DynamicScheduler(loaded).generate([alone])[0][0].text
    assert len(compiled_calls) == 7 * loaded.model.config.num_hidden_layers, (
        "the prefill's token comes eagerly, the 7 others compiled"
    )


def test_a_row_past_the_first_bucket_crosses_into_the_next_with_the_eager_text(loaded, continuous, compiled_calls):
    long = make_prompt(loaded, TEXTS[1] * 5, max_new_tokens=12, min_new_tokens=12, temperature=0)
    assert len(long.input_ids) < lone_row.FIRST_BUCKET < len(long.input_ids) + 12
    (sequence,) = asyncio.run(continuous.complete([long]))[0]
    assert sequence.text == DynamicScheduler(loaded).generate([long])[0][0].text
    assert len(compiled_calls) == 11 * loaded.model.config.num_hidden_layers


def test_rows_decoded_together_keep_the_eager_layer_and_their_text(loaded, continuous, compiled_calls):
    prompts = [make_prompt(loaded, text, max_new_tokens=6, min_new_tokens=6, temperature=0) for text in TEXTS]
    results = asyncio.run(continuous.complete(prompts))
    reference = DynamicScheduler(loaded)
    for prompt, (sequence,) in zip(prompts, results):
        assert sequence.text == reference.generate([prompt])[0][0].text
    # Steps of two rows stay eager: fewer compiled calls than the two rows' decode steps alone would make.
    assert len(compiled_calls) < 2 * 5 * loaded.model.config.num_hidden_layers


@pytest.mark.parametrize("keys, width", [(1, 64), (64, 64), (65, 128), (200, 256), (256, 256)])
def test_keys_pad_to_a_power_of_two_from_the_first_bucket(keys, width):
    assert lone_row.bucket(keys) == width


def test_padding_repeats_the_rows_last_key_and_the_mask_reads_only_the_real_ones():
    padded_keys = lone_row._PaddedKeys()
    read_index = torch.tensor([5, 9, 12])
    padded, readable = padded_keys(read_index, layer_idx=0)
    assert padded.tolist() == [5, 9, 12] + [12] * 61
    assert readable.shape == (1, 1, 1, 64) and readable.sum() == 3 and readable[0, 0, 0, :3].all()
    assert padded_keys(read_index, layer_idx=1)[0] is padded, "later layers of the step reuse the first one's"
    assert padded_keys(torch.tensor([], dtype=torch.long), layer_idx=0) is None
    assert padded_keys(torch.arange(lone_row.LAST_BUCKET + 1), layer_idx=0) is None


def test_without_a_cpp_compiler_every_layer_stays_eager(grid_model_dir: Path, tmp_path: Path, caplog):
    import torch._inductor.config as inductor_config

    model = int4_model(grid_model_dir).model
    with inductor_config.patch({"cpp.cxx": (None, str(tmp_path / "no-compiler"))}):
        with caplog.at_level(logging.WARNING, logger="handler.schedulers.lone_row"):
            assert lone_row.install(model) == 0
    assert "no C++ compiler" in caplog.text
    assert not any(isinstance(getattr(layer.forward, "func", None), lone_row._LoneRowForward) for layer in model.model.layers)


def test_the_setting_turns_it_off(grid_model_dir: Path):
    fresh = int4_model(grid_model_dir)
    served = ContinuousScheduler(
        fresh, ContinuousBatchingSettings(num_blocks=48, page_size=16, max_batch_tokens=256, compile_lone_row=False)
    )
    try:
        assert wrappers(fresh) == []
    finally:
        served.stop()


def test_only_fused_layers_over_int4_weights_fit(tiny_model_dir: Path):
    fp32 = load_model(tiny_model_dir, HandlerSettings(dtype="float32", max_total_tokens=200), torch.device("cpu"))
    assert lone_row.install(fp32.model) == 0


def test_the_setting_takes_only_a_boolean():
    config = {"handler": {"continuous": {"compile_lone_row": "yes"}}}
    with pytest.raises(SettingsError, match="handler.continuous.compile_lone_row must be true or false, got 'yes'"):
        HandlerSettings.from_config(config, {})
    assert (
        HandlerSettings.from_config({"handler": {"continuous": {"compile_lone_row": False}}}, {}).continuous.compile_lone_row
        is False
    )


def test_warm_up_lengths_reach_the_first_buckets_within_the_token_limit():
    lengths = lone_row.warm_up_lengths(200)
    assert [lone_row.bucket(length + 1) for length in lengths] == [64, 128, 256][: lone_row.WARM_BUCKETS]
    assert lone_row.warm_up_lengths(100) == [1, 64]


def test_a_new_manager_compiles_the_first_buckets_and_leaves_nothing_behind(grid_model_dir: Path, caplog):
    fresh = int4_model(grid_model_dir)
    with caplog.at_level(logging.INFO, logger="handler.schedulers.continuous"):
        served = ContinuousScheduler(fresh, CACHE)
    try:
        assert "compiled a lone row's first key buckets" in caplog.text
        assert served.active_rows == 0 and pending_result_handlers(served.manager) == 0
        alone = make_prompt(fresh, TEXTS[0], max_new_tokens=4, temperature=0)
        (sequence,) = asyncio.run(served.complete([alone]))[0]
        assert sequence.text == DynamicScheduler(fresh).generate([alone])[0][0].text
    finally:
        served.stop()
