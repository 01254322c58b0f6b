"""Render instances to token ids and enforce the token limits, which need the tokenizer."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jinja2 import TemplateError

from handler.errors import RequestError, limit_error
from handler.params import GenerationParams
from handler.pipeline.shapes import Instance
from handler.structured.tools import TOOL_CALLS, Tool, call_text, result_text, system_block

if TYPE_CHECKING:
    from handler.cancellation import CancelSignal
    from handler.structured.constraint import CompiledFormat


@dataclass(frozen=True)
class TokenLimits:
    """Both default to the model's context length when the app's config leaves them out."""

    max_input_tokens: int
    max_total_tokens: int


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt ready for generation; `grammar` is its response format, compiled; `cancel`
    is set once its request's client went away (`handler.cancellation`), and its rows then stop."""

    text: str
    input_ids: tuple[int, ...]
    params: GenerationParams
    grammar: CompiledFormat | None = field(default=None, compare=False)
    cancel: CancelSignal | None = field(default=None, compare=False)

    @property
    def may_call(self) -> bool:
        """Whether its grammar lets it call tools (`tool_choice` other than none): its text is then split into calls."""
        spec = self.params.response_format
        return spec is not None and spec.kind == TOOL_CALLS


def knows_tools(tokenizer) -> bool:
    """Whether the chat template renders `tools` itself (templates that do name the variable)."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def chat_input(instance: Instance, tokenizer, tool_prompt: str = "auto") -> tuple[list[dict[str, Any]], list | None]:
    """The messages and tools to hand the chat template. Tools, earlier calls and their results go to a
    template that knows tools in transformers' shapes; to one that does not, as the fallback format's
    system block and tags (`structured.tools`), so the model sees calls written as it must write them."""
    messages = list(instance.messages or ())
    spec = instance.tools
    tools = spec.tools if spec is not None and spec.active else ()
    if not tools and not any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        return messages, None
    if tool_prompt == "auto" and knows_tools(tokenizer):
        return [_template_message(m) for m in messages], [t.listing() for t in tools] or None
    return _fallback_messages(messages, tools), None


def _template_message(message: dict[str, Any]) -> dict[str, Any]:
    if message.get("tool_calls"):
        calls = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": json.loads(c.arguments)}}
            for c in message["tool_calls"]
        ]
        return {"role": "assistant", "content": message["content"], "tool_calls": calls}
    return dict(message)


def _fallback_messages(messages: list[dict[str, Any]], tools: tuple[Tool, ...]) -> list[dict[str, str]]:
    rendered: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if message["role"] == "tool":  # results of one turn's calls: one user message, as Hermes's templates do
            result = result_text(message["content"])
            if i and messages[i - 1]["role"] == "tool":
                rendered[-1] = {"role": "user", "content": rendered[-1]["content"] + "\n" + result}
            else:
                rendered.append({"role": "user", "content": result})
        elif message.get("tool_calls"):
            calls = "\n".join(call_text(c.name, c.arguments) for c in message["tool_calls"])
            content = f"{message['content']}\n{calls}" if message["content"] else calls
            rendered.append({"role": "assistant", "content": content})
        else:
            rendered.append({"role": message["role"], "content": message["content"]})
    if tools:
        block = system_block(tools)
        if rendered[0]["role"] == "system":
            rendered[0] = {"role": "system", "content": f"{rendered[0]['content']}\n\n{block}"}
        else:
            rendered.insert(0, {"role": "system", "content": block})
    return rendered


def render(instance: Instance, tokenizer, prompt_template: str | None, tool_prompt: str = "auto") -> tuple[str, tuple[int, ...]]:
    """Chat messages go through the tokenizer's chat template; plain text through the app's template."""
    where = instance.fields.prompt
    if instance.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise RequestError(f"this model has no chat template: send a prompt instead of {where}", where)
        messages, tools = chat_input(instance, tokenizer, tool_prompt)
        try:
            text = tokenizer.apply_chat_template(
                messages,
                tools=tools,
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


def encode(instance: Instance, tokenizer, prompt_template: str | None, limits: TokenLimits, tool_prompt: str = "auto") -> Prompt:
    """The instance rendered and checked; errors name the fields as the instance's protocol does."""
    text, ids = render(instance, tokenizer, prompt_template, tool_prompt)
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
