"""Capabilities by allow-list: each `GenerationParams` field is claimed by a scheduler strategy, or
refused when verified, and each claim has a test that shows its effect on that strategy.

A scheduler class names its strategies and their allow-lists in `capabilities`. A test that shows
a field's effect carries `@pytest.mark.honours(strategy, field, ...)`; the marks are read from the
test files' source with `ast` (decorators and `pytestmark`), so this file needs no model and runs
in a blink. A new field fails here until someone writes its code, lists it, and marks its tests.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import inspect
import pkgutil
from collections import defaultdict
from dataclasses import fields, replace
from pathlib import Path

import pytest

import handler.schedulers
from handler.decoding.sequence import Completion
from handler.decoding.stopping import FinishReason
from handler.errors import RequestError
from handler.params import GenerationParams, verify_params
from handler.pipeline.prompts import Prompt
from handler.schedulers.base import REFUSED, Router, assign
from handler.schedulers.continuous import ContinuousScheduler
from handler.schedulers.dynamic import DynamicScheduler

TESTS = Path(__file__).resolve().parents[1]
SCHEDULERS = (DynamicScheduler, ContinuousScheduler)  # in the Router's order of preference: see Service.start
FIELDS = frozenset(f.name for f in fields(GenerationParams))
# A value that verification refuses, for each refused field.
REFUSED_VALUES = {"penalty_alpha": 0.5}
# A value away from the default, for each field the dynamic scheduler claims and the manager does not.
DYNAMIC_ONLY_VALUES = {
    "seed": 7, "num_beams": 2, "typical_p": 0.5, "bad_words": ("no",), "logprobs": True, "top_logprobs": 2,
}  # fmt: skip

Pair = tuple[str, str]


def strategies() -> dict[str, frozenset[str]]:
    return {name: names for scheduler in SCHEDULERS for name, names in scheduler.capabilities.items()}


def claims() -> set[Pair]:
    return {(strategy, name) for strategy, names in strategies().items() for name in names}


def _mark_calls(node: ast.AST) -> list[ast.Call]:
    """The `pytest.mark.honours(...)` calls in a decorator or a `pytestmark` value."""
    values = node.elts if isinstance(node, (ast.List, ast.Tuple)) else [node]
    calls = []
    for value in values:
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and value.func.attr == "honours":
            owner = value.func.value
            if (isinstance(owner, ast.Attribute) and owner.attr == "mark") or (
                isinstance(owner, ast.Name) and owner.id == "mark"
            ):
                calls.append(value)
    return calls


def read_marks(root: Path = TESTS) -> tuple[dict[Pair, list[str]], list[str]]:
    """Each (strategy, field) a test marks, with where; and the marks this check cannot read."""
    found: dict[Pair, list[str]] = defaultdict(list)
    unreadable: list[str] = []
    for path in sorted(root.rglob("test_*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                owner, calls = node.name, [c for d in node.decorator_list for c in _mark_calls(d)]
            elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
                owner, calls = "pytestmark", _mark_calls(node.value)
            else:
                continue
            for call in calls:
                where = f"{path.relative_to(root.parent)}:{call.lineno} ({owner})"
                args = call.args
                if (
                    call.keywords
                    or len(args) < 2
                    or not all(isinstance(a, ast.Constant) and isinstance(a.value, str) for a in args)
                ):
                    unreadable.append(where)
                    continue
                strategy, *names = [a.value for a in args]
                for name in names:
                    found[(strategy, name)].append(where)
    return found, unreadable


def test_every_field_is_claimed_by_a_scheduler_or_refused():
    claimed = frozenset().union(*strategies().values())
    unclaimed = sorted(FIELDS - claimed - REFUSED)
    assert not unclaimed, (
        f"GenerationParams fields no scheduler honours: {unclaimed}. Write the code that honours each, list it "
        "in that scheduler's allow-list (`capabilities`) and mark a test that shows its effect, or refuse it "
        "in params.verify_params and add it to schedulers.base.REFUSED."
    )


def test_allow_lists_name_only_fields_and_refused_fields_are_claimed_by_none():
    for strategy, names in strategies().items():
        assert names <= FIELDS, f"{strategy} lists what GenerationParams does not have: {sorted(names - FIELDS)}"
        assert not names & REFUSED, f"{strategy} claims fields verification refuses: {sorted(names & REFUSED)}"


def test_verification_refuses_each_refused_field():
    assert set(REFUSED_VALUES) == REFUSED, "give each refused field a value here that verify_params must refuse"
    for name, value in REFUSED_VALUES.items():
        with pytest.raises(RequestError) as caught:
            verify_params(replace(GenerationParams(), **{name: value}))
        assert caught.value.field == name


def test_each_scheduler_honours_exactly_the_union_of_its_strategies():
    for scheduler in SCHEDULERS:
        assert scheduler.honours == frozenset().union(*scheduler.capabilities.values()), scheduler.__name__
    names = [name for scheduler in SCHEDULERS for name in scheduler.capabilities]
    assert len(names) == len(set(names)), f"strategy names must be unique: {names}"


def test_every_scheduler_in_the_package_is_checked_here():
    found = set()
    for module in pkgutil.iter_modules(handler.schedulers.__path__, "handler.schedulers."):
        for _, cls in inspect.getmembers(importlib.import_module(module.name), inspect.isclass):
            if cls.__module__ == module.name and hasattr(cls, "honours") and hasattr(cls, "complete"):
                found.add(cls)
    assert found <= set(SCHEDULERS), (
        f"add to SCHEDULERS, with `capabilities`: {sorted(c.__name__ for c in found - set(SCHEDULERS))}"
    )


def test_every_claim_has_a_test_that_shows_its_effect():
    marks, _ = read_marks()
    missing = sorted(claims() - set(marks))
    assert not missing, f"claimed with no test marked @pytest.mark.honours(strategy, field) that shows the effect: {missing}"


def test_no_mark_claims_what_its_scheduler_does_not():
    marks, unreadable = read_marks()
    stale = {pair: where for pair, where in marks.items() if pair not in claims()}
    assert not stale, f"marks for (strategy, field) pairs no scheduler claims: {stale}; strategies: {sorted(strategies())}"
    assert not unreadable, f"honours marks take string literals only (strategy, then fields): {unreadable}"


def test_the_mark_reader_sees_decorators_and_pytestmark(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_sample.py").write_text(
        "import pytest\n"
        "pytestmark = [pytest.mark.unit, pytest.mark.honours('continuous', 'stop')]\n"
        "@pytest.mark.honours('dynamic', 'seed', 'top_k')\n"
        "def test_one(): pass\n"
        "class TestTwo:\n"
        "    @pytest.mark.honours('dynamic-beams', NAME)\n"
        "    def test_three(self): pass\n"
    )
    marks, unreadable = read_marks(tmp_path / "tests")
    assert set(marks) == {("continuous", "stop"), ("dynamic", "seed"), ("dynamic", "top_k")}
    assert len(unreadable) == 1 and "test_three" in unreadable[0]


# The Router reads the allow-lists


class Named:
    """A stand-in scheduler with a real scheduler's allow-list, answering with its own name."""

    def __init__(self, scheduler: type):
        self.name, self.honours = scheduler.__name__, scheduler.honours

    async def complete(self, prompts, sink=None):
        return [[Completion(self.name, FinishReason.LENGTH, 1, 1)] for _ in prompts]


