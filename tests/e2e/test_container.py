"""The real Dockerfile, built and run as Vertex AI would run it (buildah/podman, no Docker engine).

Builds the default target for APP=smollm2 and the slim target on CI's
equivalent of the default base (.ci/container-base: Debian bookworm with
Python 3.11), then checks the container contract: the image holds Debian 12,
Python 3.11 and Java 17 and no older Python; the health route stays non-200
until the model answers, predictions come on AIP_PREDICT_ROUTE at
AIP_HTTP_PORT, streams arrive in chunks, the server runs as non-root on a
read-only root file system, `podman stop` ends it cleanly within seconds, the
container exits when TorchServe dies, and the slim image serves a mounted
checkpoint (or refuses to start without one).

Needs root and the tools of .ci/install-container-tools.sh (`make
container-tools`); without them the tests fail, saying what to run. Image tags
and container names carry a per-run suffix (container_tools.SESSION); the base
and the layers are cached under .work/containers for the next run.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import socket
import threading
import time
import tomllib

import anthropic
import jsonschema
import openai
import pytest

from gateway.torchserve import free_port
from tests.e2e.container_tools import (
    ROOT,
    SESSION,
    Container,
    Podman,
    missing_tools,
    running_as_root,
    session_name,
)
from vertex.container import looks_like_secret

APP = "smollm2"
# What `make build-dev APP=smollm2` and `make build-slim` name their images, with IMAGE set.
IMAGE = f"localhost/torchserve-llm-e2e-{SESSION}"
FULL_IMAGE = f"{IMAGE}:{APP}"
SLIM_IMAGE = f"{IMAGE}-slim:latest"
# As Kubernetes' readOnlyRootFilesystem runs it: nothing writable but TorchServe's
# temp and log folders (podman's own tmpfs on /tmp, /run and /var/tmp are off).
# U: podman mounts a tmpfs as root's 0755 (mode= is not applied here), Docker as 1777.
READ_ONLY = (
    "--read-only",
    "--read-only-tmpfs=false",
    "--tmpfs",
    "/home/model-server/tmp:U",
    "--tmpfs",
    "/home/model-server/logs:U",
)
# Vertex picks the port and routes; anything but the defaults shows they are honoured.
VERTEX_ENV = {
    "AIP_HTTP_PORT": "8080",
    "AIP_PREDICT_ROUTE": "/v1/endpoints/42/deployedModels/7:predict",
    "AIP_HEALTH_ROUTE": "/v1/endpoints/42/deployedModels/7/health",
}
OMELETTE = {"instances": ["How to prepare a spanish omelette:"], "parameters": {"temperature": 0}}
# Same prompt, fewer tokens: for checks that need an answer, not a recipe (2 shared cores).
SHORT = {**OMELETTE, "parameters": {"max_new_tokens": 8}}
SHORT_GREEDY = {"instances": ["Name a colour:"], "parameters": {"max_new_tokens": 3, "temperature": 0}}
LOAD_TIMEOUT_S = 300
# Run inside the container: for each folder argument, "FOLDER writable" or "FOLDER <why not>".
WRITE_PROBE = """
import pathlib, sys
for folder in sys.argv[1:]:
    try:
        (pathlib.Path(folder) / "probe").touch()
        print(folder, "writable")
    except OSError as error:
        print(folder, error.strerror)
