"""Exposure and secrets: what the shipped configuration, the Dockerfile and a live server allow.

- TorchServe's management and metrics APIs listen on loopback, locally and in the container,
  unless the deployer asks otherwise (LLM_EXPOSE_ADMIN); only the front's port is exposed.
- Registering or unregistering models through the management API is refused by a live server.
- No build argument or image env var carries a secret; HF_TOKEN reaches the build only as a
  build secret; the images run as a non-root user. Built images, when present, are inspected.

Elsewhere: Vertex refuses secret-looking env keys before any request
(tests/integration/test_vertex_upload.py::test_secret_env_is_refused_before_any_request,
tests/unit/test_vertex_config.py); the running container's uid is checked by
tests/e2e/test_container.py::test_the_server_runs_as_non_root; custom code and pickle weights
in a checkpoint folder by tests/unit/test_security_settings.py.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.settings import SupervisorSettings
from gateway.torchserve import TorchServeProcess, pick_ports
from tests.support.torchserve import ROOT, TorchServe
from vertex.container import looks_like_secret

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
ROOT_USERS = {"", "root", "0", "0:0", "root:root"}
FINAL_TARGETS = ("runtime", "slim")


def properties(path: Path) -> dict[str, str]:
    return parse_properties(path.read_text())


def parse_properties(text: str) -> dict[str, str]:
    """As java.util.Properties reads them: the last value of a key wins."""
    pairs = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            pairs[key.strip()] = value.strip()
    return pairs


def host(address: str) -> str:
    return urllib.parse.urlsplit(address).hostname or ""


# --- where the APIs listen ------------------------------------------------------------------


def test_local_config_keeps_management_and_metrics_on_loopback():
    config = properties(ROOT / "config.properties")
    assert host(config["management_address"]) in LOOPBACK
    assert host(config["metrics_address"]) in LOOPBACK
    assert host(config["inference_address"]) in LOOPBACK  # `make serve` is for this machine only


def test_local_config_keeps_model_registration_off():
    config = properties(ROOT / "config.properties")
    assert config["enable_model_api"] == "false"


def test_the_container_keeps_management_and_metrics_on_loopback(tmp_path):
    (tmp_path / "model-store").mkdir()
    (tmp_path / "model-store" / "smollm2.mar").write_bytes(b"")
    (tmp_path / "config.properties").write_text((ROOT / "config.properties").read_text())
    settings = SupervisorSettings.from_env({"APP": "smollm2", "HOME": str(tmp_path)})
    assert settings.front.metrics_host in LOOPBACK
    assert settings.exposed_management_port is None
    # The image copies the project's config.properties there: model registration stays off.
    assert settings.ts_config == tmp_path / "config.properties"
    process = TorchServeProcess(settings.ts_config, settings.model_store, settings.models, {}, tmp_path / "run")
    written = parse_properties(process.config_text(pick_ports(), tmp_path / "tmp"))
    for key in ("inference_address", "management_address", "metrics_address"):
        assert host(written[key]) in LOOPBACK, key  # TorchServe is reached through the front only
    assert written["grpc_inference_address"] in LOOPBACK and written["grpc_management_address"] in LOOPBACK
    assert written["enable_model_api"] == "false"


def test_exposing_the_admin_apis_is_an_explicit_choice(tmp_path):
    (tmp_path / "model-store").mkdir()
    (tmp_path / "model-store" / "smollm2.mar").write_bytes(b"")
    exposed = SupervisorSettings.from_env({"APP": "smollm2", "HOME": str(tmp_path), "LLM_EXPOSE_ADMIN": "true"})
    assert exposed.front.metrics_host == "0.0.0.0"
    process = TorchServeProcess(
        ROOT / "config.properties",
        exposed.model_store,
        exposed.models,
        {},
        tmp_path / "run",
        exposed_management_port=exposed.exposed_management_port,
    )
    written = parse_properties(process.config_text(pick_ports(exposed.exposed_management_port), tmp_path / "tmp"))
    assert host(written["management_address"]) == "0.0.0.0"
    assert host(written["inference_address"]) in LOOPBACK


# --- a live server --------------------------------------------------------------------------


def management(server: TorchServe, method: str, path: str) -> tuple[int, dict]:
    request = urllib.request.Request(f"{server.management}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def test_registering_a_model_through_the_api_is_refused(smollm2_server: TorchServe):
    archive = smollm2_server.workdir / "store" / "smollm2"
    for url in (str(archive), "https://example.com/evil.mar"):
        query = urllib.parse.urlencode({"url": url, "model_name": "intruder", "initial_workers": 1})
        status, body = management(smollm2_server, "POST", f"/models?{query}")
        assert status == 405, body
    status, listing = management(smollm2_server, "GET", "/models")
    assert status == 200
    assert [model["modelName"] for model in listing["models"]] == ["smollm2"]


def test_unregistering_a_model_through_the_api_is_refused(smollm2_server: TorchServe):
    status, body = management(smollm2_server, "DELETE", "/models/smollm2")
    assert status == 405, body
    assert smollm2_server.worker_ready("smollm2")


# --- the Dockerfile -------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def dockerfile_stages(path: Path) -> dict[str, Stage]:
    """Stages by name (or index), each with its instructions, continuation lines joined.

    Instructions before the first FROM (global ARGs) form the stage "(global)".
    """
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: dict[str, Stage] = {"(global)": Stage("(global)", "")}
    current = stages["(global)"]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(len(stages))
            current = stages[name] = Stage(name, words[0])
        else:
            current.instructions.append((keyword, rest.strip()))
    return stages


def chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """A stage and the stages it is built FROM, nearest first."""
    found = []
    while name in stages:
        found.append(stages[name])
        name = stages[name].base
    return found


def declared_names(keyword: str, rest: str) -> list[str]:
    if keyword == "ARG":
        return [rest.split("=", 1)[0].strip()]
    if "=" in rest.split()[0]:
        return [pair.split("=", 1)[0] for pair in re.findall(r'(\w+)=(?:"[^"]*"|\S+)', rest)]
    return [rest.split()[0]]  # ENV KEY value


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return dockerfile_stages(ROOT / "Dockerfile")


def test_no_build_arg_or_env_carries_a_secret(stages):
    names = [
        name
        for stage in stages.values()
        for keyword, rest in stage.instructions
        if keyword in ("ARG", "ENV")
        for name in declared_names(keyword, rest)
    ]
    assert {"APP", "BASE_IMAGE"} <= set(names)  # the parser sees the real declarations
    assert [name for name in names if looks_like_secret(name)] == []


def test_hf_token_reaches_the_build_only_as_a_build_secret(stages):
    uses = [
        (stage.name, keyword, rest)
        for stage in stages.values()
        for keyword, rest in stage.instructions
        if "hf_token" in rest.lower()
    ]
    assert uses, "the Dockerfile no longer mentions the Hub token: update this test"
    for stage, keyword, rest in uses:
        assert keyword == "RUN" and "--mount=type=secret" in rest, (stage, rest)
        for target in FINAL_TARGETS:
            assert stage not in {s.name for s in chain(stages, target)}, f"{target} is built on {stage}"


@pytest.mark.parametrize("target", FINAL_TARGETS)
def test_final_images_run_as_a_non_root_user(stages, target):
    users = [rest for stage in chain(stages, target) for keyword, rest in reversed(stage.instructions) if keyword == "USER"]
    assert users, f"{target} never sets USER"
    assert users[0] not in ROOT_USERS


def test_the_default_target_is_a_final_image(stages):
    assert list(stages)[-1] in FINAL_TARGETS


@pytest.mark.parametrize("target", FINAL_TARGETS)
def test_the_dockerfile_exposes_only_the_gateway_port(stages, target):
    # The base image's own EXPOSE lines (8080-8082, 7070-7071) stay in its metadata, but
    # TorchServe here listens on free ports of loopback only (see above).
    exposed = {
        port
        for stage in chain(stages, target)
        for keyword, rest in stage.instructions
        if keyword == "EXPOSE"
        for port in rest.split()
    }
    assert exposed == {"7080"}
