"""handler.schedulers.compiled_decode on a tiny Llama whose weights sit on 4-bit grids, served with int4 weights
as SmolLM2's GGUF is: decode steps, of one row or several, go through the compiled layer and keep the
eager text."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

from handler.model.loading import LoadedModel, load_model
from handler.schedulers import compiled_decode
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


def wrappers(loaded: LoadedModel) -> list[compiled_decode._DecodeStepForward]:
    return [
        layer.forward.func
        for layer in loaded.model.model.layers
        if isinstance(getattr(layer.forward, "func", None), compiled_decode._DecodeStepForward)
    ]


@pytest.fixture
def compiled_calls(loaded: LoadedModel, continuous: ContinuousScheduler, monkeypatch) -> list[int]:
    """Counts the calls each layer makes to the compiled function (the scheduler installed it; every
    layer shares it)."""
    calls: list[int] = []
    (shared,) = {id(wrapper.compiled): wrapper.compiled for wrapper in wrappers(loaded)}.values()
    compiled = shared.compiled
    monkeypatch.setattr(shared, "compiled", lambda *args: calls.append(1) or compiled(*args))
    return calls


def test_every_fused_int4_layer_is_routed_and_a_second_manager_keeps_them(loaded: LoadedModel, continuous: ContinuousScheduler):
    layers = loaded.model.config.num_hidden_layers
    assert len(wrappers(loaded)) == layers
    assert compiled_decode.install(loaded.model) == layers
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
    assert len(long.input_ids) < compiled_decode.FIRST_BUCKET < len(long.input_ids) + 12
    (sequence,) = asyncio.run(continuous.complete([long]))[0]
    assert sequence.text == DynamicScheduler(loaded).generate([long])[0][0].text
    assert len(compiled_calls) == 11 * loaded.model.config.num_hidden_layers


TEXTS_AT_ONCE = (*TEXTS, "A short list of fruit:")


@pytest.mark.parametrize("rows", [2, 3])
def test_rows_decoded_together_go_through_the_compiled_layers_with_their_eager_text(loaded, continuous, compiled_calls, rows):
    """Three rows pad to four, the last one repeated: the padding changes no row's text."""
    prompts = [make_prompt(loaded, text, max_new_tokens=6, min_new_tokens=6, temperature=0) for text in TEXTS_AT_ONCE[:rows]]
    results = asyncio.run(continuous.complete(prompts))
    reference = DynamicScheduler(loaded)
    for prompt, (sequence,) in zip(prompts, results):
        assert sequence.text == reference.generate([prompt])[0][0].text
    # One step prefills the prompts, the 5 after it decode every row together.
    assert len(compiled_calls) == 5 * loaded.model.config.num_hidden_layers


def test_a_step_that_prefills_beside_decoding_rows_stays_eager(loaded, continuous, compiled_calls):
    first = make_prompt(loaded, TEXTS[0], max_new_tokens=40, min_new_tokens=40, temperature=0)
    second = make_prompt(loaded, TEXTS[1], max_new_tokens=4, min_new_tokens=4, temperature=0)

    async def staggered():
        started = asyncio.ensure_future(continuous.complete([first]))
        while not compiled_calls:
            await asyncio.sleep(0.001)
        return await asyncio.gather(started, continuous.complete([second]))

    (first_result,), (second_result,) = [group[0] for group in asyncio.run(staggered())]
    reference = DynamicScheduler(loaded)
    assert first_result.text == reference.generate([first])[0][0].text
    assert second_result.text == reference.generate([second])[0][0].text
    layers = loaded.model.config.num_hidden_layers
    assert len(compiled_calls) < 39 * layers, "the step that prefilled the second prompt beside the first ran eagerly"


@pytest.mark.parametrize("keys, width", [(1, 64), (64, 64), (65, 128), (200, 256), (256, 256)])
def test_keys_pad_to_a_power_of_two_from_the_first_bucket(keys, width):
    assert compiled_decode.bucket(keys) == width


def step_kwargs(lengths: list[int]) -> tuple[dict, torch.Tensor]:
    """A decode step's attention arguments for rows with these key counts, their keys in slots 100 on."""
    key_ends = torch.tensor([0, *lengths]).cumsum(0)
    read_index = torch.arange(100, 100 + int(key_ends[-1]))
    write_index = read_index[key_ends[1:] - 1]
    kwargs = {
        "cu_seq_lens_q": torch.arange(len(lengths) + 1),
        "cu_seq_lens_k": {"full_attention": key_ends},
        "read_index": [read_index],
        "write_index": [write_index],
    }
    return kwargs, read_index


def test_rows_pad_to_a_power_of_two_and_keys_to_the_longest_rows_bucket():
    kwargs, read_index = step_kwargs([3, 70, 5])
    embeddings = tuple(torch.arange(3 * 8, dtype=torch.float).view(1, 3, 8) * sign for sign in (1, -1))
    padded_rows, cos, sin, write_index, positions, readable = compiled_decode._padded(
        kwargs, read_index, kwargs["write_index"][0], embeddings, 3
    )
    assert padded_rows == 4 and readable.shape == (4, 1, 1, 128)
    rows = positions.view(4, 128)
    assert rows[0].tolist() == [100, 101, 102] + [102] * 125, "a row's padding repeats its last key"
    assert rows[1, :70].tolist() == list(range(103, 173)) and rows[1, 70:].eq(172).all()
    assert rows[3].tolist() == rows[2].tolist() and write_index.tolist() == [102, 172, 177, 177], (
        "the padding row repeats the last"
    )
    assert readable.view(4, 128).sum(1).tolist() == [3, 70, 5, 5]
    assert cos[3].tolist() == cos[2].tolist() == embeddings[0][0, 2].tolist() and sin[3].tolist() == embeddings[1][0, 2].tolist()