"""


# Needed to build the archive only: in docker/requirements-build.txt, not in the runtime image.
BUILD_ONLY = {"torch-model-archiver", "gguf"}


def _pins(lines) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name.strip().lower())] = version.strip()
    return pins


def test_the_image_pins_every_runtime_dependency_of_the_project():
    """docker/requirements-runtime.txt follows pyproject.toml: same packages, same versions."""
    project = _pins(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    image = _pins((ROOT / "docker" / "requirements-runtime.txt").read_text().splitlines())
    build = _pins((ROOT / "docker" / "requirements-build.txt").read_text().splitlines())
    for name, version in project.items():
        pinned = build if name in BUILD_ONLY else image
        assert pinned.get(name) == version, f"{name}=={version} in pyproject.toml, {pinned.get(name)} in the image"


@pytest.fixture(scope="module")
def podman() -> Podman:
    if not running_as_root():
        pytest.fail("the container tests drive rootful buildah/podman: run them as root")
    missing = missing_tools()
    if missing:
        pytest.fail(f"missing {missing}: run `make container-tools` (.ci/install-container-tools.sh)")
    return Podman()


@pytest.fixture(scope="module")
def images(podman: Podman):
    base = podman.base_image()
    try:
        podman.make_build("build-dev", base, f"APP={APP}", f"IMAGE={IMAGE}")
        podman.make_build("build-slim", base, f"IMAGE={IMAGE}")
        yield {"base": base, "full": FULL_IMAGE, "slim": SLIM_IMAGE}
    finally:
        podman.remove_image(FULL_IMAGE)
        podman.remove_image(SLIM_IMAGE)


@pytest.mark.parametrize("kind", ["full", "slim"])
def test_the_image_is_debian_12_with_python_3_11_and_java_17(podman: Podman, images: dict[str, str], kind: str):
    """No end-of-life OS or Python inside: the base is maintained, and its Python is the venv's."""
    os_release = dict(
        line.split("=", 1) for line in podman.run_once(images[kind], "cat", "/etc/os-release").splitlines() if "=" in line
    )
    assert (os_release["ID"], os_release["VERSION_CODENAME"]) == ("debian", "bookworm"), os_release
    assert podman.run_once(images[kind], "python", "--version").startswith("Python 3.11.")
    assert podman.run_once(images[kind], "sh", "-c", "command -v python").strip() == "/opt/venv/bin/python"
    older = podman.run_once(images[kind], "sh", "-c", "ls -d /usr/bin/python3.* /usr/local/bin/python3.* 2>/dev/null || true")
    assert [path for path in older.split() if not re.search(r"python3\.11", path)] == []
    java = podman.run_once(images[kind], "sh", "-c", "java -version 2>&1")
    assert re.search(r'version "17\.', java), java


@pytest.mark.parametrize("kind", ["full", "slim"])
def test_a_built_image_carries_no_secret_and_runs_as_non_root(podman: Podman, images: dict[str, str], kind: str):
    (inspected,) = json.loads(podman.run("podman", "image", "inspect", images[kind]).stdout)
    config = inspected["Config"]
    assert config.get("User", "") not in {"", "root", "0", "0:0", "root:root"}
    env_keys = [entry.split("=", 1)[0] for entry in config.get("Env", [])]
    assert "PATH" in env_keys
    assert [key for key in env_keys if looks_like_secret(key)] == []
    history = podman.run("podman", "history", "--no-trunc", "--format", "{{.CreatedBy}}", images[kind]).stdout
    assert "USER" in history  # the history is really there
    assert "HF_TOKEN" not in history and "hf_token" not in history


def _watch_start(container: Container, route: str) -> list[tuple[float, int, int]]:
    """Poll the health route (and TorchServe's /ping beside it) from container start until 200."""
    seen = []
    started = time.monotonic()
    while time.monotonic() - started < LOAD_TIMEOUT_S:
        health = container.request("GET", route, timeout=5)[0]
        ping = container.request("GET", "/ping", timeout=5)[0]
        seen.append((round(time.monotonic() - started, 2), health, ping))
        if health == 200:
            return seen
        if not container.running():
            break
        time.sleep(0.2)
    raise AssertionError(f"never healthy; seen {seen[-5:]}; logs:\n{container.logs()}")


@pytest.fixture(scope="module")
def full(podman: Podman, images: dict[str, str]):
    # A stop grace that a loaded 2-core machine can meet; the default (8 s) fits docker's 10 s.
    container = podman.start(
        session_name("full"), images["full"], free_port(), *READ_ONLY, env={**VERTEX_ENV, "LLM_STOP_GRACE_S": "50"}
    )
    try:
        yield container, _watch_start(container, VERTEX_ENV["AIP_HEALTH_ROUTE"])
    finally:
        container.remove()


