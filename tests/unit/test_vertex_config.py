"""Pure configuration rules of the Vertex tooling: no SDK, no server."""

from __future__ import annotations

import json

import pytest

from vertex.chat import ChatRequest, stream_text
from vertex.container import ServingContainer, looks_like_secret
from vertex.endpoints import Deployment
from vertex.errors import PredictionError, SecretInEnvError, VertexConfigError
from vertex.machines import PRESETS, preset_for_weights, resolve_machine, validate_machine, weights_size
from vertex.settings import resolve_settings


@pytest.mark.parametrize(("preset", "dtype"), [("t4", "float16"), ("l4", "bfloat16"), ("a100", "bfloat16"), ("h100", "bfloat16")])
def test_preset_dtype(preset, dtype):
    assert PRESETS[preset].dtype == dtype


@pytest.mark.parametrize(
    ("machine", "accelerator", "count"),
    [
        ("n1-standard-8", "NVIDIA_TESLA_T4", 1),
        ("n1-highmem-16", "NVIDIA_TESLA_T4", 2),
        ("g2-standard-48", "NVIDIA_L4", 4),
        ("a2-highgpu-4g", "NVIDIA_TESLA_A100", 4),
        ("a2-ultragpu-1g", "NVIDIA_A100_80GB", 1),
        ("a3-highgpu-8g", "NVIDIA_H100_80GB", 8),
        ("n1-standard-16", "NVIDIA_TESLA_V100", 8),
        ("n1-standard-8", "NVIDIA_TESLA_P4", 2),
        ("n1-highmem-8", "NVIDIA_TESLA_P100", 4),
        ("a2-megagpu-16g", "NVIDIA_TESLA_A100", 16),
        ("a3-megagpu-8g", "NVIDIA_H100_MEGA_80GB", 8),
        ("a3-ultragpu-8g", "NVIDIA_H200_141GB", 1),
        ("a4-highgpu-8g", "NVIDIA_B200", 8),
        ("a3-highgpu-8g", "NVIDIA_H100_80GB", 2),
        ("a2-ultragpu-8g", "NVIDIA_A100_80GB", 3),
        ("g2-standard-96", "NVIDIA_L4", 2),
    ],
)
def test_good_pairings(machine, accelerator, count):
    spec = validate_machine(machine, accelerator, count)
    assert (spec.machine_type, spec.accelerator_type, spec.accelerator_count) == (machine, accelerator, count)


def test_count_is_filled_from_the_machine_name():
    assert validate_machine("a3-highgpu-2g", "NVIDIA_H100_80GB").accelerator_count == 2


def test_cpu_machine_serves_float32():
    spec = validate_machine("n1-standard-8")
    assert (spec.accelerator_type, spec.dtype) == (None, "float32")


@pytest.mark.parametrize(
    ("machine", "accelerator", "count"),
    [
        ("n1-standard-8", "NVIDIA_TESLA_T4", 3),
        ("e2-standard-8", "NVIDIA_TESLA_T4", 1),
        ("g2-standard-8", "NVIDIA_L4", 2),
        ("n1-standard-8", "NVIDIA_TESLA_P4", 8),
        ("a3-highgpu-2g", "NVIDIA_H100_80GB", 4),
        ("a3-megagpu-8g", "NVIDIA_H100_80GB", 8),
        ("a3-ultragpu-8g", "NVIDIA_H100_80GB", 1),
        ("a4-highgpu-8g", "NVIDIA_H200_141GB", 8),
        ("a2-highgpu-3g", "NVIDIA_TESLA_A100", 3),
        ("a2-megagpu-16g", "NVIDIA_A100_80GB", 16),
        ("g2-standard-10", "NVIDIA_L4", 1),
    ],
)
def test_bad_pairings(machine, accelerator, count):
    with pytest.raises(VertexConfigError):
        validate_machine(machine, accelerator, count)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(VertexConfigError, match="t4, l4, a100, a100-80gb, h100, h200"):
        resolve_machine("k80")


@pytest.mark.parametrize(
    "key", ["HF_TOKEN", "hf_token", "OPENAI_API_KEY", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "GOOGLE_APPLICATION_CREDENTIALS"]
)
def test_secret_keys(key):
    assert looks_like_secret(key)


@pytest.mark.parametrize("key", ["LLM_MAX_NEW_TOKENS", "TOKENIZERS_PARALLELISM", "LLM_DTYPE", "KEY_VALUE_CACHE"])
def test_setting_keys(key):
    assert not looks_like_secret(key)


def test_secret_error_never_echoes_the_value():
    with pytest.raises(SecretInEnvError) as failure:
        ServingContainer(image_uri="img", app="smollm2", dtype="float16", extra_env={"HF_TOKEN": "hf_supersecret"})
    assert "hf_supersecret" not in str(failure.value)


def test_contract_env_cannot_be_overridden_by_extras():
    with pytest.raises(VertexConfigError, match="LLM_DTYPE"):
        ServingContainer(image_uri="img", app="smollm2", dtype="float16", extra_env={"LLM_DTYPE": "float32"})


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
    assert not resolve_settings("p", api_endpoint="europe-west4-aiplatform.googleapis.com", environ={}).is_loopback_rest


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_obey_the_pairing_table(preset):
    spec = PRESETS[preset]
    assert validate_machine(spec.machine_type, spec.accelerator_type, spec.accelerator_count) == spec


@pytest.mark.parametrize("timeout", [0, 7201])
def test_deployment_timeout_stays_within_vertex_limit(timeout):
    with pytest.raises(VertexConfigError, match="deployment-timeout"):
        ServingContainer(image_uri="img", app="smollm2", dtype="float16", deployment_timeout_s=timeout)


