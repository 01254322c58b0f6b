"""A local stand-in for the Vertex AI REST API, and a fake serving container.

No emulator of Vertex's Model/Endpoint/Prediction services exists, so the
tests run the real google-cloud-aiplatform SDK (REST transport) against this
server. It records every request so tests can parse bodies back into the SDK's
own request types, and it does what Vertex does with the container: on
``:deployModel`` it polls the container's health route, on ``:predict`` it
forwards the body to the container's predict route on its port.

The routes that carry any body (OpenAI's included) are here too: ``:rawPredict``,
``:streamRawPredict`` and the OpenAI-compatible ``/chat/completions`` send the
body unchanged, with the client's Content-Type, to the predict route and relay
the container's status and body (streams chunk by chunk, as they arrive);
``/invoke/<path>`` sends it to ``<path>`` on a Model uploaded with
``invokeRoutePrefix: "/*"``. The SDK calls those through its own HTTPS session
(``Endpoint.authorized_session``) on fixed hosts, so a test routes them here
with ``vertex.transport.route_to`` and the original host travels in ``Host``:
as on Vertex, a dedicated endpoint answers only on its own DNS name, and
invoke and streamRawPredict only on a dedicated endpoint.

Every long-running operation is answered already finished, so the SDK never
polls (see shared/docs/vertex-offline.md).
"""

from __future__ import annotations

import http.client
import itertools
import json
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator, Mapping
from urllib.parse import parse_qs, unquote, urlsplit

V1 = "type.googleapis.com/google.cloud.aiplatform.v1."
# The message real Vertex gives when the container never answers its health route.
NEVER_READY = "Model server never became ready. Please validate that your model file or container configuration are valid."

# What real Vertex answers when a dedicated endpoint is called through the shared API host.
SHARED_HOST_REFUSED = (
    "This endpoint is a dedicated endpoint and cannot be accessed through the "
    "shared Vertex AI API host. Please access the endpoint using its dedicated DNS name {dns}."
)
PROJECT_NUMBER = "123456789012"
# Response headers Vertex adds to a raw prediction (the SDK's _RAW_PREDICT_*_KEY).
DEPLOYED_MODEL_HEADER = "X-Vertex-AI-Deployed-Model-Id"
MODEL_HEADER = "X-Vertex-AI-Model"
MODEL_VERSION_HEADER = "X-Vertex-AI-Model-Version-Id"
# Request headers that describe the client's connection to Vertex, not the body.
_NOT_FORWARDED = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "authorization", "accept-encoding", "keep-alive"}
)

_PARENT = r"projects/[^/]+/locations/[^/]+"
_ENDPOINT = rf"{_PARENT}/endpoints/[^/:]+"
_ROUTES: tuple[tuple[str, re.Pattern[str], str], ...] = tuple(
    (method, re.compile(pattern), name)
    for method, pattern, name in (
        ("POST", rf"^/v1/({_PARENT})/models:upload$", "upload_model"),
        ("GET", rf"^/v1/({_PARENT})/models$", "list_models"),
        ("GET", rf"^/v1/({_PARENT}/models/[^/@:]+)(?:@([^/:]+))?$", "get_model"),
        ("DELETE", rf"^/v1/({_PARENT}/models/[^/@:]+)$", "delete_model"),
        ("POST", rf"^/v1/({_PARENT})/endpoints$", "create_endpoint"),
        ("GET", rf"^/v1/({_PARENT})/endpoints$", "list_endpoints"),
        ("GET", rf"^/v1/({_PARENT}/endpoints/[^/:]+)$", "get_endpoint"),
        ("DELETE", rf"^/v1/({_PARENT}/endpoints/[^/:]+)$", "delete_endpoint"),
        ("POST", rf"^/v1/({_PARENT}/endpoints/[^/:]+):deployModel$", "deploy_model"),
        ("POST", rf"^/v1/({_PARENT}/endpoints/[^/:]+):undeployModel$", "undeploy_model"),
        ("POST", rf"^/v1/({_PARENT}/endpoints/[^/:]+):predict$", "predict"),
        ("POST", rf"^/v1/({_ENDPOINT}):rawPredict$", "raw_predict"),
        ("POST", rf"^/v1/({_ENDPOINT}):streamRawPredict$", "stream_raw_predict"),
        ("POST", rf"^/v1(?:beta1)?/({_ENDPOINT})/chat/completions$", "chat_completions"),
        ("POST", rf"^/v1/({_ENDPOINT})(?:/deployedModels/([^/:]+))?/invoke(/.+)$", "invoke"),
        ("GET", rf"^/v1/({_ENDPOINT})(?:/deployedModels/([^/:]+))?/invoke(/.+)$", "invoke"),
        ("GET", r"^/ui/(.+/operations/\d+)$", "get_operation"),
    )
)