def test_health_is_not_200_before_the_model_answers(full):
    container, seen = full
    answered = [health for _, health, _ in seen if health]
    assert answered[-1] == 200
    assert answered[0] == 503, f"health was 200 at the first answer: {seen[:5]}"
    assert set(answered[:-1]) == {503}
    # The first 200 means a request can be served right now.
    status, _, body = container.request("POST", VERTEX_ENV["AIP_PREDICT_ROUTE"], SHORT, timeout=60)
    assert status == 200, body


def test_predictions_on_the_vertex_route(full):
    container, _ = full
    status, headers, body = container.request("POST", VERTEX_ENV["AIP_PREDICT_ROUTE"], OMELETTE)
    assert status == 200, body
    assert headers["content-type"] == "application/json"
    predictions = json.loads(body)["predictions"]
    assert len(predictions) == 1
    assert isinstance(predictions[0]["generated_text"], str) and predictions[0]["generated_text"].strip()


def test_torchserve_routes_and_errors_pass_through(full):
    container, _ = full
    status, _, body = container.request("POST", f"/predictions/{APP}", {"instances": ["Hi"], "parameters": {"max_new_tokens": 4}})
    assert status == 200 and "predictions" in json.loads(body)
    status, _, body = container.request("POST", VERTEX_ENV["AIP_PREDICT_ROUTE"], {"instances": "not a list"})
    assert status == 400
    assert json.loads(body)["field"] == "instances"
    assert container.request("GET", "/ping")[0] == 200


def test_a_stream_arrives_in_chunks(full):
    container, _ = full
    request = json.dumps({"instances": ["Once upon a time"], "parameters": {"max_new_tokens": 8, "stream": True}})
    with socket.create_connection(("127.0.0.1", container.port), timeout=120) as sock:
        sock.sendall(
            f"POST /predictions/{APP} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(request)}\r\nConnection: close\r\n\r\n{request}".encode()
        )
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"HTTP/1.1 200")
        headers = []
        while (line := reader.readline()) not in (b"\r\n", b""):
            headers.append(line.decode().lower())
        assert "transfer-encoding: chunked\r\n" in headers
        chunks = []
        while (size := int(reader.readline().split(b";")[0], 16)) > 0:
            chunks.append(reader.read(size))
            reader.readline()
    assert len(chunks) > 1
    assert "predictions" in chunks[-1].decode()


def test_the_openai_sdk_talks_to_the_container(full):
    container, _ = full
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{container.port}/v1", api_key="unused", max_retries=0, timeout=300)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model=APP, messages=question, max_tokens=16, temperature=0)
    assert reply.object == "chat.completion" and reply.model == APP
    assert "Paris" in reply.choices[0].message.content
    chunks = list(client.chat.completions.create(model=APP, messages=question, max_tokens=16, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert [model.id for model in client.models.list()] == [APP]
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=APP, messages=question, max_tokens=-1)


def test_the_responses_and_messages_routes_and_a_tool_call_in_the_container(full):
    """One call on each route the agents' clients use: /v1/responses, /v1/messages, its count_tokens, and a
    forced tool call whose input validates (the grammar compiles in the image's own child process)."""
    container, _ = full
    base = f"http://127.0.0.1:{container.port}"
    question = [{"role": "user", "content": "What is the capital of France?"}]
    responses = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)
    response = responses.responses.create(model=APP, input=question[0]["content"], max_output_tokens=16, temperature=0)
    assert response.status in ("completed", "incomplete") and response.output_text.strip()
    client = anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0, timeout=300)
    message = client.messages.create(model=APP, max_tokens=16, messages=question, extra_body={"temperature": 0})
    assert message.content[0].type == "text" and message.content[0].text.strip()
    counted = client.messages.count_tokens(model=APP, messages=question)
    assert counted.input_tokens == message.usage.input_tokens
    weather = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}}, "required": ["city"]}
    tools = [{"name": "get_weather", "description": "The weather in a city", "input_schema": weather}]
    called = client.messages.create(
        model=APP,
        max_tokens=40,  # compact arguments: a forced call to this tool fits (docs/tools.md)
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=tools,
        tool_choice={"type": "tool", "name": "get_weather"},
        extra_body={"temperature": 0},
    )
    [use] = called.content
    assert use.type == "tool_use" and use.name == "get_weather" and called.stop_reason == "tool_use"
    jsonschema.validate(use.input, weather)


