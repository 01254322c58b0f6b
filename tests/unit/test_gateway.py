"""The front's pure logic: env contract, readiness rule, the app registry and a held request's bookkeeping,
TorchServe's config and ports, process groups."""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import pytest
from starlette.responses import Response, StreamingResponse

from gateway import health
from gateway.apps import AppRegistry
from gateway.contract import DTYPE_REPORTS
from gateway.held_request import HeldRequest
from gateway.metrics import FrontMetrics
from gateway.settings import FrontSettings, SettingsError, SupervisorSettings
from gateway.torchserve import TorchServeProcess, archive_config, free_ports, group_alive, pick_ports
from handler.settings import DTYPE_REPORTS as HANDLER_DTYPE_REPORTS

# --- settings ---------------------------------------------------------------


def test_defaults_follow_the_contract():
    s = FrontSettings.from_env({"APP": "smollm2"})
    assert (s.port, s.predict_route, s.health_route) == (7080, "/predictions/smollm2", "/health")
    assert (s.bind_host, s.metrics_host, s.metrics_port) == ("0.0.0.0", "127.0.0.1", 7082)
    assert s.apps == ("smollm2",)


def test_vertex_variables_win():
    env = {"APP": "m", "AIP_HTTP_PORT": "8080", "AIP_PREDICT_ROUTE": "/v1/x:predict", "AIP_HEALTH_ROUTE": "/ping"}
    s = FrontSettings.from_env(env)
    assert (s.port, s.predict_route, s.health_route, s.metrics_port) == (8080, "/v1/x:predict", "/ping", 8082)


@pytest.mark.parametrize(
    "env, word",
    [
        ({}, "APP"),
        ({"APP": "m", "AIP_HTTP_PORT": "http"}, "AIP_HTTP_PORT"),
        ({"APP": "m", "AIP_HTTP_PORT": "70000"}, "AIP_HTTP_PORT"),
        ({"APP": "m", "AIP_HEALTH_ROUTE": "health"}, "AIP_HEALTH_ROUTE"),
        ({"APP": "m", "LLM_METRICS_PORT": "7080"}, "LLM_METRICS_PORT"),
        ({"APP": "m", "AIP_HEALTH_ROUTE": "/x", "AIP_PREDICT_ROUTE": "/x"}, "both"),
        ({"APP": "m", "LLM_GATEWAY_TIMEOUT_S": "-1"}, "LLM_GATEWAY_TIMEOUT_S"),
        ({"APP": "m", "LLM_MAX_REQUEST_BYTES": "lots"}, "LLM_MAX_REQUEST_BYTES"),
    ],
)
def test_bad_env_names_the_variable(env, word):
    with pytest.raises(SettingsError, match=word):
        FrontSettings.from_env(env)


def test_metrics_and_management_stay_on_loopback_unless_asked(tmp_path):
    store = _store(tmp_path, "m.mar")
    quiet = SupervisorSettings.from_env({"APP": "m", "LLM_MODEL_STORE": str(store)})
    assert (quiet.front.metrics_host, quiet.exposed_management_port) == ("127.0.0.1", None)
    exposed = SupervisorSettings.from_env({"APP": "m", "LLM_MODEL_STORE": str(store), "LLM_EXPOSE_ADMIN": "true"})
    assert (exposed.front.metrics_host, exposed.exposed_management_port) == ("0.0.0.0", 7081)


def _store(tmp_path: Path, *names: str) -> Path:
    store = tmp_path / "model-store"
    store.mkdir()
    for name in names:
        (store / name).write_text("x")
    return store


def test_the_one_archive_in_the_store_is_served(tmp_path):
    store = _store(tmp_path, "smollm2.mar", ".gitkeep")
    s = SupervisorSettings.from_env({"APP": "smollm2", "LLM_MODEL_STORE": str(store), "HOME": str(tmp_path)})
    assert s.models == {"smollm2": "smollm2.mar"}
    assert s.ts_config == tmp_path / "config.properties"


def test_a_store_with_two_archives_needs_a_name(tmp_path):
    store = _store(tmp_path, "a.mar", "b.mar")
    with pytest.raises(SettingsError, match="LLM_MODEL_ARCHIVE"):
        SupervisorSettings.from_env({"APP": "a", "LLM_MODEL_STORE": str(store)})
    named = SupervisorSettings.from_env({"APP": "a", "LLM_MODEL_STORE": str(store), "LLM_MODEL_ARCHIVE": "b.mar"})
    assert named.models == {"a": "b.mar"}


def test_several_models_are_served_with_app_first(tmp_path):
    env = {"APP": "b", "LLM_MODEL_STORE": str(_store(tmp_path)), "LLM_MODELS": "a=a.mar, b=b"}
    s = SupervisorSettings.from_env(env)
    assert list(s.models.items()) == [("b", "b"), ("a", "a.mar")]
    assert s.front.apps == ("b", "a")
    with pytest.raises(SettingsError, match="does not serve APP"):
        SupervisorSettings.from_env({**env, "APP": "c"})
    with pytest.raises(SettingsError, match="NAME=ARCHIVE"):
        SupervisorSettings.from_env({**env, "LLM_MODELS": "b"})


