"""Prompts for scheduler tests, built through the real pipeline (parameters, then tokens)."""

from __future__ import annotations

from handler.model.loading import LoadedModel
from handler.params import ParamLimits, resolve_params
from handler.pipeline.prompts import Prompt, encode
from handler.pipeline.shapes import Fields, Instance


def make_prompt(loaded: LoadedModel, text: str, **params) -> Prompt:
    resolved = resolve_params([("parameters.", params)], ParamLimits())
    return encode(Instance(resolved, Fields("instances[0]"), text=text), loaded.tokenizer, None, loaded.limits)
