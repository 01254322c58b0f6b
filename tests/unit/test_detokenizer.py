"""Incremental detokenization gives, token by token, the text a decode of the whole sequence gives."""

import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from handler.decoding.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer

TEXTS = [
    "Plain English, with punctuation: done.",
    "Tortilla española: huevos, patatas y cebolla — ¡qué rico!",
    "日本語のテキストと中文字符混在",
    "Emoji 🍳🥚 and a family 👨‍👩‍👧 in one line",
    "  leading spaces,\ttabs\nand newlines\n\n",
]


@pytest.fixture(scope="module")
def byte_level(tiny_model_dir: Path):
    """SmolLM2's byte-level BPE: one character may take several tokens."""
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def metaspace():
    """A SentencePiece-style tokenizer, whose decode drops the leading space of whatever it starts with."""
    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "▁how": 3, "▁are": 4, "▁you": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def stepwise(tokenizer, ids: list[int]) -> tuple[str, list[str]]:
    """The final text and every intermediate one, feeding one more token at each step."""
    detokenizer = IncrementalDetokenizer(tokenizer)
    seen = [detokenizer.update(ids[:n]) for n in range(1, len(ids))]
    return detokenizer.update(ids, final=True), seen


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_text_equals_the_whole_decode(byte_level, text):
    ids = byte_level(text, add_special_tokens=False)["input_ids"]
    final, seen = stepwise(byte_level, ids)
    assert final == byte_level.decode(ids, skip_special_tokens=True)
    assert all(REPLACEMENT_CHAR not in piece for piece in seen), "half a character was released"
    assert all(final.startswith(piece) for piece in seen), "released text was later changed"


def test_random_token_sequences_decode_the_same(byte_level):
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(len(byte_level)) for _ in range(rng.randrange(1, 40))]
        final, _ = stepwise(byte_level, ids)
        assert final == byte_level.decode(ids, skip_special_tokens=True)


def test_sentencepiece_spaces_between_words_survive(metaspace):
    ids = metaspace("Hello world how are you", add_special_tokens=False)["input_ids"]
    assert "".join(metaspace.decode([i]) for i in ids) == "Helloworldhowareyou"  # why single tokens will not do
    final, seen = stepwise(metaspace, ids)
    assert final == metaspace.decode(ids) == "Hello world how are you"
    assert seen[1] == "Hello world"


def test_a_half_character_is_released_at_the_end(byte_level):
    ids = byte_level("🍳", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    detokenizer = IncrementalDetokenizer(byte_level)
    assert detokenizer.update(ids[:-1]) == ""
    assert detokenizer.update(ids[:-1], final=True) == byte_level.decode(ids[:-1])


def test_a_sequence_that_is_not_a_continuation_is_decoded_afresh(byte_level):
    first = byte_level("Hello there", add_special_tokens=False)["input_ids"]
    other = byte_level("Goodbye", add_special_tokens=False)["input_ids"]
    detokenizer = IncrementalDetokenizer(byte_level)
    detokenizer.update(first)
    assert detokenizer.update(other, final=True) == "Goodbye"