def test_slim_image_without_weights_fails_at_start(tmp_path):
    env = {"APP": "m", "LLM_MODEL_STORE": str(_store(tmp_path, "llm")), "LLM_IMAGE_WEIGHTS": "none"}
    with pytest.raises(SettingsError, match="AIP_STORAGE_URI"):
        SupervisorSettings.from_env(env)
    assert SupervisorSettings.from_env({**env, "AIP_STORAGE_URI": "gs://b/m"}).models == {"m": "llm"}
    with pytest.raises(SettingsError, match="not a folder"):
        SupervisorSettings.from_env({**env, "LLM_MODEL_DIR": str(tmp_path / "missing")})
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    with pytest.raises(SettingsError, match="config.json"):
        SupervisorSettings.from_env({**env, "LLM_MODEL_DIR": str(checkpoint)})
    (checkpoint / "config.json").write_text("{}")
    assert SupervisorSettings.from_env({**env, "LLM_MODEL_DIR": str(checkpoint)}).models == {"m": "llm"}


def test_a_mounted_checkpoint_the_server_cannot_read_fails_at_start(tmp_path, monkeypatch):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "model.safetensors").write_bytes(b"")
    # Tests may run as root, who reads everything: make access() answer as uid 1000 would.
    monkeypatch.setattr("gateway.settings.os.access", lambda path, mode: not str(path).endswith(".safetensors"))
    env = {"APP": "m", "LLM_MODEL_STORE": str(_store(tmp_path, "llm")), "LLM_MODEL_DIR": str(checkpoint)}
    with pytest.raises(SettingsError, match=r"\['model.safetensors'\] not readable"):
        SupervisorSettings.from_env(env)


# --- readiness rule -----------------------------------------------------------


def _description(*statuses: str) -> bytes:
    return json.dumps([{"modelName": "m", "workers": [{"id": str(i), "status": s} for i, s in enumerate(statuses)]}]).encode()


def test_ready_only_with_a_ready_worker():
    assert health.readiness_from_description("m", 200, _description("READY")).http_status == 200
    loading = health.readiness_from_description("m", 200, _description("UNLOADING", "STARTING"))
    assert (loading.http_status, loading.status, loading.workers) == (503, "loading", ("UNLOADING", "STARTING"))
    assert health.readiness_from_description("m", 200, _description()).http_status == 503


def test_any_version_with_a_ready_worker_is_enough():
    versions = json.loads(_description("STARTING")) + json.loads(_description("READY"))
    assert health.readiness_from_description("m", 200, json.dumps(versions).encode()).ready


@pytest.mark.parametrize(
    "status, body, word", [(404, b"{}", "not-registered"), (500, b"", "unavailable"), (200, b"<html>", "unavailable")]
)
def test_anything_else_is_not_ready(status, body, word):
    state = health.readiness_from_description("m", status, body)
    assert (state.http_status, state.status) == (503, word)
    assert state.payload()["status"] == word


# --- the app registry and a held request ----------------------------------------


def _registry() -> tuple[AppRegistry, FrontMetrics]:
    metrics = FrontMetrics()
    return AppRegistry({"m": True}, metrics), metrics


