"""The app's config is read once and checked at start-up; env overrides live in one place."""

import os

import pytest

from handler.model.loading import cpu_budget, pick_threads
from handler.params import GenerationParams
from handler.settings import HandlerSettings, SettingsError, unknown_names


def test_empty_config_gives_the_defaults():
    settings = HandlerSettings.from_config({}, {})
    assert settings == HandlerSettings(dtype_probe_rows=1)  # the dynamic path's batchSize, 1 when unset
    assert not settings.trust_remote_code and not settings.allow_pickle_weights


def test_defaults_and_limits_are_typed():
    settings = HandlerSettings.from_config(
        {"handler": {"defaults": {"max_new_tokens": 16.0, "stop": "###"}, "limits": {"max_stop_sequences": 2}}}, {}
    )
    assert settings.defaults == GenerationParams(max_new_tokens=16, stop=("###",))
    assert settings.limits.max_stop_sequences == 2


@pytest.mark.parametrize(
    "section, message",
    [
        ({"dtyp": "float32"}, "unknown keys"),
        ({"dtype": "float8"}, "dtype"),
        ({"batching": "sometimes"}, "batching"),
        ({"defaults": {"temperature": -1}}, "handler.defaults.temperature"),
        ({"defaults": {"colour": 1}}, "colour"),
        ({"limits": {"max_stop_sequences": 0}}, "max_stop_sequences"),
        ({"max_total_tokens": 0}, "max_total_tokens"),
        ({"prompt_template": "no placeholder"}, "{prompt}"),
        ({"device_map": "balanced"}, "device_map"),
        ({"deadline_seconds": 0}, "deadline_seconds"),
        ({"torch_threads": 0}, "torch_threads"),
        ({"torch_threads": "many"}, "torch_threads"),
        ({"workers": 4}, "unknown keys"),
        ({"batch_size": 4}, "unknown keys"),
        ({"compile": "yes"}, "handler.compile must be true or false"),
        ({"compile": True, "batching": "continuous"}, "handler.compile needs handler.batching: dynamic"),
        ({"compile": True, "device_map": "auto"}, "handler.compile cannot be combined with handler.device_map"),
    ],
)
def test_a_wrong_config_stops_the_worker_with_the_key(section, message):
    with pytest.raises(SettingsError, match=message.replace("{", r"\{").replace("}", r"\}")):
        HandlerSettings.from_config({"handler": section}, {})


def test_environment_overrides_of_the_container_contract():
    settings = HandlerSettings.from_config(
        {"handler": {"dtype": "float32"}},
        {"LLM_DTYPE": "bfloat16", "LLM_MODEL_DIR": "/models/x", "AIP_STORAGE_URI": "gs://b/p"},
    )
    assert (settings.dtype, settings.model_dir_override, settings.storage_uri) == ("bfloat16", "/models/x", "gs://b/p")


def test_a_bad_dtype_from_the_environment_is_caught_too():
    with pytest.raises(SettingsError, match="dtype"):
        HandlerSettings.from_config({}, {"LLM_DTYPE": "fp4"})


def test_torch_threads_share_the_cpu_budget_between_workers(monkeypatch):
    monkeypatch.setattr("handler.model.loading.cpu_budget", lambda: 8)
    assert pick_threads(HandlerSettings.from_config({"maxWorkers": 1}, {})) == 8
    assert pick_threads(HandlerSettings.from_config({"maxWorkers": 3}, {})) == 2
    assert pick_threads(HandlerSettings.from_config({"maxWorkers": 16}, {})) == 1
    assert pick_threads(HandlerSettings.from_config({"maxWorkers": 3, "handler": {"torch_threads": 5}}, {})) == 5


def test_the_cpu_budget_is_what_this_process_may_run_on():
    assert 1 <= cpu_budget() <= len(os.sched_getaffinity(0))


def test_the_dtype_probe_decodes_as_many_rows_as_the_app_batches():
    assert HandlerSettings.from_config({"batchSize": 8}, {}).dtype_probe_rows == 8
    continuous = {"asyncCommunication": True, "batchSize": 1, "handler": {"batching": "continuous"}}
    assert HandlerSettings.from_config(continuous, {}).dtype_probe_rows == 16
    assert HandlerSettings.from_config({"handler": {"dtype_probe_rows": 3}}, {}).dtype_probe_rows == 3
    with pytest.raises(SettingsError, match="dtype_probe_rows"):
        HandlerSettings.from_config({"handler": {"dtype_probe_rows": 0}}, {})


def test_names_outside_an_allow_list_are_named_beside_the_known_ones():
    assert unknown_names(["a"], ["a", "b"], "keys in x") is None
    assert unknown_names(["d", "c", "a"], ["b", "a"], "keys in x") == "unknown keys in x: c, d; known: b, a"
