"""A local stand-in for the Vertex AI REST API, and a fake serving container.

No emulator of Vertex's Model/Endpoint/Prediction services exists, so the
tests run the real google-cloud-aiplatform SDK (REST transport) against this
server. It records every request so tests can parse bodies back into the SDK's
own request types, and it does what Vertex does with the container: on
``:deployModel`` it polls the container's health route, on ``:predict`` it
forwards the body to the container's predict route on its port.

Every long-running operation is answered already finished, so the SDK never
polls (see shared/docs/vertex-offline.md).
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

V1 = "type.googleapis.com/google.cloud.aiplatform.v1."
# The message real Vertex gives when the container never answers its health route.
NEVER_READY = (
    "Model server never became ready. Please validate that your model file or "
    "container configuration are valid."
)

_PARENT = r"projects/[^/]+/locations/[^/]+"
_ROUTES: Tuple[Tuple[str, "re.Pattern[str]", str], ...] = tuple(
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
        ("GET", r"^/ui/(.+/operations/\d+)$", "get_operation"),
    )
)


class ApiError(Exception):
    """An HTTP error in Google's JSON error shape."""

    STATUS = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 409: "ALREADY_EXISTS",
              412: "FAILED_PRECONDITION", 422: "FAILED_PRECONDITION", 500: "INTERNAL",
              503: "UNAVAILABLE"}

    def __init__(self, http_status: int, message: str) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.message = message

    def body(self) -> Dict[str, Any]:
        return {"error": {"code": self.http_status, "message": self.message,
                          "status": self.STATUS.get(self.http_status, "UNKNOWN")}}


@dataclass
class Recorded:
    """One request the SDK sent: what a test asserts on."""

    method: str
    path: str
    query: Dict[str, List[str]]
    body: Optional[Dict[str, Any]]
    route: str


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _display_name_from(filter_text: str) -> Optional[str]:
    match = re.search(r'display_name\s*=\s*"?([^"]*)"?', filter_text or "")
    return match.group(1) if match else None