def _value(metrics: FrontMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_the_healing_gauge_moves_with_the_state():
    apps, metrics = _registry()
    state = apps.get("m")
    apps.mark_healing(state, "worker 7 died")
    assert state.readiness().status == "healing" and _value(metrics, "llm_front_healing", app="m") == 1
    apps.mark_ready(state)
    assert state.readiness().ready and _value(metrics, "llm_front_healing", app="m") == 0


def test_a_held_request_is_counted_and_released_once():
    apps, metrics = _registry()
    with HeldRequest(apps, metrics, "m", time.monotonic()) as held:
        assert apps.get("m").held == {held.cut}
        assert _value(metrics, "llm_front_requests_in_flight", app="m") == 1
        held.answered(Response(status_code=499))
        held.release()
    assert not apps.get("m").held and _value(metrics, "llm_front_requests_in_flight", app="m") == 0
    assert _value(metrics, "llm_front_request_seconds_count", app="m", status="499") == 1


def test_an_error_releases_the_hold_and_a_cut_reaches_it():
    apps, metrics = _registry()
    with pytest.raises(RuntimeError), HeldRequest(apps, metrics, "m", time.monotonic()) as held:
        assert apps.cut_held(apps.get("m")) == 1 and held.cut.is_set()
        raise RuntimeError
    assert _value(metrics, "llm_front_requests_in_flight", app="m") == 0


def test_a_stream_is_counted_when_it_ends():
    apps, metrics = _registry()
    with HeldRequest(apps, metrics, "m", time.monotonic()) as held:
        held.answered(StreamingResponse(iter([b"{}"])))
    assert _value(metrics, "llm_front_requests_in_flight", app="m") == 1
    held.finished(200)
    assert _value(metrics, "llm_front_requests_in_flight", app="m") == 0
    assert _value(metrics, "llm_front_request_seconds_count", app="m", status="200") == 1


# --- TorchServe's config and ports ---------------------------------------------------


def test_ports_are_distinct_and_the_exposed_management_port_is_kept():
    assert len(set(free_ports(7))) == 7
    ports = pick_ports(management=7081)
    assert ports.management == 7081
    assert len({ports.inference, ports.metrics, ports.grpc_inference, ports.grpc_management, ports.worker}) == 5


def test_the_config_puts_every_address_on_loopback_and_overrides_the_base(tmp_path):
    base = tmp_path / "base.properties"
    base.write_text("inference_address=http://0.0.0.0:7080\nmax_request_size=1048576\n")
    process = TorchServeProcess(base, tmp_path, {"m": "m.mar"}, {}, tmp_path / "run")
    ports = pick_ports()
    text = process.config_text(ports, tmp_path / "tmp")
    last = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            last[key] = value  # java.util.Properties keeps the last value of a key
    assert last["inference_address"] == f"http://127.0.0.1:{ports.inference}"
    assert last["management_address"] == f"http://127.0.0.1:{ports.management}"
    assert last["metrics_address"] == f"http://127.0.0.1:{ports.metrics}"
    assert last["grpc_inference_address"] == last["grpc_management_address"] == "127.0.0.1"
    assert last["initial_worker_port"] == str(ports.worker)
    assert last["max_request_size"] == "1048576"
    assert last["system_metrics_cmd"] == "-m gateway.system_metrics"
    exposed = TorchServeProcess(base, tmp_path, {"m": "m.mar"}, {}, tmp_path / "run", exposed_management_port=7081)
    assert "management_address=http://0.0.0.0:7081" in exposed.config_text(pick_ports(7081), tmp_path)


def test_the_model_config_is_read_from_either_kind_of_archive(tmp_path):
    manifest = json.dumps({"model": {"configFile": "model-config.yaml"}})
    folder = tmp_path / "m"
    (folder / "MAR-INF").mkdir(parents=True)
    (folder / "MAR-INF" / "MANIFEST.json").write_text(manifest)
    (folder / "model-config.yaml").write_text("asyncCommunication: true\n")
    with zipfile.ZipFile(tmp_path / "z.mar", "w") as mar:
        mar.writestr("MAR-INF/MANIFEST.json", manifest)
        mar.writestr("model-config.yaml", "batchSize: 4\n")
    assert archive_config(tmp_path, "m") == {"asyncCommunication": True}
    assert archive_config(tmp_path, "z.mar") == {"batchSize": 4}
    assert archive_config(tmp_path, "missing.mar") == {}


def test_worker_counts_come_from_the_description():
    body = json.dumps([{"minWorkers": 2, "maxWorkers": 3, "workers": [{"pid": 7, "status": "READY"}, {"status": "X"}]}])
    assert health.worker_counts(body.encode()) == (2, 3)
    assert health.worker_counts(b"<html>") == (1, 1)
    assert health.worker_pids(health.workers_of(body.encode())) == frozenset({7})


# --- process groups -------------------------------------------------------------


def _fake_proc(tmp_path: Path, entries: dict[str, str]) -> str:
    for pid, stat in entries.items():
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "stat").write_text(stat)
    (tmp_path / "self").mkdir()
    return str(tmp_path)


def test_a_group_of_zombies_counts_as_gone(tmp_path):
    proc = _fake_proc(
        tmp_path, {"10": "10 (java) Z 1 10 10 0", "11": "11 (py (worker)) Z 10 10 10 0", "12": "12 (x) S 1 99 99 0"}
    )
    assert not group_alive(10, proc)
    assert group_alive(99, proc)


def test_the_health_payload_shows_the_dtype_report_its_worker_wrote(tmp_path):
    assert HANDLER_DTYPE_REPORTS == DTYPE_REPORTS  # the worker writes where the front reads
    report = {"chosen": "bfloat16", "source": "probe", "decode_step_ms": {"float32": 100.0, "bfloat16": 50.0}}
    (tmp_path / DTYPE_REPORTS).mkdir()
    (tmp_path / DTYPE_REPORTS / "smollm2.json").write_text(json.dumps(report))
    assert health.dtype_report(tmp_path, "smollm2") == report
    assert health.Readiness(True, "ready", "smollm2", dtype=report).payload()["dtype"] == report
    assert health.dtype_report(tmp_path, "gpt2") is None  # a pinned dtype (or a GPU) decides nothing
    (tmp_path / DTYPE_REPORTS / "gpt2.json").write_text("{half")
    assert health.dtype_report(tmp_path, "gpt2") is None
    assert "dtype" not in health.Readiness(True, "ready", "gpt2").payload()
