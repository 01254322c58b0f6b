"""The per-sequence grammar constraint, on a tiny random Llama with SmolLM2's real tokenizer.

A random model writes nonsense, so whatever fits the grammar is the grammar's doing. Rows are
driven through `generate` with a small per-row processor of the test's own, so these tests
hold whichever scheduler applies the constraint.
"""

import json

import jsonschema
import pytest
import torch
import xgrammar
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

from handler.response_format import parse_response_format
from handler.settings import StructuredOutputSettings
from handler.structured.constraint import mask_backend
from handler.structured.grammars import Grammars, tokenizer_info

EOS = 2
BOUNDED = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "enum": ["yes", "no", "maybe"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 9},
        "tags": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 2},
    },
    "required": ["answer", "score", "tags"],
}


class Rows(LogitsProcessor):
    """Each row's own processor on its own slice, None for an unconstrained row."""

    def __init__(self, processors):
        self.processors = processors

    def __call__(self, input_ids, scores):
        for row, processor in enumerate(self.processors):
            if processor is not None:
                scores[row : row + 1] = processor(input_ids[row : row + 1], scores[row : row + 1])
        return scores


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.padding_side = "left"
    return tokenizer


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def grammars(tokenizer, model):
    service = Grammars(tokenizer_info(tokenizer, model.config.vocab_size, [EOS]), StructuredOutputSettings())
    yield service
    service.close()


def fmt(value):
    return parse_response_format(value, "parameters.response_format", 32_768)


def generate(model, tokenizer, prompts, make_processors, max_new_tokens=48, sample_seed=None):
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    length = batch["input_ids"].shape[1]
    processors = make_processors(length)
    kwargs = {"do_sample": False}
    if sample_seed is not None:
        torch.manual_seed(sample_seed)
        kwargs = {"do_sample": True, "top_k": 0, "temperature": 1.0}
    with torch.inference_mode():
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            logits_processor=LogitsProcessorList([Rows(processors)]),
            eos_token_id=EOS,
            pad_token_id=EOS,
            **kwargs,
        )
    texts = []
    for row in output[:, length:].tolist():
        ended = row.index(EOS) if EOS in row else len(row)
        texts.append((tokenizer.decode(row[:ended], skip_special_tokens=True), ended < len(row)))
    return texts, processors


def test_a_greedy_row_writes_an_answer_that_validates_and_ends_with_eos(model, tokenizer, grammars):
    spec = fmt({"type": "json_schema", "json_schema": {"schema": BOUNDED}})
    [(text, ended)], [constraint] = generate(model, tokenizer, ["Answer:"], lambda n: [grammars.constraint(spec, n)])
    jsonschema.validate(json.loads(text), BOUNDED)
    assert ended and constraint.failure is None


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sampled_rows_validate_too(model, tokenizer, grammars, seed):
    spec = fmt({"type": "json_schema", "json_schema": {"schema": BOUNDED}})
    [(text, ended)], _ = generate(
        model, tokenizer, ["Answer:"], lambda n: [grammars.constraint(spec, n)], max_new_tokens=64, sample_seed=seed
    )
    jsonschema.validate(json.loads(text), BOUNDED)
    assert ended


@pytest.mark.parametrize(
    "value, check",
    [
        ({"type": "regex", "pattern": "[0-9]{3}-[a-c]{2}"}, lambda text: len(text) == 6 and text[3] == "-"),
        ({"type": "grammar", "grammar": 'root ::= "yes" | "no"'}, lambda text: text in ("yes", "no")),
    ],
    ids=["regex", "grammar"],
)
def test_each_kind_shapes_the_text(model, tokenizer, grammars, value, check):
    spec = fmt(value)
    [(text, ended)], _ = generate(model, tokenizer, ["Go:"], lambda n: [grammars.constraint(spec, n)], max_new_tokens=200)
    assert ended and check(text), text


