"""The dynamic scheduler on a tiny random Llama: batching, per-request parameters, stops, seeds, streaming."""

from pathlib import Path

import pytest
import torch

from handler.decoding.sampling import row_processors
from handler.decoding.stopping import FinishReason
from handler.errors import RequestError
from handler.model.loading import check_weight_format, load_model
from handler.params import GenerationParams
from handler.pipeline.prompts import Prompt, TokenLimits, encode
from handler.pipeline.shapes import Fields, Instance
from handler.schedulers.dynamic import DynamicScheduler
from handler.settings import HandlerSettings, SettingsError
from tests.support.prompts import make_prompt


class Engine(DynamicScheduler):
    """The scheduler with its model's tokenizer, limits and model at hand, as these tests use them."""

    @classmethod
    def load(cls, model_dir: Path, settings: HandlerSettings) -> "Engine":
        return cls(load_model(model_dir, settings, torch.device("cpu")), settings.deadline_seconds)

    tokenizer = property(lambda self: self.loaded.tokenizer)
    limits = property(lambda self: self.loaded.limits)
    model = property(lambda self: self.loaded.model)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    return Engine.load(tiny_model_dir, HandlerSettings(dtype="float32", max_total_tokens=128))


def prompt(engine: Engine, text: str, **params) -> Prompt:
    return make_prompt(engine.loaded, text, **params)


def texts(completions) -> list[str]:
    return [c.text for c in completions]


def test_greedy_is_the_same_alone_and_beside_other_prompts(engine):
    alone = engine.generate([prompt(engine, "Hello there", max_new_tokens=8, temperature=0)])
    batched = engine.generate(
        [
            prompt(engine, "A much longer prompt that forces left padding of the other", max_new_tokens=5, temperature=0.9),
            prompt(engine, "Hello there", max_new_tokens=8, temperature=0),
        ]
    )
    assert texts(alone[0]) == texts(batched[1])


@pytest.mark.honours("dynamic", "seed")
def test_a_seeded_request_gives_the_same_text_alone_and_in_a_batch(engine):
    seeded = dict(max_new_tokens=12, temperature=1.0, top_k=50, seed=1234)
    alone = engine.generate([prompt(engine, "Tell me a story", **seeded)])
    batched = engine.generate(
        [
            prompt(engine, "Another prompt, unseeded and longer than the first one", max_new_tokens=12, temperature=1.3),
            prompt(engine, "Tell me a story", **seeded),
            prompt(engine, "Third", max_new_tokens=3, temperature=0),
        ]
    )
    assert texts(alone[0]) == texts(batched[1])
    assert alone[0][0].generated_tokens == 12


@pytest.mark.honours("dynamic", "seed")
def test_different_seeds_give_different_text(engine):
    first = engine.generate([prompt(engine, "Tell me a story", max_new_tokens=12, temperature=1.0, seed=1)])
    second = engine.generate([prompt(engine, "Tell me a story", max_new_tokens=12, temperature=1.0, seed=2)])
    assert texts(first[0]) != texts(second[0])


@pytest.mark.honours("dynamic", "max_new_tokens")
def test_heterogeneous_parameters_in_one_batch_each_hold(engine):
    results = engine.generate(
        [
            prompt(engine, "one", max_new_tokens=3, temperature=0, details=True),
            prompt(engine, "two", max_new_tokens=9, temperature=0.8, top_p=0.5, seed=7),
            prompt(engine, "three", max_new_tokens=6, temperature=0, repetition_penalty=1.5),
        ]
    )
    assert [r[0].generated_tokens for r in results] == [3, 9, 6]
    assert all(r[0].finish_reason == FinishReason.LENGTH for r in results)
    alone = engine.generate([prompt(engine, "three", max_new_tokens=6, temperature=0, repetition_penalty=1.5)])
    assert texts(alone[0]) == texts(results[2])


