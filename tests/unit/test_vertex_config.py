"""Pure configuration rules of the Vertex tooling: no SDK, no server."""

from __future__ import annotations

import pytest

from vertex.container import ServingContainer, looks_like_secret
from vertex.endpoints import Deployment
from vertex.errors import SecretInEnvError, VertexConfigError
from vertex.machines import PRESETS, resolve_machine, validate_machine
from vertex.settings import resolve_settings


@pytest.mark.parametrize(("preset", "dtype"),
                         [("t4", "float16"), ("l4", "bfloat16"), ("a100", "bfloat16"),
                          ("h100", "bfloat16")])
def test_preset_dtype(preset, dtype):
    assert PRESETS[preset].dtype == dtype


@pytest.mark.parametrize(("machine", "accelerator", "count"), [
    ("n1-standard-8", "NVIDIA_TESLA_T4", 1),
    ("n1-highmem-16", "NVIDIA_TESLA_T4", 2),
    ("g2-standard-48", "NVIDIA_L4", 4),
    ("a2-highgpu-4g", "NVIDIA_TESLA_A100", 4),
    ("a2-ultragpu-1g", "NVIDIA_A100_80GB", 1),
    ("a3-highgpu-8g", "NVIDIA_H100_80GB", 8),
])
def test_good_pairings(machine, accelerator, count):
    spec = validate_machine(machine, accelerator, count)
    assert (spec.machine_type, spec.accelerator_type, spec.accelerator_count) == (
        machine, accelerator, count)


def test_count_is_filled_from_the_machine_name():
    assert validate_machine("a3-highgpu-2g", "NVIDIA_H100_80GB").accelerator_count == 2


def test_cpu_machine_serves_float32():
    spec = validate_machine("n1-standard-8")
    assert (spec.accelerator_type, spec.dtype) == (None, "float32")


@pytest.mark.parametrize(("machine", "accelerator", "count"), [
    ("n1-standard-8", "NVIDIA_TESLA_T4", 3),
    ("e2-standard-8", "NVIDIA_TESLA_T4", 1),
    ("g2-standard-8", "NVIDIA_L4", 2),
])
def test_bad_pairings(machine, accelerator, count):
    with pytest.raises(VertexConfigError):
        validate_machine(machine, accelerator, count)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(VertexConfigError, match="t4, l4, a100, h100"):
        resolve_machine("v100")


@pytest.mark.parametrize("key", ["HF_TOKEN", "hf_token", "OPENAI_API_KEY", "AWS_SECRET_ACCESS_KEY",
                                 "DB_PASSWORD", "GOOGLE_APPLICATION_CREDENTIALS"])
def test_secret_keys(key):
    assert looks_like_secret(key)


@pytest.mark.parametrize("key", ["LLM_MAX_NEW_TOKENS", "TOKENIZERS_PARALLELISM", "LLM_DTYPE",
                                 "KEY_VALUE_CACHE"])
def test_setting_keys(key):
    assert not looks_like_secret(key)


def test_secret_error_never_echoes_the_value():
    with pytest.raises(SecretInEnvError) as failure:
        ServingContainer(image_uri="img", app="smollm2", dtype="float16",
                         extra_env={"HF_TOKEN": "hf_supersecret"})
    assert "hf_supersecret" not in str(failure.value)


def test_contract_env_cannot_be_overridden_by_extras():
    with pytest.raises(VertexConfigError, match="LLM_DTYPE"):
        ServingContainer(image_uri="img", app="smollm2", dtype="float16",
                         extra_env={"LLM_DTYPE": "float32"})


def test_replica_and_target_bounds():
    t4 = PRESETS["t4"]
    with pytest.raises(VertexConfigError):
        Deployment(machine=t4, min_replicas=2, max_replicas=1)
    with pytest.raises(VertexConfigError):
        Deployment(machine=t4, duty_cycle_target=150)
    with pytest.raises(VertexConfigError, match="no GPU"):
        Deployment(machine=validate_machine("n1-standard-8"), duty_cycle_target=60)


def test_settings_flags_win_over_env(monkeypatch):
    monkeypatch.setenv("GCP_PROJECT", "env-p")
    monkeypatch.setenv("GCP_REGION", "env-r")
    assert resolve_settings().project == "env-p"
    settings = resolve_settings(project="flag-p", region="flag-r")
    assert (settings.project, settings.region) == ("flag-p", "flag-r")


def test_http_endpoint_means_loopback_rest():
    assert resolve_settings("p", api_endpoint="http://127.0.0.1:1", environ={}).is_loopback_rest
    assert not resolve_settings("p", api_endpoint="europe-west4-aiplatform.googleapis.com",
                                environ={}).is_loopback_rest


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_obey_the_pairing_table(preset):
    spec = PRESETS[preset]
    assert validate_machine(spec.machine_type, spec.accelerator_type,
                            spec.accelerator_count) == spec


@pytest.mark.parametrize("timeout", [0, 7201])
def test_deployment_timeout_stays_within_vertex_limit(timeout):
    with pytest.raises(VertexConfigError, match="deployment-timeout"):
        ServingContainer(image_uri="img", app="smollm2", dtype="float16",
                         deployment_timeout_s=timeout)