# Inside the image, with no ps or ss: the worker's pid, and the listening TCP sockets.
WORKER_PIDS = """
import os
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        command = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")
    except OSError:
        continue
    if any(part.endswith(b"model_service_worker.py") for part in command):
        print(pid)
"""
LISTENING = """
import ipaddress
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    for line in open(table).read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A":
            address, port = local.split(":")
            raw = bytes.fromhex(address)
            host = ipaddress.ip_address(raw[::-1] if len(raw) == 4 else b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
            print(host, int(port, 16))
"""
HANG_GUARD_S = 300


def loopback(host: str) -> bool:
    """127.0.0.0/8 and ::1, also written as IPv4-mapped IPv6 (Java binds ::ffff:127.0.0.1)."""
    address = ipaddress.ip_address(host)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def test_only_the_front_listens_beyond_loopback(full):
    container, _ = full
    sockets = [line.split() for line in container.exec("python", "-c", LISTENING).stdout.splitlines()]
    exposed = {(host, int(port)) for host, port in sockets if not loopback(host)}
    assert exposed and {port for _, port in exposed} == {int(VERTEX_ENV["AIP_HTTP_PORT"])}, sockets


def test_a_killed_worker_is_not_seen_by_the_client_in_the_container(full, record_property):
    """The shipped continuous path: what the dead worker held is sent again once the app serves
    (200), a request sent while it heals waits in the front (200, no 503), and a new worker serves."""
    container, _ = full
    route = VERTEX_ENV["AIP_PREDICT_ROUTE"]
    held: list = []
    long = {"instances": ["Count to a thousand:"], "parameters": {"max_new_tokens": 400, "min_new_tokens": 400}}
    caller = threading.Thread(target=lambda: held.append(container.request("POST", route, long, timeout=HANG_GUARD_S)))
    caller.start()
    # Sent after the long one and answered: so the long one is in the worker too (the manager takes every request).
    assert container.request("POST", route, SHORT_GREEDY, timeout=HANG_GUARD_S)[0] == 200
    [worker] = container.exec("python", "-c", WORKER_PIDS).stdout.split()
    container.exec("python", "-c", f"import os, signal; os.kill({worker}, signal.SIGKILL)")
    killed = time.monotonic()
    status, _, body = container.request("POST", route, SHORT_GREEDY, timeout=HANG_GUARD_S)
    assert status == 200, (status, body)
    record_property("seconds_to_first_answer", round(time.monotonic() - killed, 1))
    caller.join(HANG_GUARD_S)
    assert not caller.is_alive(), "the request the dead worker held never got an answer"
    [(status, _, body)] = held
    assert status == 200 and json.loads(body)["predictions"][0]["generated_text"], (status, body)
    new_workers = container.exec("python", "-c", WORKER_PIDS).stdout.split()
    assert new_workers and worker not in new_workers


def test_the_server_runs_as_non_root(full):
    container, _ = full
    assert container.exec("id", "-u").stdout.strip() == "1000"


def test_the_server_serves_from_a_read_only_root(full, podman: Podman):
    """It has served every request above on a read-only root; only the two tmpfs take writes."""
    container, _ = full
    inspected = json.loads(podman.run("podman", "inspect", container.name).stdout)[0]
    assert inspected["HostConfig"]["ReadonlyRootfs"] is True
    folders = [
        "/home/model-server",
        "/home/model-server/model-store",
        "/opt/venv",
        "/tmp",
        "/home/model-server/tmp",
        "/home/model-server/logs",
    ]
    output = container.exec("python", "-c", WRITE_PROBE, *folders).stdout
    result = dict(line.split(" ", 1) for line in output.splitlines())
    assert result == {
        **{folder: "Read-only file system" for folder in folders[:4]},
        "/home/model-server/tmp": "writable",
        "/home/model-server/logs": "writable",
    }
    # TorchServe really uses them: its logs and the unpacked archive are there.
    assert "ts_log.log" in container.exec("ls", "/home/model-server/logs").stdout
    assert container.exec("ls", "/home/model-server/tmp/torchserve/tmp/models").stdout.strip()


