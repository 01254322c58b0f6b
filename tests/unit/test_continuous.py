"""Continuous batching on a tiny random Llama: routing, per-request parameters, stops, streaming.

The manager's output is compared with the classic engine's on the same prompts, so a
parameter it serves is one it honours exactly. `handle_one` runs with TorchServe's own
Context, its streamed chunks read back from a socket pair.
"""

import asyncio
import json
from pathlib import Path

import pytest
import torch

from handler.decoding.stopping import FinishReason
from handler.model.loading import LoadedModel, load_model
from handler.params import GenerationParams
from handler.pipeline.prompts import Prompt
from handler.schedulers import row_attention
from handler.schedulers.base import Router, unhonoured
from handler.schedulers.compat import pending_result_handlers
from handler.schedulers.continuous import ContinuousScheduler, processor_kwargs
from handler.schedulers.dynamic import DynamicScheduler
from handler.settings import ContinuousBatchingSettings, HandlerSettings, SettingsError
from handler.torchserve_handler import LLMHandler
from tests.support.context import make_context, run_async
from tests.support.prompts import make_prompt

CACHE = ContinuousBatchingSettings(num_blocks=48, page_size=16, max_batch_tokens=256)
CACHE_CONFIG = {"num_blocks": 48, "page_size": 16, "max_batch_tokens": 256}


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    return load_model(tiny_model_dir, HandlerSettings(dtype="float32", max_total_tokens=200), torch.device("cpu"))


@pytest.fixture(scope="module")
def engine(loaded: LoadedModel) -> DynamicScheduler:
    return DynamicScheduler(loaded)


@pytest.fixture(scope="module")
def continuous(loaded: LoadedModel):
    served = ContinuousScheduler(loaded, CACHE)
    yield served
    served.stop()


@pytest.fixture(scope="module")
def beside(loaded: LoadedModel, continuous: ContinuousScheduler) -> DynamicScheduler:
    """The dynamic scheduler as it runs beside the manager: in a worker thread, taking turns with it."""
    return DynamicScheduler(loaded, threaded=True, guard=continuous.exclusive)


def prompt(engine: DynamicScheduler, text: str, **params) -> Prompt:
    return make_prompt(engine.loaded, text, **params)


def complete_all(scheduler, prompts: list[Prompt], stream=None) -> list:
    return asyncio.run(scheduler.complete(prompts, stream))


def handlers_left(continuous: ContinuousScheduler) -> int:
    return pending_result_handlers(continuous.manager)


# The routing rule


@pytest.mark.parametrize(
    "params, reason",
    [
        (GenerationParams(), None),
        (GenerationParams(temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.2, min_new_tokens=3), None),
        (GenerationParams(stop=("###",), num_return_sequences=2, stream=True, details=True), None),
        (GenerationParams(temperature=0.8, min_p=0.1), None),
        (GenerationParams(seed=7), "seed"),
        (GenerationParams(num_beams=2), "num_beams"),
        (GenerationParams(typical_p=0.5), "typical_p"),
        (GenerationParams(bad_words=("no",)), "bad_words"),
    ],
)
def test_only_what_the_manager_cannot_honour_goes_to_the_classic_engine(params, reason):
    assert unhonoured(params, ContinuousScheduler.honours) == reason
    assert unhonoured(params, DynamicScheduler.honours) is None


def test_greedy_is_a_single_candidate_at_temperature_one():
    kwargs = processor_kwargs(GenerationParams(temperature=0, top_k=40, top_p=0.5), vocab_size=1000)
    assert (kwargs["top_k"], kwargs["temperature"], kwargs["top_p"]) == (1, 1.0, 1.0)


def test_top_k_off_or_too_large_keeps_the_whole_vocabulary():
    assert processor_kwargs(GenerationParams(top_k=0), vocab_size=1000)["top_k"] == 1000
    assert processor_kwargs(GenerationParams(top_k=5000), vocab_size=1000)["top_k"] == 1000


def test_processor_arguments_have_the_types_the_manager_checks():
    kwargs = processor_kwargs(GenerationParams(temperature=1, top_p=1, repetition_penalty=1), vocab_size=10)
    assert all(isinstance(kwargs[name], float) for name in ("temperature", "top_p", "repetition_penalty"))
    assert all(isinstance(kwargs[name], int) for name in ("top_k", "min_new_tokens"))


