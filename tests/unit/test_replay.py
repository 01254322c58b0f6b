"""The answers to a worker crash, without TorchServe: the bounded wait while an app heals
(``AppRegistry.until_serving``), the replay decision (``HeldRequest.replay``), how a broken
answer learns its worker died, the settings that bound the wait, and the warm-up a worker
started again by a heal skips."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from gateway.apps import AppRegistry
from gateway.held_request import HeldRequest
from gateway.metrics import FrontMetrics
from gateway.settings import FrontSettings, SettingsError


def _registry() -> tuple[AppRegistry, FrontMetrics]:
    metrics = FrontMetrics()
    return AppRegistry({"m": True}, metrics), metrics


def _value(metrics: FrontMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def _never() -> asyncio.Future:
    return asyncio.get_running_loop().create_future()


# --- the bounded wait ---------------------------------------------------------------------


def test_an_app_that_serves_needs_no_wait():
    async def scenario():
        apps, _ = _registry()
        state = apps.get("m")
        apps.mark_started(state)
        return await apps.until_serving(state, 0.01, 0, _never())

    assert asyncio.run(scenario()) == "serving"


def test_a_waiter_is_let_through_when_the_heal_ends():
    async def scenario():
        apps, _ = _registry()
        state = apps.get("m")
        apps.mark_started(state)
        apps.mark_healing(state, "worker 7 died")
        waiting = asyncio.ensure_future(apps.until_serving(state, 30, 4, _never()))
        await asyncio.sleep(0.01)
        assert state.waiting == 1 and not waiting.done()
        apps.mark_ready(state)
        outcome = await waiting
        return outcome, state.waiting

    assert asyncio.run(scenario()) == ("serving", 0)


def test_past_the_count_bound_a_request_is_refused_at_once():
    async def scenario():
        apps, _ = _registry()
        state = apps.get("m")
        apps.mark_healing(state, "worker 7 died")
        first = asyncio.ensure_future(apps.until_serving(state, 30, 1, _never()))
        await asyncio.sleep(0.01)
        second = await apps.until_serving(state, 30, 1, _never())
        unbounded = asyncio.ensure_future(apps.until_serving(state, 30, None, _never()))
        await asyncio.sleep(0.01)
        apps.mark_ready(state)
        return second, await first, await unbounded

    assert asyncio.run(scenario()) == ("full", "serving", "serving")


def test_past_the_time_bound_a_request_is_refused_and_leaves_the_queue():
    async def scenario():
        apps, _ = _registry()
        state = apps.get("m")
        apps.mark_healing(state, "worker 7 died")
        outcome = await apps.until_serving(state, 0.05, 4, _never())
        return outcome, state.waiting

    assert asyncio.run(scenario()) == ("timeout", 0)


def test_a_client_that_leaves_frees_its_place():
    async def scenario():
        apps, _ = _registry()
        state = apps.get("m")
        apps.mark_healing(state, "worker 7 died")
        gone = _never()
        waiting = asyncio.ensure_future(apps.until_serving(state, 30, 1, gone))
        await asyncio.sleep(0.01)
        assert await apps.until_serving(state, 30, 1, _never()) == "full"
        gone.set_result(None)
        outcome = await waiting
        return outcome, state.waiting

    assert asyncio.run(scenario()) == ("gone", 0)


def test_a_restart_of_torchserve_blocks_until_the_apps_start_again():
    apps, _ = _registry()
    state = apps.get("m")
    apps.mark_started(state)
    assert state.serving.is_set()
    apps.mark_healing(state, "TorchServe exited with status 137")
    assert not state.serving.is_set()
    apps.mark_started(state)  # wait_started after the restart: serving before mark_ready
    assert state.serving.is_set()


# --- the replay decision ------------------------------------------------------------------


def test_a_lost_prediction_is_sent_again_once():
    apps, metrics = _registry()
    with HeldRequest(apps, metrics, "m", time.monotonic()) as held:
        first_hold = held.cut
        assert held.replay(b"{}") is True
        assert first_hold not in apps.get("m").held  # no hold while it waits for the app
        held.hold()
        assert apps.get("m").held == {held.cut} and held.cut is not first_hold
        held.finished(200)
    assert _value(metrics, "llm_front_replays_total", app="m", outcome="answered") == 1
    assert _value(metrics, "llm_front_requests_in_flight", app="m") == 0


def test_a_second_death_is_answered_and_logged_as_a_suspected_poison_request(caplog):
    apps, metrics = _registry()
    body = b'{"instances": ["a secret prompt"]}'
    with caplog.at_level(logging.ERROR, "gateway.held_request"), HeldRequest(apps, metrics, "m", time.monotonic()) as held:
        assert held.replay(body) is True
        held.hold()
        assert held.replay(body) is False
        held.finished(507)
    assert not apps.get("m").held
    assert _value(metrics, "llm_front_replays_total", app="m", outcome="lost-again") == 1
    assert _value(metrics, "llm_front_replays_total", app="m", outcome="answered") is None
    (record,) = [r for r in caplog.records if "poison" in r.getMessage()]
    assert "secret" not in record.getMessage()  # the prompt stays private


def test_a_prediction_never_replayed_counts_no_replay():
    apps, metrics = _registry()
    with HeldRequest(apps, metrics, "m", time.monotonic()) as held:
        held.finished(200)
    assert _value(metrics, "llm_front_replays_total", app="m", outcome="answered") is None


def test_a_replay_whose_client_left_is_counted_so():
    apps, metrics = _registry()
    with HeldRequest(apps, metrics, "m", time.monotonic()) as held:
        held.replay(b"{}")
        held.hold()
        held.client_left()
        held.finished(499)
    assert _value(metrics, "llm_front_replays_total", app="m", outcome="client-left") == 1
    assert _value(metrics, "llm_front_replays_total", app="m", outcome="answered") is None


# --- the settings -------------------------------------------------------------------------


def test_the_heal_wait_defaults_let_a_normal_heal_through():
    settings = FrontSettings.from_env({"APP": "m"})
    assert settings.heal_wait_s == 120 and settings.heal_wait_requests == 256


def test_the_heal_wait_is_read_from_the_env():
    settings = FrontSettings.from_env({"APP": "m", "LLM_HEAL_WAIT_S": "30", "LLM_HEAL_WAIT_REQUESTS": "8"})
    assert settings.heal_wait_s == 30 and settings.heal_wait_requests == 8


@pytest.mark.parametrize("name", ["LLM_HEAL_WAIT_S", "LLM_HEAL_WAIT_REQUESTS"])
def test_a_bad_heal_wait_names_its_variable(name):
    with pytest.raises(SettingsError, match=name):
        FrontSettings.from_env({"APP": "m", name: "-1"})


# --- a worker started again within one TorchServe skips the warm-up ------------------------


def test_the_warm_up_marker_lives_in_torchserve_s_temp_folder(tmp_path):
    from handler.service import warm_up_marker
    from handler.settings import HandlerSettings

    assert warm_up_marker(HandlerSettings.from_config({}, {}), "m") is None  # no front: every start warms up
    settings = HandlerSettings.from_config({}, {"LLM_TORCHSERVE_TMP": str(tmp_path)})
    assert warm_up_marker(settings, "m") == tmp_path / "warmed-up-m"
    compiled = HandlerSettings.from_config({"handler": {"compile": True}}, {"LLM_TORCHSERVE_TMP": str(tmp_path)})
    assert warm_up_marker(compiled, "m") is None  # a compiled model compiles in its warm-up


def test_only_the_first_worker_of_a_torchserve_warms_up(tmp_path, tiny_model_dir, monkeypatch):
    import torch

    from handler.schedulers.dynamic import DynamicScheduler
    from handler.service import Service
    from handler.settings import HandlerSettings

    warm_ups = []
    monkeypatch.setattr(DynamicScheduler, "warm_up", lambda self, rows=1, grammar=None: warm_ups.append(rows))
    settings = HandlerSettings.from_config({"handler": {"dtype": "float32"}}, {"LLM_TORCHSERVE_TMP": str(tmp_path)})
    for _ in range(2):
        Service.start(settings, tiny_model_dir, torch.device("cpu"), "tiny").stop()
    assert warm_ups == [1]
    (tmp_path / "warmed-up-tiny").unlink()  # what the front does at TorchServe's next start
    Service.start(settings, tiny_model_dir, torch.device("cpu"), "tiny").stop()
    assert warm_ups == [1, 1]


def test_a_broken_answer_learns_whether_its_worker_died():
    async def scenario():
        apps, metrics = _registry()
        state = apps.get("m")
        apps.mark_started(state)
        with HeldRequest(apps, metrics, "m", time.monotonic()) as held:
            other_fault = await held.worker_died(0.1)
            asyncio.get_running_loop().call_later(0.05, apps.mark_healing, state, "worker 7 died")
            died = await held.worker_died(5)
            held.finished(200)
        return other_fault, died

    assert asyncio.run(scenario()) == (False, True)
