"""Weights in Cloud Storage: artifact_uri on the Model, AIP_STORAGE_URI in the replica,
and handler.model.storage copying the folder, against gcp-storage-emulator."""

from __future__ import annotations

import json
import os

import pytest
from google.cloud import aiplatform_v1

from handler.model.storage import download_gcs_prefix, parse_gs_uri
from tests.vertex_fixtures import (  # noqa: F401 - fixtures
    BUCKET,
    fake_container,
    gcs_emulator,
    offline_google,
    standin,
    vertex_settings,
)
from vertex import Deployment, ServingContainer, deploy_app, resolve_machine

IMAGE = "us-docker.pkg.dev/test-project/llm/torchserve-llm-slim:1.0"
CHECKPOINT = {
    "config.json": b'{"model_type": "llama"}',
    "model.safetensors": os.urandom(3 * 1024 * 1024 + 17),
    "tokenizer/tokenizer.json": b'{"version": "1.0"}',
}


@pytest.fixture
def weights_in_gcs(gcs_emulator) -> str:
    """A checkpoint under gs://BUCKET/smollm2, beside a sibling that must not be copied."""
    from google.cloud import storage

    bucket = storage.Client().bucket(BUCKET)
    for name, data in CHECKPOINT.items():
        bucket.blob(f"smollm2/{name}").upload_from_string(data)
    bucket.blob("smollm2/").upload_from_string(b"")  # a console "folder" placeholder
    bucket.blob("smollm2-old/config.json").upload_from_string(b"{}")
    return f"gs://{BUCKET}/smollm2"


def test_artifact_uri_reaches_the_replica_and_its_weights_download(vertex_settings, standin, weights_in_gcs, tmp_path):
    container = ServingContainer(image_uri=IMAGE, app="smollm2", dtype="bfloat16", artifact_uri=weights_in_gcs)
    deploy_app(container, Deployment(machine=resolve_machine("l4")), "smollm2", "smollm2")

    body = standin.calls("upload_model")[0].body
    request = aiplatform_v1.UploadModelRequest.from_json(json.dumps(body))
    assert request.model.artifact_uri == weights_in_gcs

    [endpoint] = standin.endpoints.values()
    env = standin.container_env(endpoint["deployedModels"][0]["id"])
    assert env["AIP_STORAGE_URI"] == weights_in_gcs
    assert env["APP"] == "smollm2" and env["LLM_DTYPE"] == "bfloat16"

    local = download_gcs_prefix(env["AIP_STORAGE_URI"], tmp_path / "weights")

    copied = {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()}
    assert copied == CHECKPOINT


def test_trailing_slash_and_redownload_are_fine(weights_in_gcs, tmp_path):
    first = download_gcs_prefix(weights_in_gcs + "/", tmp_path / "w")
    again = download_gcs_prefix(weights_in_gcs, tmp_path / "w")
    assert first == again
    assert sorted(p.name for p in again.rglob("*") if p.is_file()) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_empty_prefix_is_a_clear_error(gcs_emulator, tmp_path):
    with pytest.raises(FileNotFoundError, match="no objects under gs://llm-weights/missing"):
        download_gcs_prefix(f"gs://{BUCKET}/missing", tmp_path)


@pytest.mark.parametrize("uri", ["s3://bucket/x", "/models/smollm2", "gs://"])
def test_non_gcs_uris_are_refused(uri):
    with pytest.raises(ValueError):
        parse_gs_uri(uri)


def test_local_artifact_folder_is_refused_for_the_model(vertex_settings, standin):
    with pytest.raises(ValueError, match="gs:// folder"):
        ServingContainer(image_uri=IMAGE, app="smollm2", dtype="float16", artifact_uri="models/smollm2")
    assert standin.requests == []