def test_json_object_text_is_an_object_as_far_as_it_goes(model, tokenizer, grammars):
    """A random model rarely closes a free object, so the text is checked as a prefix the grammar accepts."""
    spec = fmt({"type": "json_object"})
    [(text, _)], [constraint] = generate(model, tokenizer, ["Go:"], lambda n: [grammars.constraint(spec, n)])
    assert text.startswith("{") and constraint.failure is None
    assert xgrammar.GrammarMatcher(grammars.compile(spec)).accept_string(text)


def test_an_unconstrained_neighbour_writes_what_it_writes_alone(model, tokenizer, grammars):
    spec = fmt({"type": "json_schema", "json_schema": {"schema": BOUNDED}})
    prompts = ["Answer:", "Once upon a time"]
    alone, _ = generate(model, tokenizer, prompts[1:], lambda n: [None])
    together, _ = generate(model, tokenizer, prompts, lambda n: [grammars.constraint(spec, n), None])
    jsonschema.validate(json.loads(together[0][0]), BOUNDED)
    assert together[1] == alone[0]


def test_rows_of_one_grammar_keep_their_own_state(model, tokenizer, grammars):
    spec = fmt({"type": "json_schema", "json_schema": {"schema": BOUNDED}})
    texts, constraints = generate(
        model,
        tokenizer,
        ["Answer:", "A much longer prompt, padded differently:"],
        lambda n: [grammars.constraint(spec, n), grammars.constraint(spec, n)],
        max_new_tokens=64,
        sample_seed=5,
    )
    for text, _ in texts:
        jsonschema.validate(json.loads(text), BOUNDED)
    assert constraints[0].matcher is not constraints[1].matcher


def test_only_tokens_the_grammar_allows_stay_possible(tokenizer, grammars):
    constraint = grammars.constraint(fmt({"type": "regex", "pattern": "[0-9]+"}), 1)
    scores = torch.zeros(1, 49152)
    constraint(torch.tensor([[5]]), scores)
    allowed = torch.isfinite(scores[0]).nonzero().flatten().tolist()
    assert allowed and all(tokenizer.decode([token]).isdigit() for token in allowed)


def test_eos_becomes_possible_only_once_the_grammar_is_complete(grammars, tokenizer):
    constraint = grammars.constraint(fmt({"type": "regex", "pattern": "ab"}), 0)
    scores = torch.zeros(1, 49152)
    constraint(torch.tensor([[]], dtype=torch.long), scores)
    assert not torch.isfinite(scores[0, EOS])
    scores = torch.zeros(1, 49152)
    constraint(torch.tensor([tokenizer("ab", add_special_tokens=False)["input_ids"]]), scores)
    assert torch.isfinite(scores[0]).nonzero().flatten().tolist() == [EOS]


def test_after_eos_the_row_is_left_alone(grammars, tokenizer):
    constraint = grammars.constraint(fmt({"type": "regex", "pattern": "ab"}), 0)
    ab = tokenizer("ab", add_special_tokens=False)["input_ids"]
    constraint(torch.tensor([ab]), torch.zeros(1, 49152))
    scores = torch.zeros(1, 49152)
    constraint(torch.tensor([ab + [EOS, EOS, EOS]]), scores)
    assert constraint.terminated and constraint.failure is None and torch.all(scores == 0)


def test_a_closed_row_is_left_alone(grammars):
    constraint = grammars.constraint(fmt({"type": "regex", "pattern": "[0-9]+"}), 0)
    constraint.close()
    scores = torch.zeros(1, 49152)
    constraint(torch.tensor([[7, 7, 7]]), scores)
    assert torch.all(scores == 0) and constraint.failure is None


def test_a_refused_token_fails_only_its_row_which_then_ends(grammars, tokenizer):
    constraint = grammars.constraint(fmt({"type": "regex", "pattern": "[0-9]+"}), 0)
    letter = tokenizer("x", add_special_tokens=False)["input_ids"]
    scores = torch.zeros(1, 49152)
    constraint(torch.tensor([letter]), scores)
    assert constraint.failure is not None and constraint.failure.status == 500
    assert constraint.failure.field == "parameters.response_format.pattern"
    assert torch.isfinite(scores[0]).nonzero().flatten().tolist() == [EOS]