@dataclass
class StandIn:
    """State and behaviour of the fake Vertex API.

    ``container_url`` says where the "replica" of any deployed Model listens
    (Vertex would start the image; here it is already running). ``None`` means
    ``http://127.0.0.1:<first container port>``, as the Model declares it.
    """

    container_url: Optional[str] = None
    health_timeout_s: float = 5.0
    requests: List[Recorded] = field(default_factory=list)
    models: Dict[str, List[Dict[str, Any]]] = field(default_factory=dict)
    endpoints: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    operations: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._ids = itertools.count(1000)
        self._lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> "StandIn":
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
    def calls(self, route: str) -> List[Recorded]:
        return [r for r in self.requests if r.route == route]

    def container_env(self, deployed_model_id: str) -> Dict[str, str]:
        """The env Vertex starts a replica with: the Model's env plus the AIP_* contract."""
        endpoint, deployed = self._find_deployed(deployed_model_id)
        model = self._model_version(deployed["model"], deployed.get("modelVersionId"))
        spec = model["containerSpec"]
        env = {item["name"]: item.get("value", "") for item in spec.get("env", [])}
        env.update({
            "AIP_HTTP_PORT": str(self._port_of(spec)),
            "AIP_PREDICT_ROUTE": spec.get("predictRoute", ""),
            "AIP_HEALTH_ROUTE": spec.get("healthRoute", ""),
            "AIP_DEPLOYED_MODEL_ID": deployed_model_id,
            "AIP_ENDPOINT_ID": endpoint["name"].rsplit("/", 1)[1],
        })
        if model.get("artifactUri"):
            env["AIP_STORAGE_URI"] = model["artifactUri"]
        return env

    # -- resources ---------------------------------------------------------
    def _next_id(self) -> str:
        return str(next(self._ids))

    def _operation(self, parent: str, kind: str, response: Optional[Dict[str, Any]] = None,
                   error: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        name = f"{parent}/operations/{self._next_id()}"
        op: Dict[str, Any] = {
            "name": name,
            "done": True,
            "metadata": {"@type": f"{V1}{kind}OperationMetadata",
                         "genericMetadata": {"createTime": _now(), "updateTime": _now()}},
        }
        if error is not None:
            op["error"] = error
        else:
            op["response"] = response or {"@type": "type.googleapis.com/google.protobuf.Empty"}
        self.operations[name] = op
        return op

    def _model_version(self, name: str, version: Optional[str] = None) -> Dict[str, Any]:
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

    def _endpoint(self, name: str) -> Dict[str, Any]:
        try:
            return self.endpoints[name]
        except KeyError:
            raise ApiError(404, f"Endpoint {name} not found") from None

    def _find_deployed(self, deployed_id: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        for endpoint in self.endpoints.values():
            for deployed in endpoint["deployedModels"]:
                if deployed["id"] == deployed_id:
                    return endpoint, deployed
        raise ApiError(404, f"DeployedModel {deployed_id} not found")

    @staticmethod
    def _port_of(spec: Dict[str, Any]) -> int:
        ports = spec.get("ports") or [{"containerPort": 8080}]
        return int(ports[0]["containerPort"])

    def _container_base(self, spec: Dict[str, Any]) -> str:
        return self.container_url or f"http://127.0.0.1:{self._port_of(spec)}"

    def _healthy(self, spec: Dict[str, Any]) -> bool:
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
    def upload_model(self, parent: str, body: Dict[str, Any]) -> Dict[str, Any]:
        spec = dict(body["model"])
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
        spec.update({
            "name": name,
            "versionId": version_id,
            "versionAliases": ["default"],
            "createTime": versions[0]["createTime"] if versions else now,
            "updateTime": now,
            "versionCreateTime": now,
            "versionUpdateTime": now,
            "supportedDeploymentResourcesTypes": [1],
            "etag": f"etag-{version_id}",
        })
        versions.append(spec)
        return self._operation(parent, "UploadModel", {
            "@type": f"{V1}UploadModelResponse", "model": name, "modelVersionId": version_id})

    def list_models(self, parent: str, query: Dict[str, List[str]]) -> Dict[str, Any]:
        wanted = _display_name_from(query.get("filter", [""])[0])
        found = [self._model_version(name) for name in self.models
                 if name.startswith(parent + "/")]
        if wanted is not None:
            found = [m for m in found if m["displayName"] == wanted]
        found.sort(key=lambda m: m["createTime"], reverse=True)
        return {"models": found}

    def get_model(self, name: str, version: Optional[str]) -> Dict[str, Any]:
        return self._model_version(name, version)

    def delete_model(self, name: str) -> Dict[str, Any]:
        self._model_version(name)
        for endpoint in self.endpoints.values():
            if any(d["model"] == name for d in endpoint["deployedModels"]):
                raise ApiError(400, f"Model {name} is deployed to {endpoint['name']}")
        del self.models[name]
        return self._operation(name.rsplit("/models/", 1)[0], "Delete")

    def create_endpoint(self, parent: str, body: Dict[str, Any],
                        query: Dict[str, List[str]]) -> Dict[str, Any]:
        endpoint_id = query.get("endpointId", [None])[0] or self._next_id()
        name = f"{parent}/endpoints/{endpoint_id}"
        if name in self.endpoints:
            raise ApiError(409, f"Endpoint {name} already exists")
        endpoint = dict(body, name=name, deployedModels=[], trafficSplit={},
                        createTime=_now(), updateTime=_now(), etag="e1")
        self.endpoints[name] = endpoint
        return self._operation(parent, "CreateEndpoint", dict(endpoint, **{"@type": f"{V1}Endpoint"}))

    def list_endpoints(self, parent: str, query: Dict[str, List[str]]) -> Dict[str, Any]:
        wanted = _display_name_from(query.get("filter", [""])[0])
        found = [e for n, e in self.endpoints.items() if n.startswith(parent + "/")]
        if wanted is not None:
            found = [e for e in found if e.get("displayName") == wanted]
        found.sort(key=lambda e: e["createTime"], reverse=True)
        return {"endpoints": found}

    def get_endpoint(self, name: str) -> Dict[str, Any]:
        return self._endpoint(name)

    def delete_endpoint(self, name: str) -> Dict[str, Any]:
        endpoint = self._endpoint(name)
        if endpoint["deployedModels"]:
            raise ApiError(400, f"Endpoint {name} still has deployed models; undeploy them first")
        del self.endpoints[name]
        return self._operation(name.rsplit("/endpoints/", 1)[0], "Delete")

    def deploy_model(self, name: str, body: Dict[str, Any]) -> Dict[str, Any]:
        endpoint = self._endpoint(name)
        deployed = dict(body["deployedModel"])
        model = self._model_version(deployed["model"], deployed.get("modelVersionId"))
        spec = model["containerSpec"]
        if not self._healthy(spec):
            return self._operation(name, "DeployModel", error={"code": 9, "message": NEVER_READY})
        deployed_id = self._next_id()
        deployed.update({"id": deployed_id, "model": model["name"],
                         "modelVersionId": model["versionId"], "createTime": _now()})
        endpoint["deployedModels"].append(deployed)
        split = {deployed_id if k == "0" else k: v
                 for k, v in (body.get("trafficSplit") or {"0": 100}).items()}
        endpoint["trafficSplit"] = {k: v for k, v in split.items() if v}
        return self._operation(name, "DeployModel", {
            "@type": f"{V1}DeployModelResponse", "deployedModel": deployed})

    def undeploy_model(self, name: str, body: Dict[str, Any]) -> Dict[str, Any]:
        endpoint = self._endpoint(name)
        deployed_id = body["deployedModelId"]
        remaining = [d for d in endpoint["deployedModels"] if d["id"] != deployed_id]
        if len(remaining) == len(endpoint["deployedModels"]):
            raise ApiError(404, f"DeployedModel {deployed_id} not on {name}")
        endpoint["deployedModels"] = remaining
        split = body.get("trafficSplit") or {}
        endpoint["trafficSplit"] = {k: v for k, v in split.items() if k != deployed_id and v}
        return self._operation(name, "UndeployModel",
                               {"@type": f"{V1}UndeployModelResponse"})

    def predict(self, name: str, body: Dict[str, Any]) -> Dict[str, Any]:
        endpoint = self._endpoint(name)
        if not endpoint["trafficSplit"]:
            raise ApiError(400, f"Endpoint {name} has no deployed model taking traffic")
        deployed_id = max(endpoint["trafficSplit"], key=endpoint["trafficSplit"].get)
        _, deployed = self._find_deployed(deployed_id)
        model = self._model_version(deployed["model"], deployed["modelVersionId"])
        spec = model["containerSpec"]
        url = self._container_base(spec) + spec["predictRoute"]
        payload = json.dumps({k: body[k] for k in ("instances", "parameters") if k in body})
        request = urllib.request.Request(url, data=payload.encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as err:
            # Vertex hands a custom container's error status and body back to the caller.
            raise ApiError(err.code, err.read().decode(errors="replace")) from None
        return {"predictions": answer["predictions"], "deployedModelId": deployed_id,
                "model": model["name"], "modelDisplayName": model["displayName"],
                "modelVersionId": model["versionId"]}

    def get_operation(self, name: str) -> Dict[str, Any]:
        try:
            return self.operations[name]
        except KeyError:
            raise ApiError(404, f"operation {name} not found") from None

    # -- dispatch ----------------------------------------------------------
    def dispatch(self, method: str, raw_path: str, raw_body: bytes) -> Tuple[int, Dict[str, Any]]:
        parts = urlsplit(raw_path)
        query = parse_qs(parts.query)
        body = json.loads(raw_body) if raw_body else None
        for route_method, pattern, route in _ROUTES:
            match = pattern.match(unquote(parts.path))
            if match and route_method == method:
                break
        else:
            return 404, ApiError(404, f"stand-in has no route {method} {parts.path}").body()
        with self._lock:
            self.requests.append(Recorded(method, unquote(parts.path), query, body, route))
        args: List[Any] = list(match.groups())
        if route in ("upload_model", "deploy_model", "undeploy_model", "predict"):
            args.append(body or {})
        elif route == "create_endpoint":
            args.extend([body or {}, query])
        elif route in ("list_models", "list_endpoints"):
            args.append(query)
        try:
            if route == "predict":
                return 200, self.predict(*args)
            with self._lock:
                return 200, getattr(self, route)(*args)
        except ApiError as err:
            return err.http_status, err.body()


class _Handler(BaseHTTPRequestHandler):
    standin: StandIn

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        status, payload = self.standin.dispatch(self.command, self.path, self.rfile.read(length))
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = do_PATCH = _serve

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Keep test output quiet; the recorded requests are the log."""


@dataclass
class FakeContainer:
    """A stand-in serving container: /health, and an echoing predict route."""

    app: str = "smollm2"
    healthy: bool = True
    received: List[Dict[str, Any]] = field(default_factory=list)

    def start(self) -> "FakeContainer":
        container = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                ok = self.path == "/health" and container.healthy
                self._answer(200 if ok else 503, {"status": "ok" if ok else "loading"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path != f"/predictions/{container.app}":
                    self._answer(404, {"error": f"no model at {self.path}"})
                    return
                container.received.append(body)
                self._answer(200, {"predictions": [
                    {"generated_text": f"echo: {instance}"} for instance in body["instances"]]})

            def _answer(self, status: int, payload: Dict[str, Any]) -> None:
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