@pytest.mark.honours("dynamic", "repetition_penalty")
def test_repetition_penalty_changes_greedy_output(engine):
    plain = engine.generate([prompt(engine, "three", max_new_tokens=16, temperature=0)])
    penalised = engine.generate([prompt(engine, "three", max_new_tokens=16, temperature=0, repetition_penalty=5.0)])
    assert texts(plain[0]) != texts(penalised[0])


@pytest.mark.honours("dynamic", "num_return_sequences")
def test_num_return_sequences_gives_that_many_completions(engine):
    (completions,) = engine.generate([prompt(engine, "hi", max_new_tokens=6, temperature=1.0, num_return_sequences=3, seed=5)])
    assert len(completions) == 3
    assert len(set(texts(completions))) > 1


def test_beam_search_returns_its_sequences(engine):
    (completions,) = engine.generate([prompt(engine, "hi", max_new_tokens=5, temperature=0, num_beams=3, num_return_sequences=2)])
    assert len(completions) == 2 and all(c.generated_tokens <= 5 for c in completions)


@pytest.mark.honours("dynamic", "stop")
def test_stop_string_is_trimmed_and_reported(engine):
    (reference,) = engine.generate([prompt(engine, "Hello", max_new_tokens=20, temperature=0)])
    text = reference[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), "the tiny model's greedy text must hold a usable stop string"
    (stopped,) = engine.generate([prompt(engine, "Hello", max_new_tokens=20, temperature=0, stop=[stop], details=True)])
    assert stopped[0].finish_reason == FinishReason.STOP
    assert stopped[0].text == text[: text.find(stop)]
    assert stop not in stopped[0].text


@pytest.mark.honours("dynamic", "bad_words")
def test_bad_words_never_appear(engine):
    (reference,) = engine.generate([prompt(engine, "Hello", max_new_tokens=10, temperature=0)])
    token = engine.tokenizer(reference[0].text, add_special_tokens=False)["input_ids"][0]
    word = engine.tokenizer.decode([token]).strip()
    assert word
    (banned,) = engine.generate([prompt(engine, "Hello", max_new_tokens=10, temperature=0, bad_words=[word])])
    assert not banned[0].text.lstrip().startswith(word)


def test_eos_is_reported_when_the_model_ends(engine):
    eos = engine.tokenizer.eos_token_id
    eos_text = engine.tokenizer.decode([eos])
    with torch.no_grad():
        engine.model.lm_head.weight[eos] += 100.0
    try:
        (completions,) = engine.generate([prompt(engine, "Hello", max_new_tokens=10, temperature=0)])
    finally:
        with torch.no_grad():
            engine.model.lm_head.weight[eos] -= 100.0
    assert completions[0].finish_reason == FinishReason.EOS
    assert eos_text not in completions[0].text


@pytest.mark.honours("dynamic", "min_new_tokens")
def test_min_new_tokens_holds_off_eos(engine):
    eos = engine.tokenizer.eos_token_id
    with torch.no_grad():
        engine.model.lm_head.weight[eos] += 100.0
    try:
        (completions,) = engine.generate([prompt(engine, "Hello", max_new_tokens=10, min_new_tokens=4, temperature=0)])
    finally:
        with torch.no_grad():
            engine.model.lm_head.weight[eos] -= 100.0
    assert completions[0].generated_tokens == 5  # four forced tokens, then EOS
    assert completions[0].finish_reason == FinishReason.EOS


@pytest.mark.honours("dynamic", "stream")
def test_streaming_sends_pieces_that_add_up_to_the_text(engine):
    pieces: list[tuple[int, int, str]] = []
    (completions,) = engine.generate(
        [prompt(engine, "Hello", max_new_tokens=12, temperature=0, stream=True)],
        sink=lambda index, sequence, text: pieces.append((index, sequence, text)),
    )
    assert len(pieces) > 1
    assert "".join(p[2] for p in pieces) == completions[0].text
    assert {(p[0], p[1]) for p in pieces} == {(0, 0)}


