"""Endpoint steps: find or create, deploy a Model onto it, tear it all down."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.contract import HEALTH_ROUTE
from vertex.errors import DeployError, VertexConfigError
from vertex.machines import MachineSpec
from vertex.models import display_name_filter
from vertex.settings import Settings

if TYPE_CHECKING:
    from google.cloud.aiplatform import Endpoint, Model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Deployment:
    """How many replicas of what, scaled on which signal, paid how."""

    machine: MachineSpec
    min_replicas: int = 1
    max_replicas: int = 1
    duty_cycle_target: int | None = None
    cpu_target: int | None = None
    service_account: str | None = None
    spot: bool = False
    request_timeout_s: float | None = None
    dedicated_endpoint: bool = False

    def __post_init__(self) -> None:
        if self.min_replicas < 1:
            raise VertexConfigError("--min-replicas must be at least 1")
        if self.max_replicas < self.min_replicas:
            raise VertexConfigError(f"--max-replicas {self.max_replicas} is below --min-replicas {self.min_replicas}")
        for flag, value in (("--duty-cycle-target", self.duty_cycle_target), ("--cpu-target", self.cpu_target)):
            if value is not None and not 1 <= value <= 100:
                raise VertexConfigError(f"{flag} is a percentage (1-100), not {value}")
        if self.duty_cycle_target is not None and self.machine.accelerator_type is None:
            raise VertexConfigError("--duty-cycle-target scales on GPU duty cycle; this machine has no GPU")


@dataclass
class Teardown:
    """What a teardown removed, for the CLI to report."""

    endpoints: list[str] = field(default_factory=list)
    undeployed: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)


def _is_resource_id(name: str) -> bool:
    return name.startswith("projects/") or name.isdigit()


def find_endpoints(name: str) -> list[Endpoint]:
    """Endpoints with this display name (or the one with this id), newest first."""
    from google.cloud import aiplatform

    if _is_resource_id(name):
        return [aiplatform.Endpoint(name)]
    return list(aiplatform.Endpoint.list(filter=display_name_filter(name), order_by="create_time desc"))


def open_endpoint(name: str, settings: Settings | None = None) -> Endpoint:
    """The newest endpoint with this name; with an ``http://`` API endpoint, its SDK session routed there too."""
    endpoints = find_endpoints(name)
    if not endpoints:
        raise VertexConfigError(f"no endpoint named {name!r}: run `make deploy` first")
    endpoint = endpoints[0]
    if settings is not None and settings.api_endpoint and settings.is_loopback_rest:
        from vertex.transport import route_to

        route_to(endpoint, settings.api_endpoint)
    return endpoint


def get_or_create_endpoint(display_name: str, dedicated: bool = False) -> Endpoint:
    """Reuse an endpoint by display name so that a redeploy keeps its URL.

    A dedicated endpoint (its own DNS name; needed for invoke and streaming) is
    fixed at creation, so an existing endpoint of the other kind is refused.
    """
    from google.cloud import aiplatform

    found = find_endpoints(display_name)
    if found:
        if found[0].dedicated_endpoint_enabled != dedicated:
            kind = "a dedicated" if found[0].dedicated_endpoint_enabled else "a shared"
            raise VertexConfigError(
                f"endpoint {display_name!r} exists as {kind} endpoint and that cannot change: "
                f"{'drop' if found[0].dedicated_endpoint_enabled else 'add'} --dedicated-endpoint, "
                "deploy to another --endpoint name, or `make undeploy` first"
            )
        log.info("reusing endpoint %s", found[0].resource_name)
        return found[0]
    log.info("creating %sendpoint %s", "dedicated " if dedicated else "", display_name)
    return aiplatform.Endpoint.create(display_name=display_name, dedicated_endpoint_enabled=dedicated, sync=True)


def deploy_model(model: Model, endpoint: Endpoint, deployment: Deployment) -> Endpoint:
    """Deploy with all traffic on the new model; turn a failed rollout into a clear error."""
    from google.api_core import exceptions

    machine = deployment.machine
    log.info("deploying %s to %s on %s", model.resource_name, endpoint.resource_name, machine.describe())
    try:
        model.deploy(
            endpoint=endpoint,
            deployed_model_display_name=model.display_name,
            traffic_percentage=100,
            machine_type=machine.machine_type,
            accelerator_type=machine.accelerator_type,
            accelerator_count=machine.accelerator_count or None,
            min_replica_count=deployment.min_replicas,
            max_replica_count=deployment.max_replicas,
            autoscaling_target_accelerator_duty_cycle=deployment.duty_cycle_target,
            autoscaling_target_cpu_utilization=deployment.cpu_target,
            service_account=deployment.service_account,
            spot=deployment.spot,
            deploy_request_timeout=deployment.request_timeout_s,
            sync=True,
        )
    except exceptions.GoogleAPICallError as err:
        spec = model.gca_resource.container_spec
        timeout = spec.deployment_timeout.total_seconds() if spec.deployment_timeout else None
        raise DeployError(
            f"deploying {model.resource_name} to {endpoint.resource_name} on "
            f"{machine.describe()} failed: {err.message or err}. Vertex waits "
            f"{f'{timeout:.0f} s' if timeout else 'its default time'} for the container "
            f"to answer 200 on {spec.health_route or HEALTH_ROUTE} (port "
            f"{spec.ports[0].container_port if spec.ports else '?'}); read the replica's "
            "logs in Cloud Logging (resource aiplatform.googleapis.com/Endpoint) for the "
            "cause: weights not reachable, out of GPU memory, or a dtype the GPU lacks. "
            "Nothing is serving; run `make undeploy` to remove the endpoint."
        ) from err
    return endpoint


def teardown(name: str, delete_models: bool = False) -> Teardown:
    """Undeploy everything from the endpoint(s) and delete them; optionally the Models.

    Idle replicas bill by the hour, so teardown takes every endpoint with that
    display name and succeeds (doing nothing) when none is left.
    """
    from google.cloud import aiplatform

    report = Teardown()
    for endpoint in find_endpoints(name):
        deployed = endpoint.list_models()
        model_names = [dm.model for dm in deployed]
        log.info("undeploying %d model(s) from %s", len(deployed), endpoint.resource_name)
        endpoint.undeploy_all(sync=True)
        report.undeployed.extend(dm.id for dm in deployed)
        endpoint.delete(sync=True)
        report.endpoints.append(endpoint.resource_name)
        if delete_models:
            for model_name in dict.fromkeys(model_names):
                log.info("deleting model %s", model_name)
                aiplatform.Model(model_name).delete(sync=True)
                report.models.append(model_name)
    if not report.endpoints:
        log.info("no endpoint named %s: nothing to tear down", name)
    return report
