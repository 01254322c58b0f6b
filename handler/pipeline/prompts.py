"""Render instances to token ids and enforce the token limits, which need the tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from jinja2 import TemplateError

from handler.errors import RequestError, limit_error
from handler.params import GenerationParams
from handler.pipeline.shapes import Instance

if TYPE_CHECKING:
    from handler.structured.constraint import CompiledFormat


@dataclass(frozen=True)
class TokenLimits:
    """Both default to the model's context length when the app's config leaves them out."""

    max_input_tokens: int
    max_total_tokens: int


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt ready for generation; `grammar` is its response format, compiled."""

    text: str
    input_ids: tuple[int, ...]
    params: GenerationParams
    grammar: CompiledFormat | None = field(default=None, compare=False)


def render(instance: Instance, tokenizer, prompt_template: str | None) -> tuple[str, tuple[int, ...]]:
    """Chat messages go through the tokenizer's chat template; plain text through the app's template."""
    where = instance.fields.prompt
    if instance.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise RequestError(f"this model has no chat template: send a prompt instead of {where}", where)
        try:
            text = tokenizer.apply_chat_template(
                list(instance.messages),
                tokenize=False,
                add_generation_prompt=not instance.prefill,
                continue_final_message=instance.prefill,
            )
        except TemplateError as error:  # templates reject what they cannot render ("roles must alternate")
            raise RequestError(f"the chat template refused {where}: {error}", where) from error
        except ValueError as error:  # a prefill the template does not reproduce (trims it) cannot be continued
            if not instance.prefill:
                raise
            raise RequestError(f"the chat template cannot continue the last message of {where}: {error}", where) from error
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        text = instance.text or ""
        text = prompt_template.replace("{prompt}", text) if prompt_template else text
        ids = tokenizer(text)["input_ids"]
    return text, tuple(ids)


def encode(instance: Instance, tokenizer, prompt_template: str | None, limits: TokenLimits) -> Prompt:
    """The instance rendered and checked; errors name the fields as the instance's protocol does."""
    text, ids = render(instance, tokenizer, prompt_template)
    where, fields = instance.fields.prompt, instance.fields
    if not ids:
        raise RequestError(f"{where} encodes to no tokens", where)
    if len(ids) > limits.max_input_tokens:
        raise limit_error(
            f"{where} has {len(ids)} tokens, at most max_input_tokens={limits.max_input_tokens} allowed",
            where,
            limits.max_input_tokens,
            len(ids),
        )
    biased, vocabulary = instance.params.logit_bias, len(tokenizer)
    if biased and biased[-1][0] >= vocabulary:
        raise RequestError(
            f"{fields.parameter('logit_bias')} names token {biased[-1][0]}, but the vocabulary has {vocabulary} tokens "
            f"(ids 0 to {vocabulary - 1})",
            fields.parameter("logit_bias"),
        )
    total, length = len(ids) + instance.params.max_new_tokens, fields.parameter("max_new_tokens")
    if total > limits.max_total_tokens:
        raise limit_error(
            f"input tokens + {length} must be <= {limits.max_total_tokens}: "
            f"{len(ids)} input tokens + {instance.params.max_new_tokens} {length} = {total}",
            length,
            limits.max_total_tokens,
            total,
        )
    return Prompt(text=text, input_ids=ids, params=instance.params)
