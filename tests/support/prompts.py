"""Prompts for scheduler tests, built through the real pipeline (parameters, then tokens)."""

from __future__ import annotations

from handler.loading import LoadedModel
from handler.params import ParamLimits, resolve_params
from handler.prompts import Prompt, encode
from handler.requests import Instance


def make_prompt(loaded: LoadedModel, text: str, **params) -> Prompt:
    resolved = resolve_params([("parameters.", params)], ParamLimits())
    return encode(Instance(params=resolved, text=text), loaded.tokenizer, None, loaded.limits, "instances[0]")