@pytest.mark.honours("dynamic", "stop", "stream")
def test_streaming_never_leaks_a_stop_string(engine):
    (reference,) = engine.generate([prompt(engine, "Hello", max_new_tokens=20, temperature=0)])
    text = reference[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    pieces: list[str] = []
    engine.generate(
        [prompt(engine, "Hello", max_new_tokens=20, temperature=0, stop=[stop], stream=True)],
        sink=lambda index, sequence, piece: pieces.append(piece),
    )
    assert "".join(pieces) == text[: text.find(stop)]


@pytest.mark.honours("dynamic", "stream")
def test_only_streaming_requests_stream(engine):
    pieces: list[int] = []
    engine.generate(
        [prompt(engine, "a", max_new_tokens=4, temperature=0), prompt(engine, "b", max_new_tokens=4, temperature=0, stream=True)],
        sink=lambda index, sequence, text: pieces.append(index),
    )
    assert set(pieces) == {1}


def test_prompt_over_max_input_tokens_is_refused(engine):
    limits = TokenLimits(max_input_tokens=4, max_total_tokens=128)
    with pytest.raises(RequestError) as caught:
        encode(
            Instance(GenerationParams(), Fields("instances[0]"), text="one two three four five six"),
            engine.tokenizer,
            None,
            limits,
        )
    assert caught.value.status == 422 and caught.value.details["limit"] == 4


def test_prompt_plus_max_new_tokens_over_total_is_refused(engine):
    with pytest.raises(RequestError) as caught:
        prompt(engine, "Hello", max_new_tokens=200)
    assert caught.value.field == "max_new_tokens"
    assert "<= 128" in caught.value.message


def test_max_input_tokens_follows_a_smaller_max_total_tokens(engine):
    assert engine.limits == TokenLimits(max_input_tokens=127, max_total_tokens=128)


def test_limits_default_to_the_context_length(tiny_model_dir):
    engine = Engine.load(tiny_model_dir, HandlerSettings(warmup=False))
    assert engine.limits == TokenLimits(max_input_tokens=255, max_total_tokens=256)


def test_chat_messages_use_the_chat_template(engine):
    instance = Instance(GenerationParams(), Fields("instances[0].messages"), messages=({"role": "user", "content": "Hi!"},))
    rendered = encode(instance, engine.tokenizer, None, engine.limits)
    assert "<|im_start|>user\nHi!<|im_end|>" in rendered.text
    assert rendered.text.endswith("<|im_start|>assistant\n")


def test_prompt_template_wraps_plain_prompts(engine):
    instance = Instance(GenerationParams(), Fields("instances[0]"), text="Make tea")
    rendered = encode(instance, engine.tokenizer, "### Instruction:\n{prompt}\n### Response:\n", engine.limits)
    assert rendered.text == "### Instruction:\nMake tea\n### Response:\n"


def test_pickle_only_folders_are_refused_unless_allowed(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(SettingsError, match="allow_pickle_weights"):
        check_weight_format(tmp_path, allow_pickle=False)
    check_weight_format(tmp_path, allow_pickle=True)


def test_device_map_auto_loads_and_generates(tiny_model_dir, tmp_path):
    settings = HandlerSettings(device_map="auto", offload_folder=str(tmp_path / "offload"), warmup=False)
    mapped = Engine.load(tiny_model_dir, settings)
    (completions,) = mapped.generate([prompt(mapped, "Hello", max_new_tokens=3, temperature=0)])
    assert completions[0].generated_tokens == 3


def test_the_app_can_serve_a_quantized_model(tiny_model_dir):
    settings = HandlerSettings(quantization="fp16-dynamic", warmup=False)
    quantized = Engine.load(tiny_model_dir, settings)
    assert not any(type(m) is torch.nn.Linear for m in quantized.model.modules())
    (completions,) = quantized.generate([prompt(quantized, "Hello", max_new_tokens=3, temperature=0)])
    assert completions[0].generated_tokens == 3


def test_a_compiled_app_serves_the_text_of_the_plain_one_alone_and_in_a_batch(tiny_model_dir, engine):
    """handler.compile: the warm-up compiles one row and several; answers stay the plain model's."""
    settings = HandlerSettings(dtype="float32", max_total_tokens=128, compile=True, batch_size=4)
    compiled = Engine.load(tiny_model_dir, settings)
    assert hasattr(compiled.model.forward, "_torchdynamo_orig_callable")
    compiled.warm_up(settings.batch_size)
    batch = ["Hello", "The quick brown fox jumps", "Once upon a time"]
    alone = compiled.generate([prompt(compiled, batch[0], max_new_tokens=6, temperature=0)])
    together = compiled.generate([prompt(compiled, text, max_new_tokens=6, temperature=0) for text in batch])
    plain = engine.generate([prompt(engine, text, max_new_tokens=6, temperature=0) for text in batch])
    assert texts(alone[0]) == texts(plain[0])
    assert [texts(c) for c in together] == [texts(c) for c in plain]


def test_min_p_runs_transformers_warper_in_its_order_for_sampled_rows_only():
    sampled = row_processors(GenerationParams(temperature=0.8, top_p=0.9, min_p=0.2, typical_p=0.5), 4, [0], [])
    kinds = [type(p).__name__ for p in sampled]
    assert kinds == ["TemperatureLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper", "TypicalLogitsWarper"]
    assert not row_processors(GenerationParams(temperature=0, min_p=0.2), 4, [0], [])


@pytest.mark.honours("dynamic", "min_p")
def test_min_p_of_one_leaves_only_the_most_likely_token(engine):
    """min_p=1 keeps only tokens as likely as the top one: sampling at any temperature gives the greedy text."""
    greedy = engine.generate([prompt(engine, "Tell me a story", max_new_tokens=12, temperature=0)])
    sampled = engine.generate(
        [prompt(engine, "Tell me a story", max_new_tokens=12, temperature=1.5, min_p=1.0, num_return_sequences=2)]
    )
    assert texts(sampled[0]) == texts(greedy[0]) * 2


def test_min_p_in_beam_search_reaches_generate(engine):
    (completions,) = engine.generate([prompt(engine, "hi", max_new_tokens=4, temperature=1.0, min_p=0.5, num_beams=2, seed=3)])
    assert len(completions) == 1 and completions[0].generated_tokens <= 4


# Each parameter's effect on the rows and on beam search (tests/unit/test_capabilities.py reads the marks)


@pytest.mark.honours("dynamic", "temperature", "top_k", "top_p", "do_sample")
@pytest.mark.parametrize("tightest", [dict(temperature=1e-3), dict(top_k=1), dict(top_p=1e-6), dict(do_sample=False)], ids=str)
def test_a_sampling_knob_at_its_tightest_makes_a_sampled_row_greedy(engine, tightest):
    story = dict(max_new_tokens=12, temperature=1.5, seed=1)
    greedy = engine.generate([prompt(engine, "Tell me a story", max_new_tokens=12, temperature=0)])
    free = engine.generate([prompt(engine, "Tell me a story", **story)])
    tight = engine.generate([prompt(engine, "Tell me a story", **{**story, **tightest})])
    assert texts(free[0]) != texts(greedy[0])
    assert texts(tight[0]) == texts(greedy[0])


@pytest.mark.honours("dynamic", "typical_p")
def test_typical_p_at_its_tightest_leaves_each_row_one_candidate(engine):
    story = dict(max_new_tokens=12, temperature=1.5, seed=1, num_return_sequences=2)
    free = engine.generate([prompt(engine, "Tell me a story", **story)])
    tight = engine.generate([prompt(engine, "Tell me a story", typical_p=1e-6, **story)])
    assert len(set(texts(free[0]))) == 2
    assert len(set(texts(tight[0]))) == 1


BEAMS = dict(max_new_tokens=6, num_beams=2)


def beams(engine: Engine, text: str = "Tell me a story", **params) -> list[str]:
    (completions,) = engine.generate([prompt(engine, text, **{**BEAMS, **params})])
    return texts(completions)


@pytest.mark.honours("dynamic-beams", "num_beams", "num_return_sequences")
def test_beam_search_returns_that_many_distinct_beams(engine):
    assert len(set(beams(engine, temperature=0, num_beams=3, num_return_sequences=3))) == 3
    assert len(beams(engine, temperature=0, num_beams=3, num_return_sequences=2)) == 2


@pytest.mark.honours("dynamic-beams", "seed")
def test_a_seeded_beam_search_repeats_and_another_seed_does_not(engine):
    sampled = dict(temperature=1.5, num_return_sequences=2)
    assert beams(engine, seed=3, **sampled) == beams(engine, seed=3, **sampled)
    assert beams(engine, seed=3, **sampled) != beams(engine, seed=4, **sampled)


@pytest.mark.honours("dynamic-beams", "temperature", "top_k", "top_p", "min_p", "typical_p", "do_sample")
@pytest.mark.parametrize(
    "change",
    [dict(temperature=0.2), dict(top_k=2), dict(top_p=0.05), dict(min_p=1.0), dict(typical_p=0.05), dict(do_sample=False)],
    ids=str,
)
def test_each_sampling_parameter_changes_a_seeded_beam_search(engine, change):
    sampled = dict(temperature=1.5, seed=3)
    assert beams(engine, **{**sampled, **change}) != beams(engine, **sampled)


@pytest.mark.honours("dynamic-beams", "do_sample")
def test_do_sample_false_makes_beam_search_deterministic(engine):
    assert beams(engine, temperature=1.5, do_sample=False) == beams(engine, temperature=0)


@pytest.mark.honours("dynamic-beams", "repetition_penalty")
def test_the_repetition_penalty_changes_beam_search(engine):
    plain = beams(engine, "one two one two one two", max_new_tokens=12, temperature=0)
    assert beams(engine, "one two one two one two", max_new_tokens=12, temperature=0, repetition_penalty=5.0) != plain


@pytest.mark.honours("dynamic-beams", "max_new_tokens")
def test_each_beam_search_keeps_its_length(engine):
    for length in (2, 7):
        (completions,) = engine.generate([prompt(engine, "Hello", max_new_tokens=length, temperature=0, num_beams=2)])
        assert completions[0].generated_tokens == length and completions[0].finish_reason == FinishReason.LENGTH


@pytest.mark.honours("dynamic-beams", "min_new_tokens")
def test_min_new_tokens_holds_off_eos_in_beam_search(engine):
    eos = engine.tokenizer.eos_token_id
    with torch.no_grad():
        engine.model.lm_head.weight[eos] += 100.0
    try:
        (early,) = engine.generate([prompt(engine, "Hello", max_new_tokens=10, temperature=0, num_beams=2)])
        (held,) = engine.generate([prompt(engine, "Hello", max_new_tokens=10, min_new_tokens=4, temperature=0, num_beams=2)])
    finally:
        with torch.no_grad():
            engine.model.lm_head.weight[eos] -= 100.0
    assert (early[0].generated_tokens, early[0].finish_reason) == (0, FinishReason.EOS)
    assert (held[0].generated_tokens, held[0].finish_reason) == (4, FinishReason.EOS)


@pytest.mark.honours("dynamic-beams", "stop")
def test_a_stop_string_trims_a_beam(engine):
    text = beams(engine, "Hello", max_new_tokens=20, temperature=0)[0]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), "the tiny model's beam text must hold a usable stop string"
    (stopped,) = engine.generate([prompt(engine, "Hello", max_new_tokens=20, temperature=0, num_beams=2, stop=[stop])])
    assert stopped[0].text == text[: text.find(stop)] and stopped[0].finish_reason == FinishReason.STOP


@pytest.mark.honours("dynamic-beams", "bad_words")
def test_bad_words_never_start_a_beam(engine):
    text = beams(engine, "Hello", max_new_tokens=10, temperature=0)[0]
    word = engine.tokenizer.decode([engine.tokenizer(text, add_special_tokens=False)["input_ids"][0]]).strip()
    assert word
    assert not beams(engine, "Hello", max_new_tokens=10, temperature=0, bad_words=[word])[0].lstrip().startswith(word)
