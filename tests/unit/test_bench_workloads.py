"""The serving benchmark's workloads: what each sends, at which levels, and how long its prompts are."""

from __future__ import annotations

import pytest

from bench.run import build_workloads, max_concurrency, parse_args
from bench.workloads import prefill, shared_prefix, uniform


def test_prefill_prompts_are_about_the_asked_length_in_smollm2_tokens(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    lengths = [len(tokenizer(r.prompt)["input_ids"]) for r in prefill(3, 1800, 4, seed=0).requests]
    assert all(1700 <= n <= 1900 for n in lengths), lengths
    [prompt] = {r.prompt.split("Question:")[0] for r in shared_prefix(2, 1400, 8, seed=0).requests}
    assert 1300 <= len(tokenizer(prompt)["input_ids"]) <= 1500


def test_prefill_prompts_are_new_from_their_first_word_in_every_run():
    workload = prefill(3, 200, 4, seed=0)
    runs = [workload.for_run(n) for n in range(3)]
    prompts = [r.prompt for run in runs for r in run.requests]
    assert len({p.split(".")[0] for p in prompts}) == len(prompts)  # no two share even a first sentence
    assert len({p[:40] for p in prompts}) == len(prompts)
    assert workload.for_run(0) == workload and workload.for_run(1) == prefill(3, 200, 4, seed=0).for_run(1)
    assert {r.new_tokens for r in runs[1].requests} == {4} and {r.arrival_s for r in runs[1].requests} == {0.0}
    assert workload.levels([1, 4, 16]) == [1]


def test_shared_prefix_keeps_one_system_prompt_and_varies_the_question():
    workload = shared_prefix(16, 300, 8, seed=0)
    prefixes = {r.prompt.split("\n\nQuestion:")[0] for r in workload.requests}
    questions = {r.prompt.split("\n\nQuestion:")[1] for r in workload.requests}
    assert len(prefixes) == 1 and len(questions) == 16
    assert workload.for_run(5) is workload  # the same prefix in every run: that is the point
    assert workload.levels([1, 4, 16]) == [1, 8]


def test_uniform_and_mixed_keep_the_runs_levels():
    workload = uniform(4, 8)
    assert workload.levels([1, 4, 16]) == [1, 4, 16] and workload.for_run(3) is workload


@pytest.mark.parametrize("bad", [(0, 10, 4, 0), (1, 0, 4, 0), (1, 10, 0, 0)])
def test_long_prompt_workloads_refuse_empty_sizes(bad):
    with pytest.raises(ValueError):
        prefill(*bad)
    with pytest.raises(ValueError):
        shared_prefix(*bad)


def test_the_default_run_has_every_workload_and_llama_server_one_slot_per_user():
    args = parse_args([])
    assert [w.name for w in build_workloads(args)] == ["uniform", "mixed", "prefill", "shared-prefix"]
    assert max_concurrency(args) == 16
    assert max_concurrency(parse_args(["--concurrency", "1,4", "--workloads", "uniform,shared-prefix"])) == 8
    with pytest.raises(SystemExit):
        build_workloads(parse_args(["--workloads", "uniform,prefil"]))