def test_a_grammar_too_slow_to_follow_ends_its_row_with_a_422(info_for_slow):
    grammars, tokenizer = info_for_slow
    constraint = grammars.constraint(fmt({"type": "regex", "pattern": "((a+)+)+b"}), 0)
    a = tokenizer.convert_tokens_to_ids("a")
    tokens: list[int] = []
    while constraint.failure is None and len(tokens) < 2000:
        constraint(torch.tensor([tokens], dtype=torch.long), torch.zeros(1, 49152))
        tokens.append(a)
    assert constraint.failure is not None and constraint.failure.status == 422
    assert constraint.failure.details == {"limit": 1, "limit_name": "structured_output.max_mask_ms"}


@pytest.fixture(scope="module")
def info_for_slow(tokenizer, model):
    service = Grammars(tokenizer_info(tokenizer, model.config.vocab_size, [EOS]), StructuredOutputSettings(max_mask_ms=1))
    yield service, tokenizer
    service.close()


def test_logits_wider_than_the_vocabulary_have_the_extra_columns_masked(grammars):
    constraint = grammars.constraint(fmt({"type": "json_object"}), 0)
    scores = torch.zeros(1, 49152 + 64)
    constraint(torch.tensor([[]], dtype=torch.long), scores)
    assert not torch.isfinite(scores[0, 49152:]).any() and torch.isfinite(scores[0, :49152]).any()


def test_half_precision_logits_on_cpu_are_masked_alike(grammars):
    spec = fmt({"type": "regex", "pattern": "[0-9]+"})
    wide = torch.randn(1, 49152)
    half = wide.to(torch.bfloat16)
    grammars.constraint(spec, 0)(torch.tensor([[]], dtype=torch.long), wide)
    grammars.constraint(spec, 0)(torch.tensor([[]], dtype=torch.long), half)
    assert torch.equal(torch.isfinite(wide), torch.isfinite(half.float()))


def test_cuda_logits_are_masked_by_torch_operations_and_cpu_logits_by_the_cpu_kernel():
    assert mask_backend(torch.device("cuda", 1)) == "torch_native"
    assert mask_backend(torch.device("cpu")) == "cpu"


def test_the_torch_native_backend_masks_exactly_what_the_cpu_kernel_masks(grammars, tokenizer):
    """The backend CUDA logits get, run here on CPU tensors: the same tokens stay possible."""
    constraint = grammars.constraint(fmt({"type": "json_schema", "json_schema": {"schema": BOUNDED}}), 0)
    constraint.matcher.fill_next_token_bitmask(constraint.bitmask)
    masked = {}
    for backend in ("cpu", "torch_native"):
        scores = torch.zeros(1, 49152)
        xgrammar.apply_token_bitmask_inplace(scores, constraint.bitmask, vocab_size=constraint.vocab_size, backend=backend)
        masked[backend] = torch.isfinite(scores[0]).nonzero().flatten().tolist()
    assert masked["cpu"] and masked["torch_native"] == masked["cpu"]


def test_a_mask_that_cannot_be_applied_fails_only_its_row(grammars):
    """Logits narrower than the grammar's bitmask make xgrammar's kernel raise: the row gets its
    own 500 and only EOS, instead of an exception that would fail its whole batch."""
    constraint = grammars.constraint(fmt({"type": "regex", "pattern": "[0-9]+"}), 0)
    scores = torch.zeros(1, 16)
    constraint(torch.tensor([[]], dtype=torch.long), scores)
    assert constraint.failure is not None and constraint.failure.status == 500
    assert "mask" in constraint.failure.message
    assert torch.isfinite(scores[0]).nonzero().flatten().tolist() == [EOS]