def test_stop_is_clean(full, podman: Podman):
    container, _ = full
    podman.run("podman", "stop", "-t", "60", container.name, timeout=90)
    # 0, not 137: TorchServe and the gateway ended on SIGTERM, podman never had to kill them.
    assert container.exit_code() == 0, container.logs()


@pytest.fixture(scope="module")
def readable_checkpoint(smollm2_dir, tmp_path_factory):
    """SmolLM2 as a user would mount it: readable by the container's uid 1000.

    `save_pretrained` leaves model.safetensors at mode 0600, owned by whoever
    prepared it (root here), which the server cannot read.
    """
    folder = tmp_path_factory.mktemp("checkpoint") / APP
    shutil.copytree(smollm2_dir, folder)
    for path in [folder, *folder.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return folder


def test_slim_image_serves_a_mounted_checkpoint_and_restarts_a_dead_torchserve(podman, images, readable_checkpoint):
    container = podman.start(
        session_name("slim"),
        images["slim"],
        free_port(),
        *READ_ONLY,
        "-v",
        f"{readable_checkpoint}:/models/{APP}:ro",
        env={**VERTEX_ENV, "APP": APP, "LLM_MODEL_DIR": f"/models/{APP}"},
    )
    try:
        seen = _watch_start(container, VERTEX_ENV["AIP_HEALTH_ROUTE"])
        assert [h for _, h, _ in seen if h][0] == 503
        status, _, body = container.request("POST", VERTEX_ENV["AIP_PREDICT_ROUTE"], SHORT)
        assert status == 200, body
        assert json.loads(body)["predictions"][0]["generated_text"].strip()
        # TorchServe's frontend dies: the front starts TorchServe again (fresh loopback ports).
        container.exec(
            "python",
            "-c",
            "import os, signal\n"
            "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
            "    cmd = open(f'/proc/{pid}/cmdline', 'rb').read().split(b'\\0')[0]\n"
            "    if cmd.endswith(b'java'): os.kill(int(pid), signal.SIGKILL)\n",
        )
        noticed = time.monotonic() + 60
        while container.request("GET", VERTEX_ENV["AIP_HEALTH_ROUTE"], timeout=5)[0] == 200:
            assert time.monotonic() < noticed, "the front never noticed TorchServe died"
            time.sleep(0.1)
        _watch_start(container, VERTEX_ENV["AIP_HEALTH_ROUTE"])
        assert container.running()
        status, _, body = container.request("POST", VERTEX_ENV["AIP_PREDICT_ROUTE"], SHORT)
        assert status == 200, body
    finally:
        container.remove()


def test_slim_image_refuses_to_start_without_usable_weights(podman, images, smollm2_dir):
    """No weight source at all, or a mounted folder uid 1000 cannot read: exit 2 at once, saying why."""
    cases = [
        ({}, (), "AIP_STORAGE_URI"),
        ({"LLM_MODEL_DIR": "/models/m"}, ("-v", f"{smollm2_dir}:/models/m:ro"), "not readable"),
    ]
    if all(os.stat(p).st_mode & 0o004 for p in smollm2_dir.iterdir()):
        cases.pop()  # the prepared checkpoint is world-readable here: nothing to refuse
    for env, options, reason in cases:
        container = podman.start(
            session_name("noweights"), images["slim"], free_port(), *READ_ONLY, *options, env={**VERTEX_ENV, **env}
        )
        try:
            assert container.wait_exit(30)
            logs = container.logs()
            assert container.exit_code() == 2, logs
            assert reason in logs
        finally:
            container.remove()
