"""``python -m vertex upload|deploy|predict|chat|undeploy``: flags in, one step out.

Every configuration error is raised before the first call to Google, so a
typo exits with status 2 and a message instead of a half-built endpoint.
Results go to stdout as JSON (``chat``: the assistant's text, as it arrives);
progress goes to stderr through logging.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from gateway.contract import DEFAULT_HTTP_PORT
from handler.settings import DTYPES
from vertex.container import (
    DEFAULT_DEPLOYMENT_TIMEOUT_S,
    DEFAULT_SHARED_MEMORY_MB,
    ServingContainer,
)
from vertex.errors import DeployError, PredictionError, VertexConfigError
from vertex.machines import PRESETS, MachineSpec, preset_for_weights, resolve_machine, weights_size
from vertex.predict import DEFAULT_TIMEOUT_S
from vertex.settings import Settings, connect, resolve_settings

log = logging.getLogger("vertex")

DEFAULT_APP = "smollm2"


def _parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise VertexConfigError(f"--env takes KEY=VALUE, not {pair!r}")
        env[key] = value
    return env


def _parse_json(text: str | None, flag: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise VertexConfigError(f"{flag} is not valid JSON: {err}") from None


def _add_connection(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("where (flags override GCP_PROJECT, GCP_REGION)")
    group.add_argument("--project", help="GCP project id (env GCP_PROJECT)")
    group.add_argument("--region", help="Vertex region (env GCP_REGION, default us-central1)")
    group.add_argument(
        "--api-endpoint",
        help="regional/private API endpoint (env VERTEX_API_ENDPOINT); an http:// "
        "endpoint uses REST with anonymous credentials (local stand-ins)",
    )
    group.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_machine(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("machine (a preset, or an explicit pairing)")
    group.add_argument("--machine", choices=sorted(PRESETS), help="preset; sets LLM_DTYPE too")
    group.add_argument("--machine-type", help="e.g. g2-standard-12")
    group.add_argument("--accelerator-type", help="e.g. NVIDIA_L4")
    group.add_argument("--accelerator-count", type=int)
    group.add_argument(
        "--weights-gb", type=float, help="deploy with no machine named: size the GPU preset for this many GB of weights"
    )
    group.add_argument(
        "--weights-dir", type=Path, help="deploy with no machine named: size it from this checkpoint (default models/APP)"
    )


def _add_model(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--app", default=DEFAULT_APP, help="TorchServe model name (APP)")
    group.add_argument("--image", required=True, help="serving image URI (Artifact Registry)")
    group.add_argument("--model-name", help="Model display name (default: the app)")
    group.add_argument("--artifact-uri", help="gs:// folder with the HF checkpoint (slim image)")
    group.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra container env; secrets are refused")
    group.add_argument("--dtype", choices=DTYPES, help="override the machine's dtype")
    group.add_argument("--port", type=int, default=DEFAULT_HTTP_PORT)
    group.add_argument("--shared-memory-mb", type=int, default=DEFAULT_SHARED_MEMORY_MB)
    group.add_argument(
        "--deployment-timeout",
        type=int,
        default=DEFAULT_DEPLOYMENT_TIMEOUT_S,
        help="seconds Vertex waits for the container to become healthy",
    )
    group.add_argument(
        "--invoke-route-prefix",
        metavar="/*",
        help='"/*": every container path through .../invoke/<path> (no predict route then; dedicated endpoints only)',
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vertex", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    upload = sub.add_parser("upload", help="upload the Model (a new version if it exists)")
    _add_model(upload)
    _add_machine(upload)
    _add_connection(upload)

    deploy = sub.add_parser("deploy", help="upload, then deploy to an endpoint")
    _add_model(deploy)
    _add_machine(deploy)
    group = deploy.add_argument_group("deployment")
    group.add_argument("--endpoint", help="endpoint display name (default: the app)")
    group.add_argument("--min-replicas", type=int, default=1)
    group.add_argument("--max-replicas", type=int, default=1)
    group.add_argument("--duty-cycle-target", type=int, help="autoscale on GPU duty cycle, percent")
    group.add_argument("--cpu-target", type=int, help="autoscale on CPU use, percent")
    group.add_argument("--service-account", help="runs the replicas (Secret Manager, GCS)")
    group.add_argument("--spot", action="store_true", help="Spot VMs: cheaper, preemptible")
    group.add_argument("--deploy-request-timeout", type=float, help="seconds for the deploy API call itself")
    group.add_argument("--dedicated-endpoint", action="store_true", help="an endpoint with its own DNS name (streaming, invoke)")
    _add_connection(deploy)

    predict = sub.add_parser("predict", help="send instances to an endpoint")
    predict.add_argument("--endpoint", help="endpoint display name or id (default: the app)")
    predict.add_argument("--app", default=DEFAULT_APP)
    predict.add_argument("--instance", action="append", default=[], help="a prompt; repeatable")
    predict.add_argument("--instances-json", help="a JSON list of instances")
    predict.add_argument("--parameters", help="JSON object, e.g. '{\"max_new_tokens\": 64}'")
    predict.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S)
    _add_connection(predict)

    chat = sub.add_parser("chat", help="send an OpenAI chat request, print the answer")
    chat.add_argument("--endpoint", help="endpoint display name or id (default: the app)")
    chat.add_argument("--app", default=DEFAULT_APP, help="the app, sent as the body's model")
    chat.add_argument("--prompt", help="the user message")
    chat.add_argument("--system", help="a system message before it")
    chat.add_argument("--messages-json", help="a JSON list of {role, content} messages instead")
    chat.add_argument("--max-tokens", type=int)
    chat.add_argument("--temperature", type=float)
    chat.add_argument("--stream", action="store_true", help="print the text as it is generated (streamRawPredict, or invoke)")
    chat.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S)
    _add_connection(chat)

    undeploy = sub.add_parser("undeploy", help="undeploy everything, delete the endpoint")
    undeploy.add_argument("--endpoint", help="endpoint display name or id (default: the app)")
    undeploy.add_argument("--app", default=DEFAULT_APP)
    undeploy.add_argument("--delete-model", action="store_true", help="also delete the deployed Models (all versions)")
    _add_connection(undeploy)
    return parser


def _machine_from(args: argparse.Namespace, required: bool) -> MachineSpec | None:
    """The named machine; for a deploy that names none, the cheapest GPU preset that holds the weights."""
    if not (args.machine or args.machine_type or args.accelerator_type or args.accelerator_count):
        if not required:
            return None
        if args.weights_gb is not None:
            weight_bytes = int(args.weights_gb * 10**9)
        else:
            weight_bytes = weights_size(args.weights_dir or Path("models") / args.app)
        preset = preset_for_weights(weight_bytes)
        log.info("no machine named: %s (%s) for %.2f GB of weights", preset, PRESETS[preset].describe(), weight_bytes / 10**9)
        return PRESETS[preset]
    return resolve_machine(args.machine, args.machine_type, args.accelerator_type, args.accelerator_count)


def _container_from(args: argparse.Namespace, machine: MachineSpec | None) -> ServingContainer:
    dtype = args.dtype or (machine.dtype if machine else "auto")
    return ServingContainer(
        image_uri=args.image,
        app=args.app,
        dtype=dtype,
        port=args.port,
        artifact_uri=args.artifact_uri,
        extra_env=_parse_env(args.env),
        shared_memory_mb=args.shared_memory_mb,
        deployment_timeout_s=args.deployment_timeout,
        invoke_route_prefix=args.invoke_route_prefix,
    )


def _instances_from(args: argparse.Namespace) -> list[Any]:
    instances: list[Any] = list(args.instance)
    extra = _parse_json(args.instances_json, "--instances-json")
    if extra is not None:
        if not isinstance(extra, list):
            raise VertexConfigError("--instances-json must be a JSON list")
        instances.extend(extra)
    return instances


def _messages_from(args: argparse.Namespace) -> list[dict[str, str]]:
    if args.messages_json is not None:
        if args.prompt or args.system:
            raise VertexConfigError("pass --messages-json or --prompt/--system, not both")
        messages = _parse_json(args.messages_json, "--messages-json")
        if not isinstance(messages, list):
            raise VertexConfigError("--messages-json must be a JSON list")
        return messages
    if not args.prompt:
        raise VertexConfigError("no message: pass --prompt or --messages-json")
    system = [{"role": "system", "content": args.system}] if args.system else []
    return [*system, {"role": "user", "content": args.prompt}]


def _settings_from(args: argparse.Namespace) -> Settings:
    return resolve_settings(args.project, args.region, args.api_endpoint)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Validate everything first, then connect and run the one step asked for."""
    settings = _settings_from(args)
    if args.command == "upload":
        from vertex.models import upload_model

        container = _container_from(args, _machine_from(args, required=False))
        connect(settings)
        model = upload_model(container, args.model_name or args.app)
        return {"model": model.resource_name, "version": model.version_id}
    if args.command == "deploy":
        from vertex.deploy import deploy_app
        from vertex.endpoints import Deployment

        machine = _machine_from(args, required=True)
        assert machine is not None, "a required machine is named or picked, never None"
        container = _container_from(args, machine)
        deployment = Deployment(
            machine=machine,
            min_replicas=args.min_replicas,
            max_replicas=args.max_replicas,
            duty_cycle_target=args.duty_cycle_target,
            cpu_target=args.cpu_target,
            service_account=args.service_account,
            spot=args.spot,
            request_timeout_s=args.deploy_request_timeout,
            dedicated_endpoint=args.dedicated_endpoint,
        )
        connect(settings)
        model, endpoint = deploy_app(container, deployment, args.model_name or args.app, args.endpoint or args.app)
        return {"model": model.resource_name, "version": model.version_id, "endpoint": endpoint.resource_name}
    if args.command == "predict":
        from vertex.predict import predict

        instances = _instances_from(args)
        parameters = _parse_json(args.parameters, "--parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise VertexConfigError("--parameters must be a JSON object")
        connect(settings)
        predictions = predict(args.endpoint or args.app, instances, parameters, args.timeout, settings)
        return {"predictions": predictions}
    from vertex.endpoints import teardown

    connect(settings)
    report = teardown(args.endpoint or args.app, delete_models=args.delete_model)
    return {"endpoints": report.endpoints, "undeployed": report.undeployed, "models": report.models}


def run_chat(args: argparse.Namespace) -> None:
    """Write the assistant's text to stdout piece by piece, flushed, so a stream shows as it comes."""
    from vertex.chat import ChatRequest, chat

    settings = _settings_from(args)
    request = ChatRequest(messages=_messages_from(args), model=args.app, max_tokens=args.max_tokens, temperature=args.temperature)
    connect(settings)
    for piece in chat(args.endpoint or args.app, request, settings, args.stream, args.timeout):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    from google.api_core.exceptions import GoogleAPICallError

    try:
        if args.command == "chat":
            run_chat(args)
            return 0
        result = run(args)
    except VertexConfigError as err:
        log.error("%s", err)
        return 2
    except (DeployError, PredictionError) as err:
        log.error("%s", err)
        return 1
    except GoogleAPICallError as err:
        log.error("Vertex answered %s", err)
        return 1
    sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    return 0
