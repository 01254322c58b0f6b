"""A chat template that refuses a conversation must fail that request alone, with a 400.

Many Hub templates call `raise_exception("Conversation roles must alternate ...")`; that
jinja2 TemplateError used to escape the handler's per-request validation and fail the batch.
"""

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from handler.errors import RequestError
from handler.params import GenerationParams
from handler.pipeline.prompts import TokenLimits, encode
from handler.pipeline.shapes import Fields, Instance

ALTERNATING = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
)
LIMITS = TokenLimits(max_input_tokens=100, max_total_tokens=200)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.chat_template = ALTERNATING
    return tokenizer


def chat(*roles: str) -> Instance:
    return Instance(
        GenerationParams(), Fields("instances[0].messages"), messages=tuple({"role": r, "content": "hi"} for r in roles)
    )


def test_a_conversation_the_template_refuses_is_a_400_naming_the_messages(tokenizer):
    with pytest.raises(RequestError) as caught:
        encode(chat("user", "user"), tokenizer, None, LIMITS)
    assert caught.value.status == 400 and caught.value.field == "instances[0].messages"
    assert "roles must alternate" in caught.value.message


def test_a_conversation_the_template_accepts_still_renders(tokenizer):
    prompt = encode(chat("user", "assistant", "user"), tokenizer, None, LIMITS)
    assert prompt.text.startswith("user: hi\nassistant: hi\n") and prompt.input_ids


def test_logit_bias_on_a_token_outside_the_vocabulary_is_a_400(tokenizer):
    vocabulary = len(tokenizer)
    inside = Instance(GenerationParams(logit_bias=((vocabulary - 1, 1.0),)), Fields("instances[0]"), text="hi")
    assert encode(inside, tokenizer, None, LIMITS).params.logit_bias == ((vocabulary - 1, 1.0),)
    outside = Instance(GenerationParams(logit_bias=((1, 1.0), (vocabulary, 1.0))), Fields("instances[0]"), text="hi")
    with pytest.raises(RequestError) as caught:
        encode(outside, tokenizer, None, LIMITS)
    assert caught.value.field == "logit_bias" and str(vocabulary) in caught.value.message