def routed(params: GenerationParams) -> str:
    router = Router([Named(ContinuousScheduler), Named(DynamicScheduler)])
    return asyncio.run(router.complete([Prompt("x", (1,), params)]))[0][0].text


def test_a_prompt_the_manager_can_serve_stays_with_it():
    assert routed(GenerationParams(temperature=0.7, top_k=5, stop=("x",), stream=True)) == "ContinuousScheduler"


@pytest.mark.parametrize("name", sorted(DynamicScheduler.honours - ContinuousScheduler.honours))
def test_a_parameter_the_manager_does_not_claim_goes_to_the_dynamic_scheduler(name):
    assert name in DYNAMIC_ONLY_VALUES, f"give {name} a value in DYNAMIC_ONLY_VALUES"
    assert routed(replace(GenerationParams(), **{name: DYNAMIC_ONLY_VALUES[name]})) == "DynamicScheduler"


def test_a_parameter_no_scheduler_claims_is_refused_by_name_not_dropped():
    with pytest.raises(ValueError, match="penalty_alpha"):
        routed(GenerationParams(penalty_alpha=0.5))


def test_the_dynamic_scheduler_sends_beams_and_rows_to_their_strategies():
    rows, beams = DynamicScheduler.capabilities["dynamic"], DynamicScheduler.capabilities["dynamic-beams"]
    prompts = [Prompt("x", (1,), GenerationParams(**params)) for params in ({}, {"num_beams": 2}, {"logprobs": True})]
    assert assign(prompts, [rows, beams]) == [[0, 2], [1]]
