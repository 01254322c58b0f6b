"""Generation parameters: merge the layers, coerce, verify, in one frozen object.

Precedence, highest first: the instance's own overrides, then the request's
`parameters`, then the app's defaults (model-config.yaml), then the defaults below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Mapping, Sequence

from handler.errors import RequestError, limit_error
from handler.response_format import ResponseFormat, parse_response_format

MAX_SEED = 2**63 - 1
# Bounds that keep a row's float32 logits finite: past them (temperature 1e-40 or 1e39,
# repetition_penalty 1e-300) the logits turn to inf/nan and the whole batch's generate fails.
MIN_SAMPLING_TEMPERATURE = 1e-5  # below it, greedy (vLLM's convention)
MAX_TEMPERATURE = 100.0
MIN_REPETITION_PENALTY = 1e-3
MAX_REPETITION_PENALTY = 1e3
# OpenAI's ranges: a penalty of 2 per occurrence, a bias of 100 (a ban or a certainty).
MAX_TOKEN_PENALTY = 2.0
MAX_LOGIT_BIAS = 100.0


@dataclass(frozen=True)
class ParamLimits:
    """Bounds on parameters that cost the server memory or time, from the app's config."""

    max_stop_sequences: int = 4
    max_stop_length: int = 64
    max_bad_words: int = 32
    max_num_beams: int = 4
    max_num_return_sequences: int = 4
    max_logit_bias: int = 300
    max_top_logprobs: int = 20
    max_response_format_bytes: int = 32_768


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    do_sample: bool | None = None
    num_beams: int = 1
    penalty_alpha: float = 0.0
    num_return_sequences: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    bad_words: tuple[str, ...] = ()
    return_full_text: bool = False
    details: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    stream: bool = False
    response_format: ResponseFormat | None = None

    @property
    def sampling(self) -> bool:
        """Temperature 0 (or under 1e-5) means greedy whatever `do_sample` says; otherwise sample unless told not to."""
        if self.temperature < MIN_SAMPLING_TEMPERATURE:
            return False
        return True if self.do_sample is None else self.do_sample

    @property
    def uses_beams(self) -> bool:
        return self.num_beams > 1


PARAMETER_NAMES: tuple[str, ...] = tuple(f.name for f in fields(GenerationParams))
DEFAULTS = GenerationParams()