def test_continuous_batching_needs_the_async_worker():
    with pytest.raises(SettingsError, match="asyncCommunication"):
        HandlerSettings.from_config({"handler": {"batching": "continuous"}}, {})
    settings = HandlerSettings.from_config({"asyncCommunication": True, "handler": {"batching": "continuous"}}, {})
    assert settings.batching == "continuous"


# The manager against the classic engine


@pytest.mark.honours("continuous", "temperature", "top_k", "repetition_penalty")
def test_manager_output_equals_the_classic_engine_for_the_parameters_it_serves(engine, continuous):
    cases = [
        dict(max_new_tokens=12, temperature=0),
        dict(max_new_tokens=12, temperature=0, repetition_penalty=1.5),
        dict(max_new_tokens=12, temperature=0, repetition_penalty=0.6),
        dict(max_new_tokens=12, temperature=0.7, top_k=1),
        dict(max_new_tokens=12, temperature=0, min_new_tokens=10),
    ]
    prompts = [prompt(engine, text, **case) for case in cases for text in ("Hello there", "Tell me a story about")]
    classic = [engine.generate([p])[0][0] for p in prompts]
    served = [sequences[0] for sequences in complete_all(continuous, prompts)]
    assert [c.text for c in served] == [c.text for c in classic]
    assert [c.finish_reason for c in served] == [c.finish_reason for c in classic]
    assert [c.generated_tokens for c in served] == [c.generated_tokens for c in classic]
    assert handlers_left(continuous) == 0