class ApiError(Exception):
    """An HTTP error in Google's JSON error shape."""

    STATUS = {
        400: "INVALID_ARGUMENT",
        404: "NOT_FOUND",
        409: "ALREADY_EXISTS",
        412: "FAILED_PRECONDITION",
        422: "FAILED_PRECONDITION",
        500: "INTERNAL",
        503: "UNAVAILABLE",
    }

    def __init__(self, http_status: int, message: str) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.message = message

    def body(self) -> dict[str, Any]:
        return {
            "error": {"code": self.http_status, "message": self.message, "status": self.STATUS.get(self.http_status, "UNKNOWN")}
        }


@dataclass
class Recorded:
    """One request the SDK sent: what a test asserts on.

    ``body`` is the parsed JSON (``None`` for an empty or non-JSON body),
    ``raw`` the bytes as sent, ``host`` the host the client addressed.
    """

    method: str
    path: str
    query: dict[str, list[str]]
    body: dict[str, Any] | None
    route: str
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes = b""

    @property
    def host(self) -> str:
        return self.headers.get("host", "")


@dataclass
class Reply:
    """One answer: JSON for the API's own routes, or a relayed container response.

    ``chunks`` set means the body is sent as it is produced (chunked), one HTTP
    chunk per piece the container sent.
    """

    status: int
    payload: dict[str, Any] | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    chunks: Iterator[bytes] | None = None


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _display_name_from(filter_text: str) -> str | None:
    match = re.search(r'display_name\s*=\s*"?([^"]*)"?', filter_text or "")
    return match.group(1) if match else None