def test_invoke_prefix_replaces_the_predict_route():
    container = ServingContainer(image_uri="img", app="smollm2", dtype="float16", invoke_route_prefix="/*")
    assert container.predict_route is None
    assert ServingContainer(image_uri="img", app="smollm2", dtype="float16").predict_route == ("/predictions/smollm2")


@pytest.mark.parametrize("prefix", ["", "/v1/*", "*", "/predictions/*"])
def test_only_vertex_invoke_prefix_is_accepted(prefix):
    with pytest.raises(VertexConfigError, match="only /\\*"):
        ServingContainer(image_uri="img", app="smollm2", dtype="float16", invoke_route_prefix=prefix)


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([], "no messages"),
        ([{"role": "tool", "content": "x"}], "messages\\[0\\] needs a role"),
        ([{"role": "user", "content": ["x"]}], "messages\\[0\\].content must be a string"),
    ],
)
def test_chat_request_checks_messages(messages, error):
    with pytest.raises(VertexConfigError, match=error):
        ChatRequest(messages=messages, model="smollm2")


def test_chat_body_is_openai_shaped():
    request = ChatRequest(messages=[{"role": "user", "content": "Hi"}], model="smollm2", max_tokens=8, temperature=0)
    assert json.loads(request.body(stream=True)) == {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
    }
    assert "stream" not in json.loads(request.body(stream=False))


def test_stream_text_joins_deltas_until_done():
    lines = [
        b'data: {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}',
        b"",
        b'data: {"choices": [{"index": 0, "delta": {"content": "Hel"}}]}',
        b"",
        b'data: {"choices": [{"index": 0, "delta": {"content": "lo"}}]}',
        b"",
        b"data: [DONE]",
        b'data: {"choices": [{"delta": {"content": "after"}}]}',
    ]
    assert "".join(stream_text(lines)) == "Hello"


def test_stream_text_raises_an_error_event_and_a_cut_stream():
    with pytest.raises(PredictionError, match="out of memory"):
        list(stream_text([b'data: {"error": {"message": "out of memory"}}']))
    with pytest.raises(PredictionError, match="without \\[DONE\\].*Bad Request"):
        list(stream_text([b'{"error": "Bad Request"}']))


def test_the_whole_machines_gpus_are_the_default_count():
    assert validate_machine("a4-highgpu-8g", "NVIDIA_B200").accelerator_count == 8
    assert validate_machine("g2-standard-48", "NVIDIA_L4").accelerator_count == 4
    assert validate_machine("n1-standard-8", "NVIDIA_TESLA_V100").accelerator_count == 1


@pytest.mark.parametrize(
    ("accelerator", "dtype"),
    [
        ("NVIDIA_TESLA_T4", "float16"),
        ("NVIDIA_TESLA_V100", "float16"),
        ("NVIDIA_TESLA_P100", "float16"),
        ("NVIDIA_TESLA_P4", "float16"),
        ("NVIDIA_L4", "bfloat16"),
        ("NVIDIA_H200_141GB", "bfloat16"),
        ("NVIDIA_B200", "bfloat16"),
    ],
)
def test_the_dtype_follows_the_gpus_bf16_units(accelerator, dtype):
    assert (
        validate_machine(
            "n1-standard-8"
            if "TESLA" in accelerator
            else {
                "NVIDIA_L4": "g2-standard-8",
                "NVIDIA_H200_141GB": "a3-ultragpu-8g",
                "NVIDIA_B200": "a4-highgpu-8g",
            }[accelerator],
            accelerator,
            1,
        ).dtype
        == dtype
    )


@pytest.mark.parametrize(
    ("gb", "preset"),
    [
        (0.27, "t4"),  # SmolLM2-135M
        (9.6, "t4"),  # 60% of a T4's 16 GB
        (9.7, "l4"),
        (14.4, "l4"),  # 60% of 24 GB
        (16.1, "a100"),  # an 8B model in bf16
        (24.0, "a100"),
        (24.1, "a100-80gb"),
        (48.0, "a100-80gb"),
        (48.1, "h200"),
        (84.6, "h200"),
    ],
)
def test_a_deploy_with_no_machine_takes_the_cheapest_gpu_that_holds_the_weights(gb, preset):
    assert preset_for_weights(int(gb * 10**9)) == preset


def test_weights_past_the_largest_gpu_are_refused():
    with pytest.raises(VertexConfigError, match="141 GB: name a machine"):
        preset_for_weights(int(140 * 10**9))


def test_the_weights_are_sized_from_the_checkpoints_files(tmp_path):
    (tmp_path / "model-00001.safetensors").write_bytes(b"0" * 3000)
    (tmp_path / "model-00002.safetensors").write_bytes(b"0" * 1000)
    (tmp_path / "config.json").write_text("{}")
    assert weights_size(tmp_path) == 4000
    with pytest.raises(VertexConfigError, match="--weights-gb"):
        weights_size(tmp_path / "missing")


def test_vertex_deploy_with_no_machine_sizes_one_from_the_weights(tmp_path):
    from vertex.cli import _machine_from, build_parser

    parser = build_parser()
    args = parser.parse_args(["deploy", "--image", "img", "--weights-gb", "20"])
    assert _machine_from(args, required=True) == PRESETS["a100"]
    (tmp_path / "model.safetensors").write_bytes(b"0" * 1000)
    args = parser.parse_args(["deploy", "--image", "img", "--weights-dir", str(tmp_path)])
    assert _machine_from(args, required=True) == PRESETS["t4"]
    args = parser.parse_args(["upload", "--image", "img"])
    assert _machine_from(args, required=False) is None
    args = parser.parse_args(["deploy", "--image", "img", "--machine", "l4", "--weights-gb", "20"])
    assert _machine_from(args, required=True) == PRESETS["l4"]