def test_steps_that_are_not_every_rows_decode_or_exceed_the_buckets_stay_eager():
    embeddings = (torch.zeros(1, 2, 8), torch.zeros(1, 2, 8))
    kwargs, read_index = step_kwargs([3, compiled_decode.LAST_BUCKET + 1])
    assert compiled_decode._padded(kwargs, read_index, kwargs["write_index"][0], embeddings, 2) is None
    prefill, read_index = step_kwargs([3, 4])
    prefill["cu_seq_lens_q"] = torch.tensor([0, 1, 3])  # the second row brings two tokens
    assert compiled_decode._padded(prefill, read_index, read_index[[2, 5, 6]], embeddings, 2) is None
    many, read_index = step_kwargs([2] * (compiled_decode.LAST_ROWS + 1))
    assert compiled_decode._padded(many, read_index, many["write_index"][0], embeddings, compiled_decode.LAST_ROWS + 1) is None


def test_once_sealed_only_the_shapes_already_compiled_take_the_compiled_path():
    compiled = compiled_decode._Compiled(lambda *arguments: arguments[0])
    assert compiled.takes(2, 64) and compiled.takes(2, 64)
    compiled.sealed = True
    assert compiled.takes(2, 64) and not compiled.takes(4, 64)


def test_without_a_cpp_compiler_every_layer_stays_eager(grid_model_dir: Path, tmp_path: Path, caplog):
    import torch._inductor.config as inductor_config

    model = int4_model(grid_model_dir).model
    with inductor_config.patch({"cpp.cxx": (None, str(tmp_path / "no-compiler"))}):
        with caplog.at_level(logging.WARNING, logger="handler.schedulers.compiled_decode"):
            assert compiled_decode.install(model) == 0
    assert "no C++ compiler" in caplog.text
    assert not any(
        isinstance(getattr(layer.forward, "func", None), compiled_decode._DecodeStepForward) for layer in model.model.layers
    )


def test_the_setting_turns_it_off(grid_model_dir: Path):
    fresh = int4_model(grid_model_dir)
    served = ContinuousScheduler(
        fresh, ContinuousBatchingSettings(num_blocks=48, page_size=16, max_batch_tokens=256, compile_decode_steps=False)
    )
    try:
        assert wrappers(fresh) == []
    finally:
        served.stop()


def test_only_fused_layers_over_int4_weights_fit(tiny_model_dir: Path):
    fp32 = load_model(tiny_model_dir, HandlerSettings(dtype="float32", max_total_tokens=200), torch.device("cpu"))
    assert compiled_decode.install(fp32.model) == 0


def test_the_setting_takes_only_a_boolean():
    config = {"handler": {"continuous": {"compile_decode_steps": "yes"}}}
    with pytest.raises(SettingsError, match="handler.continuous.compile_decode_steps must be true or false, got 'yes'"):
        HandlerSettings.from_config(config, {})
    assert (
        HandlerSettings.from_config(
            {"handler": {"continuous": {"compile_decode_steps": False}}}, {}
        ).continuous.compile_decode_steps
        is False
    )


def test_the_warm_up_groups_reach_every_row_and_key_bucket_within_the_limits():
    groups = compiled_decode.warm_up_steps(max_total_tokens=200, max_batch_tokens=256, pages=128, page_size=64)
    shapes = {(rows, compiled_decode.bucket(length + 1)) for rows, length, _ in groups}
    assert shapes == {(rows, keys) for rows in (1, 2, 4, 8, 16) for keys in (64, 128, 256)}
    # Sixteen prompts of 128 tokens take 8 steps of 256 to prefill: the first ones decode meanwhile.
    assert (16, 128, 9) in groups
    assert {length for _, length, _ in compiled_decode.warm_up_steps(100, 256, pages=128, page_size=64)} == {1, 64}
    # 48 pages of 16 tokens hold 8 rows of 67 tokens or 4 of 131 at once, not 16 of 69 nor 8 of 133.
    small = {(rows, length) for rows, length, _ in compiled_decode.warm_up_steps(200, 256, pages=48, page_size=16)}
    assert {(4, 128), (8, 64), (16, 1)} <= small and not {(8, 128), (16, 64)} & small


def test_a_new_manager_compiles_every_bucket_and_leaves_nothing_behind(grid_model_dir: Path, caplog):
    fresh = int4_model(grid_model_dir)
    with caplog.at_level(logging.INFO, logger="handler.schedulers.continuous"):
        served = ContinuousScheduler(fresh, CACHE)
    try:
        sealed = compiled_decode.seal(fresh.model)
        promised = compiled_decode.warm_up_steps(200, CACHE.max_batch_tokens, CACHE.num_blocks, CACHE.page_size)
        assert sealed == sorted({(rows, compiled_decode.bucket(length + 1)) for rows, length, _ in promised})
        assert f"compiled decode steps of {sealed}" in caplog.text
        # A graph for each, none past dynamo's limit (where a shape would silently run eagerly).
        assert len(_debug_get_cache_entry_list(compiled_decode.layer_step.__code__)) >= len(sealed)
        assert served.active_rows == 0 and pending_result_handlers(served.manager) == 0
        alone = make_prompt(fresh, TEXTS[0], max_new_tokens=4, temperature=0)
        (sequence,) = asyncio.run(served.complete([alone]))[0]
        assert sequence.text == DynamicScheduler(fresh).generate([alone])[0][0].text
    finally:
        served.stop()