@dataclass
class StandIn:
    """State and behaviour of the fake Vertex API.

    ``container_url`` says where the "replica" of any deployed Model listens
    (Vertex would start the image; here it is already running). ``None`` means
    ``http://127.0.0.1:<first container port>``, as the Model declares it.
    """

    container_url: str | None = None
    health_timeout_s: float = 5.0
    requests: list[Recorded] = field(default_factory=list)
    models: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    operations: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._ids = itertools.count(1000)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> StandIn:
        handler = type("Handler", (_Handler,), {"standin": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- helpers for tests -------------------------------------------------
    def calls(self, route: str) -> list[Recorded]:
        return [r for r in self.requests if r.route == route]

    def container_env(self, deployed_model_id: str) -> dict[str, str]:
        """The env Vertex starts a replica with: the Model's env plus the AIP_* contract."""
        endpoint, deployed = self._find_deployed(deployed_model_id)
        model = self._model_version(deployed["model"], deployed.get("modelVersionId"))
        spec = model["containerSpec"]
        env = {item["name"]: item.get("value", "") for item in spec.get("env", [])}
        env.update(
            {
                "AIP_HTTP_PORT": str(self._port_of(spec)),
                "AIP_PREDICT_ROUTE": spec.get("predictRoute", ""),
                "AIP_HEALTH_ROUTE": spec.get("healthRoute", ""),
                "AIP_DEPLOYED_MODEL_ID": deployed_model_id,
                "AIP_ENDPOINT_ID": endpoint["name"].rsplit("/", 1)[1],
            }
        )
        if model.get("artifactUri"):
            env["AIP_STORAGE_URI"] = model["artifactUri"]
        return env

    # -- resources ---------------------------------------------------------
    def _next_id(self) -> str:
        return str(next(self._ids))

    def _operation(
        self, parent: str, kind: str, response: dict[str, Any] | None = None, error: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        name = f"{parent}/operations/{self._next_id()}"
        op: dict[str, Any] = {
            "name": name,
            "done": True,
            "metadata": {
                "@type": f"{V1}{kind}OperationMetadata",
                "genericMetadata": {"createTime": _now(), "updateTime": _now()},
            },
        }
        if error is not None:
            op["error"] = error
        else:
            op["response"] = response or {"@type": "type.googleapis.com/google.protobuf.Empty"}
        self.operations[name] = op
        return op

    def _model_version(self, name: str, version: str | None = None) -> dict[str, Any]:
        name, _, at_version = name.partition("@")
        versions = self.models.get(name)
        if not versions:
            raise ApiError(404, f"Model {name} not found")
        wanted = version or at_version
        if not wanted:
            return next(v for v in versions if "default" in v["versionAliases"])
        for candidate in versions:
            if candidate["versionId"] == wanted or wanted in candidate["versionAliases"]:
                return candidate
        raise ApiError(404, f"Model {name}@{wanted} not found")

    def _endpoint(self, name: str) -> dict[str, Any]:
        try:
            return self.endpoints[name]
        except KeyError:
            raise ApiError(404, f"Endpoint {name} not found") from None

    def _find_deployed(self, deployed_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
        for endpoint in self.endpoints.values():
            for deployed in endpoint["deployedModels"]:
                if deployed["id"] == deployed_id:
                    return endpoint, deployed
        raise ApiError(404, f"DeployedModel {deployed_id} not found")

    @staticmethod
    def _port_of(spec: dict[str, Any]) -> int:
        ports = spec.get("ports") or [{"containerPort": 8080}]
        return int(ports[0]["containerPort"])

    def _container_base(self, spec: dict[str, Any]) -> str:
        return self.container_url or f"http://127.0.0.1:{self._port_of(spec)}"

    def dedicated_dns(self, endpoint_name: str) -> str:
        """The DNS name Vertex gives a dedicated endpoint: ``ID.REGION-PROJECTNUMBER.prediction.vertexai.goog``."""
        region = endpoint_name.split("/locations/", 1)[1].split("/", 1)[0]
        return f"{endpoint_name.rsplit('/', 1)[1]}.{region}-{PROJECT_NUMBER}.prediction.vertexai.goog"

    def _healthy(self, spec: dict[str, Any]) -> bool:
        url = self._container_base(spec) + spec.get("healthRoute", "/")
        deadline = time.monotonic() + self.health_timeout_s
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)

    # -- handlers, one per route ------------------------------------------
    def upload_model(self, parent: str, body: dict[str, Any]) -> dict[str, Any]:
        spec = dict(body["model"])
        container_spec = spec.get("containerSpec", {})
        if container_spec.get("invokeRoutePrefix"):
            if container_spec["invokeRoutePrefix"] != "/*":
                raise ApiError(400, 'invoke_route_prefix: "/*" is the only supported value')
            if container_spec.get("predictRoute"):
                raise ApiError(400, "only one of predict_route or invoke_route_prefix can be set")
        parent_model = body.get("parentModel")
        if parent_model:
            name = parent_model
            versions = self.models.get(name)
            if not versions:
                raise ApiError(404, f"parent model {name} not found")
            version_id = str(len(versions) + 1)
            if spec.get("displayName") not in (None, versions[0]["displayName"]):
                raise ApiError(400, "a new version must keep the parent's display name")
        else:
            name = f"{parent}/models/{body.get('modelId') or self._next_id()}"
            versions = self.models.setdefault(name, [])
            version_id = "1"
        now = _now()
        for older in versions:
            older["versionAliases"] = [a for a in older["versionAliases"] if a != "default"]
        spec.update(
            {
                "name": name,
                "versionId": version_id,
                "versionAliases": ["default"],
                "createTime": versions[0]["createTime"] if versions else now,
                "updateTime": now,
                "versionCreateTime": now,
                "versionUpdateTime": now,
                "supportedDeploymentResourcesTypes": [1],
                "etag": f"etag-{version_id}",
            }
        )
        versions.append(spec)
        return self._operation(
            parent, "UploadModel", {"@type": f"{V1}UploadModelResponse", "model": name, "modelVersionId": version_id}
        )

    def list_models(self, parent: str, query: dict[str, list[str]]) -> dict[str, Any]:
        wanted = _display_name_from(query.get("filter", [""])[0])
        found = [self._model_version(name) for name in self.models if name.startswith(parent + "/")]
        if wanted is not None:
            found = [m for m in found if m["displayName"] == wanted]
        found.sort(key=lambda m: m["createTime"], reverse=True)
        return {"models": found}

    def get_model(self, name: str, version: str | None) -> dict[str, Any]:
        return self._model_version(name, version)

    def delete_model(self, name: str) -> dict[str, Any]:
        self._model_version(name)
        for endpoint in self.endpoints.values():
            if any(d["model"] == name for d in endpoint["deployedModels"]):
                raise ApiError(400, f"Model {name} is deployed to {endpoint['name']}")
        del self.models[name]
        return self._operation(name.rsplit("/models/", 1)[0], "Delete")

    def create_endpoint(self, parent: str, body: dict[str, Any], query: dict[str, list[str]]) -> dict[str, Any]:
        endpoint_id = query.get("endpointId", [None])[0] or self._next_id()
        name = f"{parent}/endpoints/{endpoint_id}"
        if name in self.endpoints:
            raise ApiError(409, f"Endpoint {name} already exists")
        endpoint = dict(body, name=name, deployedModels=[], trafficSplit={}, createTime=_now(), updateTime=_now(), etag="e1")
        if body.get("dedicatedEndpointEnabled"):
            endpoint["dedicatedEndpointDns"] = self.dedicated_dns(name)
        self.endpoints[name] = endpoint
        return self._operation(parent, "CreateEndpoint", dict(endpoint, **{"@type": f"{V1}Endpoint"}))

    def list_endpoints(self, parent: str, query: dict[str, list[str]]) -> dict[str, Any]:
        wanted = _display_name_from(query.get("filter", [""])[0])
        found = [e for n, e in self.endpoints.items() if n.startswith(parent + "/")]
        if wanted is not None:
            found = [e for e in found if e.get("displayName") == wanted]
        found.sort(key=lambda e: e["createTime"], reverse=True)
        return {"endpoints": found}

    def get_endpoint(self, name: str) -> dict[str, Any]:
        return self._endpoint(name)

    def delete_endpoint(self, name: str) -> dict[str, Any]:
        endpoint = self._endpoint(name)
        if endpoint["deployedModels"]:
            raise ApiError(400, f"Endpoint {name} still has deployed models; undeploy them first")
        del self.endpoints[name]
        return self._operation(name.rsplit("/endpoints/", 1)[0], "Delete")

    def deploy_model(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        endpoint = self._endpoint(name)
        deployed = dict(body["deployedModel"])
        model = self._model_version(deployed["model"], deployed.get("modelVersionId"))
        spec = model["containerSpec"]
        if spec.get("invokeRoutePrefix") and not endpoint.get("dedicatedEndpointEnabled"):
            raise ApiError(400, "a Model with invoke_route_prefix can only be deployed to a dedicated endpoint")
        if not self._healthy(spec):
            return self._operation(name, "DeployModel", error={"code": 9, "message": NEVER_READY})
        deployed_id = self._next_id()
        deployed.update({"id": deployed_id, "model": model["name"], "modelVersionId": model["versionId"], "createTime": _now()})
        endpoint["deployedModels"].append(deployed)
        split = {deployed_id if k == "0" else k: v for k, v in (body.get("trafficSplit") or {"0": 100}).items()}
        endpoint["trafficSplit"] = {k: v for k, v in split.items() if v}
        return self._operation(name, "DeployModel", {"@type": f"{V1}DeployModelResponse", "deployedModel": deployed})

    def undeploy_model(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        endpoint = self._endpoint(name)
        deployed_id = body["deployedModelId"]
        remaining = [d for d in endpoint["deployedModels"] if d["id"] != deployed_id]
        if len(remaining) == len(endpoint["deployedModels"]):
            raise ApiError(404, f"DeployedModel {deployed_id} not on {name}")
        endpoint["deployedModels"] = remaining
        split = body.get("trafficSplit") or {}
        endpoint["trafficSplit"] = {k: v for k, v in split.items() if k != deployed_id and v}
        return self._operation(name, "UndeployModel", {"@type": f"{V1}UndeployModelResponse"})

    def _serving(
        self, name: str, host: str, dedicated_only: str = "", deployed_id: str | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The deployed model that takes this request, and its Model version.

        ``host`` is where the client sent it: a dedicated endpoint answers only
        on its own DNS name; ``dedicated_only`` names a method that exists only there.
        """
        endpoint = self._endpoint(name)
        dns = endpoint.get("dedicatedEndpointDns")
        if dns and host != dns:
            raise ApiError(400, SHARED_HOST_REFUSED.format(dns=dns))
        if not dns and host.endswith(".prediction.vertexai.goog"):
            raise ApiError(404, f"no dedicated endpoint answers on {host}")
        if dedicated_only and not dns:
            raise ApiError(
                400, f"{dedicated_only} is only supported on dedicated endpoints for custom models; {name} is a shared endpoint"
            )
        if deployed_id is None:
            if not endpoint["trafficSplit"]:
                raise ApiError(400, f"Endpoint {name} has no deployed model taking traffic")
            deployed_id = max(endpoint["trafficSplit"], key=endpoint["trafficSplit"].get)
        elif not any(d["id"] == deployed_id for d in endpoint["deployedModels"]):
            raise ApiError(404, f"DeployedModel {deployed_id} not on {name}")
        _, deployed = self._find_deployed(deployed_id)
        return deployed, self._model_version(deployed["model"], deployed["modelVersionId"])

    @staticmethod
    def _predict_spec(model: dict[str, Any]) -> dict[str, Any]:
        """The container spec of a Model that has a predict route (one with an invoke prefix has none)."""
        spec = model["containerSpec"]
        if not spec.get("predictRoute"):
            raise ApiError(
                400, f"Model {model['name']} has no predict route (it was uploaded with invoke_route_prefix): use invoke"
            )
        return spec

    def predict(self, name: str, body: dict[str, Any], host: str) -> dict[str, Any]:
        deployed, model = self._serving(name, host)
        spec = self._predict_spec(model)
        url = self._container_base(spec) + spec["predictRoute"]
        payload = json.dumps({k: body[k] for k in ("instances", "parameters") if k in body})
        request = urllib.request.Request(url, data=payload.encode(), method="POST", headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as err:
            # Vertex hands a custom container's error status and body back to the caller.
            raise ApiError(err.code, err.read().decode(errors="replace")) from None
        return {
            "predictions": answer["predictions"],
            "deployedModelId": deployed["id"],
            "model": model["name"],
            "modelDisplayName": model["displayName"],
            "modelVersionId": model["versionId"],
        }

    def raw_predict(self, name: str, request: Recorded) -> Reply:
        """The body, unchanged, to the predict route; the answer relayed whole."""
        return self._to_predict_route(name, request, stream=False)

    def stream_raw_predict(self, name: str, request: Recorded) -> Reply:
        """As rawPredict, with the answer relayed chunk by chunk as the container sends it."""
        return self._to_predict_route(name, request, stream=True, dedicated_only="streamRawPredict")

    def chat_completions(self, name: str, request: Recorded) -> Reply:
        """The OpenAI-compatible route: the body, unchanged, to the predict route; streams relayed."""
        return self._to_predict_route(name, request, stream=True)

    def invoke(self, name: str, deployed_id: str | None, path: str, request: Recorded) -> Reply:
        """``.../invoke/<path>`` reaches ``<path>`` on a Model uploaded with ``invokeRoutePrefix: "/*"``."""
        deployed, model = self._serving(name, request.host, "invoke", deployed_id)
        spec = model["containerSpec"]
        if spec.get("invokeRoutePrefix") != "/*":
            raise ApiError(400, f"Model {model['name']} was uploaded without invoke_route_prefix; invoke is not enabled for it")
        query = urlsplit(request.path).query
        return self._relay(
            request, self._container_base(spec), path + (f"?{query}" if query else ""), deployed, model, stream=True
        )

    def _to_predict_route(self, name: str, request: Recorded, stream: bool, dedicated_only: str = "") -> Reply:
        deployed, model = self._serving(name, request.host, dedicated_only)
        spec = self._predict_spec(model)
        return self._relay(request, self._container_base(spec), spec["predictRoute"], deployed, model, stream)

    @staticmethod
    def _relay(request: Recorded, base: str, path: str, deployed: dict[str, Any], model: dict[str, Any], stream: bool) -> Reply:
        """Send the client's method, body and end-to-end headers to the container; relay its answer."""
        target = urlsplit(base)
        connection = http.client.HTTPConnection(target.hostname, target.port, timeout=300)
        headers = {k: v for k, v in request.headers.items() if k not in _NOT_FORWARDED}
        connection.request(request.method, path, body=request.raw or None, headers=headers)
        response = connection.getresponse()
        reply_headers = [
            (k, v) for k, v in response.getheaders() if k.lower() not in _NOT_FORWARDED and k.lower() not in ("date", "server")
        ]
        reply_headers += [
            (DEPLOYED_MODEL_HEADER, deployed["id"]),
            (MODEL_HEADER, model["name"]),
            (MODEL_VERSION_HEADER, model["versionId"]),
        ]
        if not stream:
            try:
                return Reply(response.status, headers=reply_headers, body=response.read())
            finally:
                connection.close()

        def chunks() -> Iterator[bytes]:
            try:
                while data := response.read1(65536):
                    yield data
            finally:
                connection.close()

        return Reply(response.status, headers=reply_headers, chunks=chunks())

    def get_operation(self, name: str) -> dict[str, Any]:
        try:
            return self.operations[name]
        except KeyError:
            raise ApiError(404, f"operation {name} not found") from None

    # -- dispatch ----------------------------------------------------------
    def dispatch(self, method: str, raw_path: str, raw_body: bytes, headers: Mapping[str, str] | None = None) -> Reply:
        parts = urlsplit(raw_path)
        query = parse_qs(parts.query)
        for route_method, pattern, route in _ROUTES:  # noqa: B007 (the route found is used after the loop)
            match = pattern.match(unquote(parts.path))
            if match and route_method == method:
                break
        else:
            return Reply(404, ApiError(404, f"stand-in has no route {method} {parts.path}").body())
        recorded = Recorded(
            method,
            unquote(parts.path),
            query,
            _json_or_none(raw_body),
            route,
            {k.lower(): v for k, v in (headers or {}).items()},
            raw_body,
        )
        with self._lock:
            self.requests.append(recorded)
        body = recorded.body if isinstance(recorded.body, dict) else {}
        args: list[Any] = list(match.groups())
        if route in ("upload_model", "deploy_model", "undeploy_model"):
            args.append(body)
        elif route == "predict":
            args.extend([body, recorded.host])
        elif route in _RAW_ROUTES:
            args.append(recorded)
        elif route == "create_endpoint":
            args.extend([body, query])
        elif route in ("list_models", "list_endpoints"):
            args.append(query)
        try:
            if route == "predict" or route in _RAW_ROUTES:
                answer: Reply | dict[str, Any] = getattr(self, route)(*args)
            else:
                with self._lock:
                    answer = getattr(self, route)(*args)
        except ApiError as err:
            return Reply(err.http_status, err.body())
        except OSError as err:
            # Vertex's answer when the replica does not take the connection.
            return Reply(503, ApiError(503, f"the model server is unreachable: {err}").body())
        return answer if isinstance(answer, Reply) else Reply(200, answer)


_RAW_ROUTES = frozenset({"raw_predict", "stream_raw_predict", "chat_completions", "invoke"})


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


class _Handler(BaseHTTPRequestHandler):
    standin: StandIn
    protocol_version = "HTTP/1.1"

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        reply = self.standin.dispatch(self.command, self.path, self.rfile.read(length), dict(self.headers.items()))
        self.send_response(reply.status)
        if reply.payload is not None:
            data = json.dumps(reply.payload).encode()
            self.send_header("Content-Type", "application/json")
        else:
            data = reply.body
        for key, value in reply.headers:
            self.send_header(key, value)
        if reply.chunks is None:
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for chunk in reply.chunks:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    do_GET = do_POST = do_DELETE = do_PATCH = _serve

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Keep test output quiet; the recorded requests are the log."""


OPENAI_AND_ANTHROPIC_PATHS = ("/v1/chat/completions", "/v1/responses", "/v1/messages", "/v1/messages/count_tokens")


def _echo_chat(body: dict[str, Any]) -> str:
    """What the fake container "generates" for an OpenAI chat body: the last message, echoed."""
    return f"echo: {body['messages'][-1]['content']}"


@dataclass
class FakeContainer:
    """A stand-in serving container: /health, an echoing predict route, /v1/chat/completions, /v1/responses,
    /v1/messages and /v1/messages/count_tokens.

    The predict route takes Vertex bodies (``instances``; with ``parameters.stream``
    it sends JSON lines, then the final body, as the real one does), OpenAI chat
    bodies (``messages``; with ``stream`` it sends SSE chunks and ``[DONE]``),
    Anthropic bodies (``anthropic_version``, or any body on ``/v1/messages``: a
    ``message``, unstreamed) and plain text; ``/v1/responses`` echoes ``input`` as a
    ``response`` and ``/v1/messages/count_tokens`` counts the last message's words. ``gate``, when set, holds a stream after its first chunk until a
    test sets it, so a test can show that a relay passes chunks on as they come:
    ``gate_opened`` records, per stream, whether it was opened (``False``: the
    wait timed out, so nobody downstream saw the first chunk in time).
    """

    app: str = "smollm2"
    healthy: bool = True
    received: list[dict[str, Any]] = field(default_factory=list)
    raw_received: list[tuple[str, str, bytes]] = field(default_factory=list)
    gate: threading.Event | None = None
    gate_opened: list[bool] = field(default_factory=list)

    def start(self) -> FakeContainer:
        container = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                ok = self.path == "/health" and container.healthy
                self._answer(200 if ok else 503, {"status": "ok" if ok else "loading"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                content_type = self.headers.get("Content-Type", "")
                container.raw_received.append((self.path, content_type, raw))
                if self.path not in (f"/predictions/{container.app}", *OPENAI_AND_ANTHROPIC_PATHS):
                    self._answer(404, {"error": f"no model at {self.path}"})
                    return
                if not content_type.startswith("application/json"):
                    self._answer(200, {"predictions": [{"generated_text": f"echo: {raw.decode()}"}]})
                    return
                body = json.loads(raw or b"{}")
                container.received.append(body)
                if self.path == "/v1/responses":
                    self._answer(200, {"object": "response", "status": "completed", "output_text": f"echo: {body['input']}"})
                elif self.path == "/v1/messages/count_tokens":
                    self._answer(200, {"input_tokens": len(str(body["messages"][-1]["content"]).split())})
                elif self.path == "/v1/messages" or "anthropic_version" in body:
                    self._messages(body)
                elif "messages" in body:
                    self._chat(body)
                elif "instances" in body and self.path != "/v1/chat/completions":
                    self._instances(body)
                else:
                    self._answer(400, {"error": "the body has neither instances nor messages"})

            def _instances(self, body: dict[str, Any]) -> None:
                texts = [f"echo: {instance}" for instance in body["instances"]]
                final = {"predictions": [{"generated_text": text} for text in texts]}
                if not (body.get("parameters") or {}).get("stream"):
                    self._answer(200, final)
                    return
                lines = [json.dumps({"index": i, "text": text}) + "\n" for i, text in enumerate(texts)]
                self._stream("application/json", [*lines, json.dumps(final)])

            def _chat(self, body: dict[str, Any]) -> None:
                text = _echo_chat(body)
                if not body.get("stream"):
                    self._answer(
                        200,
                        {
                            "object": "chat.completion",
                            "model": body.get("model"),
                            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
                        },
                    )
                    return
                deltas = [{"role": "assistant"}] + [{"content": word} for word in text.replace(" ", "\0 ").split("\0")]
                events = [
                    {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
                    for delta in deltas
                ]
                self._stream("text/event-stream", [f"data: {json.dumps(event)}\n\n" for event in events] + ["data: [DONE]\n\n"])

            def _messages(self, body: dict[str, Any]) -> None:
                """An Anthropic body: the last message echoed as a ``message`` (never streamed here)."""
                self._answer(
                    200,
                    {
                        "type": "message",
                        "role": "assistant",
                        "model": body.get("model"),
                        "content": [{"type": "text", "text": _echo_chat(body)}],
                        "stop_reason": "end_turn",
                        "stop_sequence": None,
                    },
                )

            def _stream(self, content_type: str, pieces: list[str]) -> None:
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for number, piece in enumerate(pieces):
                    if number == 1 and container.gate is not None:
                        container.gate_opened.append(container.gate.wait(30))
                    data = piece.encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")

            def _answer(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                """Quiet."""

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"