@pytest.mark.honours("continuous", "temperature")
def test_greedy_rows_never_reach_the_multinomial(engine, continuous, monkeypatch):
    """Greedy rows take the argmax in the manager (`batch_processors.GreedySampler`): with the
    multinomial broken, greedy requests still give the classic engine's text, and a sampled
    neighbour is the only one that needs it."""
    drawn_rows = []
    multinomial = torch.multinomial

    def counting_multinomial(probabilities, *args, **kwargs):
        drawn_rows.append(probabilities.size(0))
        return multinomial(probabilities, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", counting_multinomial)
    greedy = [prompt(engine, text, max_new_tokens=10, temperature=0) for text in ("Hello there", "Tell me a story")]
    classic = [engine.generate([p])[0][0].text for p in greedy]
    drawn_rows.clear()
    assert [s[0].text for s in complete_all(continuous, greedy)] == classic
    assert drawn_rows == []
    sampled = prompt(engine, "Once upon", max_new_tokens=10, temperature=0.9)
    served = complete_all(continuous, [*greedy, sampled])
    assert [s[0].text for s in served[:2]] == classic
    assert drawn_rows and max(drawn_rows) == 1, "only the sampled row is drawn from"


@pytest.mark.honours("continuous", "min_p")
def test_min_p_of_one_makes_the_manager_sample_the_greedy_text(engine, continuous):
    """min_p=1 keeps only tokens as likely as the top one, so sampled rows give greedy text; the
    neighbour without min_p shows that the sequence's processors stay on its own row."""
    greedy = engine.generate([prompt(engine, "Tell me a story", max_new_tokens=12, temperature=0)])[0][0].text
    [filtered, _] = complete_all(
        continuous,
        [
            prompt(engine, "Tell me a story", max_new_tokens=12, temperature=1.5, min_p=1.0, num_return_sequences=2),
            prompt(engine, "A neighbour", max_new_tokens=12, temperature=1.5),
        ],
    )
    assert [c.text for c in filtered] == [greedy, greedy]
    assert continuous.processor_lists == {}


@pytest.mark.honours("continuous", "repetition_penalty")
def test_the_repetition_penalty_changes_what_the_manager_generates(engine, continuous):
    plain, penalised = complete_all(
        continuous,
        [
            prompt(engine, "one two one two one two", max_new_tokens=16, temperature=0),
            prompt(engine, "one two one two one two", max_new_tokens=16, temperature=0, repetition_penalty=3.0),
        ],
    )
    assert plain[0].text != penalised[0].text


@pytest.mark.honours("continuous", "temperature", "top_k", "top_p", "do_sample")
@pytest.mark.parametrize("tightest", [dict(temperature=1e-3), dict(top_k=1), dict(top_p=1e-6), dict(do_sample=False)], ids=str)
def test_a_sampling_knob_at_its_tightest_makes_the_manager_sample_the_greedy_text(engine, continuous, tightest):
    greedy = engine.generate([prompt(engine, "Tell me a story", max_new_tokens=12, temperature=0)])[0][0].text
    free, tight = complete_all(
        continuous,
        [
            prompt(engine, "Tell me a story", max_new_tokens=12, temperature=1.5),
            prompt(engine, "Tell me a story", **{"max_new_tokens": 12, "temperature": 1.5, **tightest}),
        ],
    )
    assert free[0].text != greedy
    assert tight[0].text == greedy


@pytest.mark.honours("continuous", "min_new_tokens")
def test_min_new_tokens_holds_off_eos_in_the_manager(engine, continuous):
    eos = engine.loaded.tokenizer.eos_token_id
    with torch.no_grad():
        engine.loaded.model.lm_head.weight[eos] += 100.0
    try:
        early, held = complete_all(
            continuous,
            [
                prompt(engine, "Hello", max_new_tokens=10, temperature=0),
                prompt(engine, "Hello", max_new_tokens=10, min_new_tokens=4, temperature=0),
            ],
        )
    finally:
        with torch.no_grad():
            engine.loaded.model.lm_head.weight[eos] -= 100.0
    assert (early[0].generated_tokens, early[0].finish_reason) == (1, FinishReason.EOS)
    assert (held[0].generated_tokens, held[0].finish_reason) == (5, FinishReason.EOS)


@pytest.mark.honours("continuous", "max_new_tokens")
def test_each_request_keeps_its_own_length(engine, continuous):
    lengths = [3, 17, 8, 1]
    results = complete_all(continuous, [prompt(engine, "Count with me", max_new_tokens=n, temperature=1.2) for n in lengths])
    assert [r[0].generated_tokens for r in results] == lengths
    assert {r[0].finish_reason for r in results} == {FinishReason.LENGTH}


@pytest.mark.honours("continuous", "num_return_sequences")
def test_num_return_sequences_gives_that_many_sampled_completions(engine, continuous):
    [completions] = complete_all(
        continuous, [prompt(engine, "Pick a word", max_new_tokens=6, temperature=1.5, num_return_sequences=3)]
    )
    assert len(completions) == 3
    assert all(c.generated_tokens == 6 for c in completions)


@pytest.mark.honours("continuous", "stop", "stream")
def test_a_stop_string_ends_the_sequence_and_cancels_it_in_the_manager(engine, continuous):
    greedy = engine.generate([prompt(engine, "Hello there", max_new_tokens=30, temperature=0)])[0][0].text
    stop = greedy[len(greedy) // 2 : len(greedy) // 2 + 3]
    expected = greedy[: greedy.find(stop)]
    pieces: list[tuple[int, str]] = []
    [[completion]] = complete_all(
        continuous,
        [prompt(engine, "Hello there", max_new_tokens=30, temperature=0, stop=stop, stream=True)],
        lambda _, index, text: pieces.append((index, text)),
    )
    assert completion.text == expected
    assert completion.finish_reason == FinishReason.STOP
    assert completion.generated_tokens < 30
    assert "".join(text for _, text in pieces) == expected
    assert all(stop not in text for _, text in pieces)
    assert handlers_left(continuous) == 0


@pytest.mark.honours("continuous", "stream")
def test_streamed_pieces_add_up_to_the_text_and_come_token_by_token(engine, continuous):
    pieces: list[tuple[int, str]] = []
    [[completion]] = complete_all(
        continuous,
        [prompt(engine, "Stream this", max_new_tokens=20, temperature=0, stream=True)],
        lambda _, index, text: pieces.append((index, text)),
    )
    assert len(pieces) > 5
    assert {index for index, _ in pieces} == {0}
    assert "".join(text for _, text in pieces) == completion.text


@pytest.mark.honours("continuous", "stream")
def test_a_prompt_that_does_not_stream_sends_nothing(engine, continuous):
    pieces: list[str] = []
    complete_all(continuous, [prompt(engine, "Quiet", max_new_tokens=5)], lambda _, index, text: pieces.append(text))
    assert pieces == []


def test_the_deadline_ends_a_generation_with_finish_reason_length(engine):
    hurried = ContinuousScheduler(engine.loaded, CACHE, deadline_seconds=0.001)
    try:
        [[completion]] = complete_all(hurried, [prompt(engine, "Take your time", max_new_tokens=150, temperature=0)])
        assert completion.finish_reason == FinishReason.LENGTH
        assert completion.generated_tokens < 150
        assert handlers_left(hurried) == 0
    finally:
        hurried.stop()


@pytest.mark.honours("dynamic", "seed")
def test_the_classic_engine_serves_a_seeded_prompt_like_it_does_alone(engine, continuous, beside):
    seeded = prompt(engine, "Tell me a story", max_new_tokens=10, temperature=1.0, seed=1234)
    alone = engine.generate([seeded])[0][0].text
    router = Router([continuous, beside])
    neighbour = prompt(engine, "A neighbour", max_new_tokens=20, temperature=0.9)

    [classic_result, _] = complete_all(router, [seeded, neighbour])
    assert classic_result[0].text == alone


def test_classic_generates_beside_the_manager_leave_the_model_as_it_was(engine, continuous, beside):
    greedy = [prompt(engine, f"Classic prompt {n}", max_new_tokens=60, temperature=0) for n in range(3)]
    alone = [engine.generate([p])[0][0].text for p in greedy]
    is_causal = getattr(engine.loaded.model.config, "is_causal", None)

    async def run():
        neighbours = [
            continuous.complete([prompt(engine, f"Neighbour {n}", max_new_tokens=80, temperature=0.9)]) for n in range(4)
        ]
        return await asyncio.gather(*(beside.complete([p]) for p in greedy), *neighbours)

    beside = [result[0][0].text for result in asyncio.run(run())[: len(greedy)]]
    assert beside == alone
    assert getattr(engine.loaded.model.config, "is_causal", None) == is_causal
    assert [engine.generate([p])[0][0].text for p in greedy] == alone


# The adapter's async handle with TorchServe's own Context


@pytest.fixture(scope="module")
def handler(tiny_model_dir: Path):
    config = {
        "asyncCommunication": True,
        "handler": {"batching": "continuous", "continuous": CACHE_CONFIG, "max_total_tokens": 200, "dtype": "float32"},
    }
    context = make_context("tiny", tiny_model_dir, config, batch_size=1)
    served = LLMHandler()
    served.initialize(context)
    assert served.service.continuous.running
    yield served, context
    served.service.stop()


def run_handler(handler_and_context, bodies: list) -> tuple[list[tuple[int, dict]], list[tuple[int, bytes]]]:
    """Runs one TorchServe message through `handle`; returns each request's (status, body) and the chunks sent."""
    served, context = handler_and_context
    return run_async(served, context, bodies)


@pytest.mark.honours("continuous", "details")
def test_handle_answers_each_request_of_a_message_on_its_own(handler):
    results, _ = run_handler(
        handler,
        [
            {"instances": ["Hello"], "parameters": {"max_new_tokens": 4, "details": True}},
            {"instances": []},
            {"instances": ["Hi", {"prompt": "Yo", "seed": 3}], "parameters": {"max_new_tokens": 5, "temperature": 0.8}},
            {"instances": ["x"], "parameters": {"max_new_tokens": 100_000}},
            {"instances": ["x"], "parameters": {"min_p": 1.5}},
        ],
    )
    assert [status for status, _ in results] == [200, 400, 200, 422, 400]
    assert results[4][1]["field"] == "parameters.min_p"
    [first] = results[0][1]["predictions"]
    assert first["finish_reason"] == "length" and first["generated_tokens"] == 4 and first["prompt_tokens"] > 0
    assert results[1][1]["field"] == "instances"
    assert len(results[2][1]["predictions"]) == 2
    assert results[3][1]["field"] == "max_new_tokens"


@pytest.mark.honours("continuous", "stream")
def test_handle_streams_json_lines_that_add_up_to_the_prediction(handler):
    results, chunks = run_handler(
        handler, [{"instances": ["Stream me"], "parameters": {"max_new_tokens": 12, "temperature": 0, "stream": True}}]
    )
    [(status, body)] = results
    assert status == 200
    lines = [json.loads(body) for _, body in chunks]
    assert len(lines) > 3
    assert {line["index"] for line in lines} == {0}
    assert "".join(line["text"] for line in lines) == body["predictions"][0]["generated_text"]


@pytest.mark.honours("dynamic", "stream")
def test_handle_streams_a_classic_routed_prompt_too(handler):
    results, chunks = run_handler(
        handler, [{"instances": ["Seeded"], "parameters": {"max_new_tokens": 8, "seed": 5, "stream": True}}]
    )
    [(status, body)] = results
    assert status == 200
    assert "".join(json.loads(chunk)["text"] for _, chunk in chunks) == body["predictions"][0]["generated_text"]


def test_each_stream_chunk_names_the_prediction_it_belongs_to(handler):
    """Two instances with two sequences each, one on the manager and one on the classic path:
    a chunk's index is its prediction's position, so the pieces of each add up to that text."""
    body = {
        "instances": ["Stream me", {"prompt": "Seeded", "seed": 5}],
        "parameters": {"max_new_tokens": 8, "temperature": 0.9, "num_return_sequences": 2, "stream": True},
    }
    [(status, final)], chunks = run_handler(handler, [body])
    assert status == 200
    lines = [json.loads(chunk) for _, chunk in chunks]
    predictions = [p["generated_text"] for p in final["predictions"]]
    assert len(predictions) == 4
    assert {line["index"] for line in lines} == {0, 1, 2, 3}
    for index, text in enumerate(predictions):
        assert "".join(line["text"] for line in lines if line["index"] == index) == text


@pytest.mark.honours("continuous", "return_full_text")
def test_return_full_text_prepends_the_prompt(handler):
    [(status, body)], _ = run_handler(
        handler, [{"instances": ["Prefix here"], "parameters": {"max_new_tokens": 3, "return_full_text": True}}]
    )
    assert status == 200
    assert body["predictions"][0]["generated_text"].startswith("Prefix here")


def test_a_stopped_manager_is_replaced_on_the_next_request(handler):
    served, _ = handler
    first = served.service.continuous.manager
    first.stop(block=True)
    [(status, body)], _ = run_handler(handler, [{"instances": ["Again"], "parameters": {"max_new_tokens": 3}}])
    assert status == 200 and body["predictions"][0]["generated_text"] is not None
    assert served.service.continuous.manager is not first and served.service.continuous.running


# Row-by-row attention on the manager's steps (`row_attention`)

ROW_TEXTS = ("Hello there", "Tell me a story about a dragon who", "Why", "Name three colours of the sea at night")
# Long enough to be prefilled in several pieces by a manager that takes 48 tokens a step.
LONG_TEXT = "Tell me everything you know about the sea, the wind and the ships that sail on them. " * 6


@pytest.fixture
def plans(monkeypatch) -> list[row_attention.StepPlan]:
    """Each step plan the row path makes."""
    made: list[row_attention.StepPlan] = []
    real = row_attention.step_plan

    def recorded(query_ends: torch.Tensor, key_ends: torch.Tensor, slots: torch.Tensor) -> row_attention.StepPlan:
        made.append(real(query_ends, key_ends, slots))
        return made[-1]

    monkeypatch.setattr(row_attention, "step_plan", recorded)
    return made


def test_the_row_gather_pads_each_row_to_the_longest_and_masks_the_padding():
    positions, readable = row_attention.row_gather(torch.tensor([0, 3, 8]), torch.tensor([3, 5, 2]), 10)
    # Padding reads whatever position follows (never past the last key); the mask hides it.
    assert positions.tolist() == [[0, 1, 2, 3, 4], [3, 4, 5, 6, 7], [8, 9, 9, 9, 9]]
    assert readable.shape == (3, 1, 1, 5)
    assert readable[:, 0, 0].tolist() == [
        [True, True, True, False, False],
        [True, True, True, True, True],
        [True, True, False, False, False],
    ]


def test_a_step_plan_batches_one_token_rows_and_gives_each_longer_row_its_own_causal_span():
    # Row 0 decodes (1 query, 4 keys); row 1 prefills a fresh prompt (3 and 3); row 2 decodes
    # (1 and 2); row 3 prefills the second piece of a prompt (2 new tokens after 3 known: 5 keys).
    # The cache holds the step's 14 key positions in slots 100 to 113.
    slots = torch.arange(14) + 100
    plan = row_attention.step_plan(torch.tensor([0, 1, 4, 5, 7]), torch.tensor([0, 4, 7, 9, 14]), slots)
    assert plan.singles is not None
    assert plan.singles.queries.tolist() == [0, 4]
    assert plan.singles.positions.tolist() == [[100, 101, 102, 103], [107, 108, 109, 110]]
    assert plan.singles.readable[:, 0, 0].tolist() == [[True, True, True, True], [True, True, False, False]]
    fresh, piece = plan.spans
    assert (fresh.queries, fresh.keys.tolist(), fresh.readable) == (slice(1, 4), [104, 105, 106], None)
    assert (piece.queries, piece.keys.tolist()) == (slice(5, 7), [109, 110, 111, 112, 113])
    assert piece.readable is not None
    assert piece.readable.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_decode_steps_of_several_rows_attend_row_by_row_and_keep_the_classic_engines_text(engine, continuous, plans, monkeypatch):
    cache_reads = []
    write = row_attention.paged_write

    def counted(*args):
        written = write(*args)
        cache_reads.append(written is not None)
        return written

    monkeypatch.setattr(row_attention, "paged_write", counted)
    prompts = [prompt(engine, text, max_new_tokens=16, temperature=0) for text in ROW_TEXTS]
    classic = [engine.generate([p])[0][0] for p in prompts]
    served = [sequences[0] for sequences in asyncio.run(continuous.complete(prompts))]
    assert [c.text for c in served] == [c.text for c in classic]
    assert any(cache_reads), "no step gathered its keys straight from the cache's slots"
    decode_steps = [plan for plan in plans if not plan.spans]
    assert decode_steps, "no decode step took the row path"
    assert all(plan.singles is not None and plan.singles.queries.numel() >= 2 for plan in decode_steps)


def test_prompts_prefilled_beside_decoding_rows_attend_over_their_own_keys_and_keep_the_text(engine, plans):
    """A small step budget prefills the long prompt in pieces while the short ones decode."""
    small_steps = ContinuousScheduler(engine.loaded, ContinuousBatchingSettings(num_blocks=48, page_size=16, max_batch_tokens=48))
    try:
        prompts = [prompt(engine, text, max_new_tokens=12, temperature=0) for text in (*ROW_TEXTS[:3], LONG_TEXT)]
        assert len(prompts[-1].input_ids) > 2 * 48
        classic = [engine.generate([p])[0][0] for p in prompts]
        served = [sequences[0] for sequences in asyncio.run(small_steps.complete(prompts))]
    finally:
        small_steps.stop()
    assert [c.text for c in served] == [c.text for c in classic]
    beside = [plan for plan in plans if plan.singles is not None and plan.spans]
    assert beside, "no step prefilled beside decoding rows"
    assert any(span.readable is not None for plan in plans for span in plan.spans), "no later piece of a prompt"


def test_a_lone_row_keeps_transformers_sdpa_call_and_the_classic_engines_text(engine, continuous, plans, monkeypatch):
    """Its decode steps write and read their keys past the cache's update, then attend as transformers does."""
    updates, writes = [], []
    write, update = row_attention.paged_write, row_attention.paged_update
    monkeypatch.setattr(row_attention, "paged_write", lambda *args: writes.append(1) or write(*args))
    monkeypatch.setattr(row_attention, "paged_update", lambda *args: updates.append(1) or update(*args))
    alone = prompt(engine, ROW_TEXTS[1], max_new_tokens=8, temperature=0)
    (sequence,) = asyncio.run(continuous.complete([alone]))[0]
    assert sequence.generated_tokens == 8
    assert sequence.text == engine.generate([alone])[0][0].text
    assert plans == [], "a lone row took the batched row path"
    layers = engine.loaded.model.config.num_hidden_layers
    assert len(writes) == 7 * layers and updates == [], "the 7 decode steps after the prefill wrote past the cache's update"