def _as_int(value: Any, field: str, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{field} must be an integer, got {type(value).__name__}", field)
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise RequestError(f"{field} must be an integer, got {value!r}", field)
        value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise RequestError(f"{field} must be {bound}, got {value}", field, details={"value": value})
    return value


def _as_float(value: Any, field: str, low: float, high: float | None, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{field} must be a number, got {type(value).__name__}", field)
    value = float(value)
    too_low = value <= low if low_open else value < low
    if not math.isfinite(value) or too_low or (high is not None and value > high):
        low_text = f"> {low}" if low_open else f">= {low}"
        bound = f"{low_text} and <= {high}" if high is not None else low_text
        raise RequestError(f"{field} must be a finite number {bound}, got {value}", field)
    return value


def _as_bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise RequestError(f"{field} must be true or false, got {type(value).__name__}", field)
    return value


def require_text(value: str, field: str) -> None:
    """A lone surrogate (JSON `"\\ud800"`) decodes into a str, but tokenizers raise on it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise RequestError(f"{field} is not valid Unicode: lone surrogate at character {error.start}", field) from error


def _as_strings(value: Any, field: str, max_count: int, max_length: int) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise RequestError(f"{field} must be a string or a list of strings", field)
    if len(items) > max_count:
        raise limit_error(f"{field} has {len(items)} entries, at most {max_count} allowed", field, max_count, len(items))
    for item in items:
        if not item:
            raise RequestError(f"{field} entries must not be empty", field)
        require_text(item, field)
        if len(item) > max_length:
            raise limit_error(
                f"{field} entries must be at most {max_length} characters, got {len(item)}", field, max_length, len(item)
            )
    return tuple(items)


def _as_logit_bias(value: Any, field: str, max_count: int) -> tuple[tuple[int, float], ...]:
    """A JSON object of token id (a decimal string, as JSON keys are) to bias; the vocabulary is checked in `prompts`."""
    if not isinstance(value, Mapping):
        raise RequestError(f"{field} must be an object mapping token ids to biases", field)
    if len(value) > max_count:
        raise limit_error(f"{field} has {len(value)} entries, at most {max_count} allowed", field, max_count, len(value))
    biases: dict[int, float] = {}
    for key, bias in value.items():
        text = str(key)
        if not (text.isascii() and text.isdigit()) or len(text) > 18:
            raise RequestError(f"{field} keys must be token ids (non-negative integers), got {text[:32]!r}", field)
        biases[int(text)] = _as_float(bias, f"{field}.{text}", -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)
    if len(biases) < len(value):
        raise RequestError(f"{field} names the same token id twice (keys such as '1' and '01')", field)
    return tuple(sorted(biases.items()))


def _coerce(name: str, value: Any, field: str, limits: ParamLimits) -> Any:
    if name == "max_new_tokens":
        return _as_int(value, field, 1)
    if name == "min_new_tokens":
        return _as_int(value, field, 0)
    if name == "top_k":
        return _as_int(value, field, 0)
    if name == "num_beams":
        return _as_int(value, field, 1, limits.max_num_beams)
    if name == "num_return_sequences":
        return _as_int(value, field, 1, limits.max_num_return_sequences)
    if name == "seed":
        return None if value is None else _as_int(value, field, 0, MAX_SEED)
    if name == "temperature":
        return _as_float(value, field, 0.0, MAX_TEMPERATURE)
    if name in ("top_p", "typical_p"):
        return _as_float(value, field, 0.0, 1.0, low_open=True)
    if name == "min_p":
        return _as_float(value, field, 0.0, 1.0)
    if name == "repetition_penalty":
        return _as_float(value, field, MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY)
    if name in ("presence_penalty", "frequency_penalty"):
        return _as_float(value, field, -MAX_TOKEN_PENALTY, MAX_TOKEN_PENALTY)
    if name == "logit_bias":
        return _as_logit_bias(value, field, limits.max_logit_bias)
    if name == "top_logprobs":
        return _as_int(value, field, 0, limits.max_top_logprobs)
    if name == "penalty_alpha":
        return _as_float(value, field, 0.0, 1.0)
    if name == "do_sample":
        return None if value is None else _as_bool(value, field)
    if name in ("return_full_text", "details", "logprobs", "stream"):
        return _as_bool(value, field)
    if name == "stop":
        return _as_strings(value, field, limits.max_stop_sequences, limits.max_stop_length)
    if name == "bad_words":
        return _as_strings(value, field, limits.max_bad_words, limits.max_stop_length)
    if name == "response_format":
        return parse_response_format(value, field, limits.max_response_format_bytes)
    raise AssertionError(f"no coercion for {name}")


def resolve_params(
    layers: Sequence[tuple[str, Mapping[str, Any]]],
    limits: ParamLimits,
    base: GenerationParams | None = None,
    names: Mapping[str, str] | None = None,
) -> GenerationParams:
    """Merge parameter layers, lowest precedence first, each named by its field prefix.

    `layers` is e.g. `[("parameters.", request_params), ("instances[0].", overrides)]`;
    `base` holds the app's defaults, already verified at start-up. `names` gives a protocol's
    own name for a parameter (OpenAI's `max_tokens` for `max_new_tokens`), so errors name
    the field the client sent.
    """
    names = names or {}
    values: dict[str, Any] = {}
    for prefix, layer in layers:
        if not isinstance(layer, Mapping):
            raise RequestError(f"{prefix.rstrip('.')} must be a JSON object", prefix.rstrip("."))
        for name, value in layer.items():
            field = f"{prefix}{names.get(name, name)}"
            if name not in PARAMETER_NAMES:
                raise RequestError(
                    f"unknown parameter {field!r}; known parameters: {', '.join(PARAMETER_NAMES)}",
                    field,
                    details={"known": list(PARAMETER_NAMES)},
                )
            values[name] = _coerce(name, value, field, limits)
    params = replace(base or GenerationParams(), **values)
    verify_params(params, names)
    return params


def verify_params(params: GenerationParams, names: Mapping[str, str] | None = None) -> None:
    """Checks across parameters, each naming the parameter at fault (by the client's name for it)."""
    names = names or {}

    def name(native: str) -> str:
        return names.get(native, native)

    if params.min_new_tokens > params.max_new_tokens:
        low, high = name("min_new_tokens"), name("max_new_tokens")
        raise RequestError(f"{low} ({params.min_new_tokens}) must be <= {high} ({params.max_new_tokens})", low)
    if params.penalty_alpha > 0:
        raise RequestError(
            "penalty_alpha (contrastive search) is not served: transformers 5 moved contrastive search "
            "out of the library into Hub code, which this server does not download or run",
            "penalty_alpha",
        )
    if params.num_return_sequences > 1 and not params.sampling and params.num_return_sequences > params.num_beams:
        n = name("num_return_sequences")
        raise RequestError(f"{n} > 1 needs sampling (temperature > 0) or num_beams >= {n}", n)
    if params.top_logprobs > 0 and not params.logprobs:
        raise RequestError(f"{name('top_logprobs')} needs {name('logprobs')}: true", name("top_logprobs"))
    if params.uses_beams:
        if params.stream:
            raise RequestError("stream is not available with beam search (num_beams > 1)", "stream")
        for native in ("presence_penalty", "frequency_penalty", "logit_bias", "logprobs"):
            if getattr(params, native) != getattr(DEFAULTS, native):
                raise RequestError(f"{name(native)} is not available with beam search (num_beams > 1)", name(native))
    if params.response_format is not None:
        _verify_constrained(params, name)


def _verify_constrained(params: GenerationParams, name: Callable[[str], str]) -> None:
    """Parameters a grammar cannot share a row with: beams reorder rows under their per-row
    grammar state, and a grammar that allows only EOS, or only banned words, leaves a row nothing."""
    clashes = {
        "num_beams": params.uses_beams,
        "min_new_tokens": params.min_new_tokens > 0,
        "bad_words": bool(params.bad_words),
    }
    for native, clash in clashes.items():
        if clash:
            raise RequestError(f"{name(native)} cannot be combined with {name('response_format')}", name(native))
