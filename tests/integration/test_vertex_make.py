"""`make deploy predict chat undeploy` (mk/vertex.mk) driving the CLI against the stand-in."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.vertex_fixtures import fake_container, offline_google, standin  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def make(target: str, standin_url: str, *assignments: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GCP_", "VERTEX_"))}
    return subprocess.run(
        [
            "make",
            "-s",
            "--no-print-directory",
            "-f",
            "mk/vertex.mk",
            target,
            f"PY={sys.executable}",
            "GCP_PROJECT=make-project",
            "GCP_REGION=us-central1",
            f"VERTEX_API_ENDPOINT={standin_url}",
            *assignments,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def last_json(stdout: str) -> dict:
    """The CLI's result: stdout must hold nothing else (the SDK's chatter goes to stderr)."""
    return json.loads(stdout)


def test_make_deploy_predict_undeploy(offline_google, standin, fake_container):
    deployed = make("deploy", standin.url, "VERTEX_MACHINE=l4", "VERTEX_IMAGE=us-central1-docker.pkg.dev/make-project/llm/gpu:1")
    assert deployed.returncode == 0, deployed.stderr
    assert last_json(deployed.stdout)["endpoint"].startswith("projects/make-project/locations/us-central1/endpoints/")

    answered = make("predict", standin.url, "VERTEX_MAX_NEW_TOKENS=8")
    assert answered.returncode == 0, answered.stderr
    assert last_json(answered.stdout)["predictions"] == [{"generated_text": "echo: How to prepare a spanish omelette:"}]
    assert fake_container.received[-1]["parameters"] == {"max_new_tokens": 8.0}

    chatted = make("chat", standin.url, "VERTEX_MAX_NEW_TOKENS=8")
    assert chatted.returncode == 0, chatted.stderr
    assert chatted.stdout == "echo: How to prepare a spanish omelette:\n"
    assert fake_container.received[-1] == {
        "model": "smollm2",
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "How to prepare a spanish omelette:"}],
    }

    removed = make("undeploy", standin.url, "VERTEX_DELETE_MODEL=1")
    assert removed.returncode == 0, removed.stderr
    assert standin.endpoints == {} and standin.models == {}


def test_make_deploy_refuses_a_bad_pair_before_any_request(offline_google, standin):
    result = make("deploy", standin.url, "VERTEX_IMAGE=img", "VERTEX_DEPLOY_ARGS=--dtype bfloat16")
    assert result.returncode != 0
    assert "no bfloat16 support" in result.stderr
    assert standin.requests == []


def test_make_chat_streams_from_a_dedicated_endpoint(offline_google, standin, fake_container):
    deployed = make("deploy", standin.url, "VERTEX_MACHINE=l4", "VERTEX_IMAGE=img:1", "VERTEX_INVOKE=1")
    assert deployed.returncode == 0, deployed.stderr
    spec = standin.calls("upload_model")[0].body["model"]["containerSpec"]
    assert (spec["invokeRoutePrefix"], spec.get("predictRoute")) == ("/*", None)

    chatted = make("chat", standin.url, "VERTEX_STREAM=1", "VERTEX_PROMPT=Hi there")
    assert chatted.returncode == 0, chatted.stderr
    assert chatted.stdout == "echo: Hi there\n"
    assert [call.route for call in standin.requests][-1] == "invoke"
    assert fake_container.raw_received[-1][0] == "/v1/chat/completions"
