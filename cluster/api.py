"""The API ingress on the base URL (:8080): the management API (`/v2/workspaces/...`, shaped like the
customizer's) and the inference gateway's routes, in one Serve deployment.

Management calls go to the ControlPlane actor; its typed errors come back through the gateway's one
error handler (OpenAPI envelope, status from rayembed/errors.py). The gateway's routing table and the API
keys follow the control plane: a thread asks for them every half second and swaps them in when their
version changed. With keys configured, every route but the health probes needs one (serve/auth.py),
and a key sees only its workspaces: another workspace is "does not exist" (404), as if it did not.
"""

from __future__ import annotations

import logging
import re
import threading
import time

import ray
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from cluster import datasets, kuberay
from cluster.settings import CONTROL_PLANE, NAMESPACE
from serve.auth import Access, BearerAuth, KeyRing, access_of
from rayembed.errors import NotFound, PermissionDenied, ServeError, Unavailable, shown
from serve.gateway import (GATEWAY_SERVE_ENV, GatewayCore, api_route, error_response, inference_routes, install_core,
                           install_error_handlers, installed_core, json_response, read_body)
from serve.schemas import parse_json_object
from serve.settings import GatewayConfig

log = logging.getLogger("ray.serve")
ROUTES_POLL_S = 0.5
MAX_BODY_BYTES = 8 * 2**20  # a job spec or a deployment config; the inference routes have their own limit
BODY_TIMEOUT_S = 30.0
WS = "/v2/workspaces/{workspace}"

app = FastAPI(title="rayembed", description="Customize and serve embedding models on Ray: management API "
              "(workspaces, models, customization jobs, deployment configs, deployments, providers) and the "
              "OpenAI/NIM-compatible inference gateway.", docs_url="/docs", redoc_url=None)
inference_routes(app, installed_core)  # the core lives in serve.gateway (see the note there)
install_error_handlers(app)


def _keys() -> KeyRing | None:
    return installed_core().keys


app.add_middleware(BearerAuth, ring=_keys, on_error=error_response)
ADMIN_ONLY = {"create_workspace": "creating", "delete_workspace": "deleting"}


def _control_plane():
    return ray.get_actor(CONTROL_PLANE, namespace=NAMESPACE)


async def _call(method: str, *args):
    try:
        return await getattr(_control_plane(), method).remote(*args)
    except RayTaskError as exc:
        if isinstance(exc.cause, ServeError):
            raise exc.cause from None
        raise
    except (RayActorError, ActorUnavailableError, ValueError) as exc:  # ValueError: no such named actor (yet)
        raise Unavailable(f"the control plane is not available ({type(exc).__name__}); retry in a few seconds") from None


async def _body(request: Request) -> dict:
    """A management body: strict JSON like the inference routes (UTF-8, one object, no duplicate keys)."""
    raw = await read_body(request, MAX_BODY_BYTES, BODY_TIMEOUT_S)
    return parse_json_object(raw) if raw else {}


def _metrics():
    return installed_core().metrics


def _authorize(access: Access, method: str, workspace: str | None) -> None:
    """A workspace outside the key's scope answers exactly as a workspace that does not exist."""
    if workspace is not None and not access.allows(workspace):
        raise NotFound(f"workspace {shown(workspace)} does not exist; create it with POST /v2/workspaces")
    if method in ADMIN_ONLY and not access.admin:
        raise PermissionDenied(f"{ADMIN_ONLY[method]} a workspace needs a key for all workspaces "
                               "(`rayembed keys create --all-workspaces`); this key is scoped to "
                               + ", ".join(sorted(access.workspaces or ())))


def management(verb: str, path: str, method: str, *, body: bool = False, status: int = 200, listing: bool = False,
               text: bool = False, summary: str = "") -> None:
    """One management route: path parameters (in order) and the JSON body go to the actor's `method`."""
    params = re.findall(r"{(\w+)}", path)

    @api_route("management", _metrics)
    async def handler(request: Request) -> Response:
        args = [request.path_params[p] for p in params]
        access = access_of(request.scope)
        _authorize(access, method, request.path_params.get("workspace"))
        if body:
            args.append(await _body(request))
        result = await _call(method, *args)
        if method == "list_workspaces":
            result = [w for w in result if access.allows(w["name"])]
        if text:
            return PlainTextResponse(result)
        return json_response({"object": "list", "data": result} if listing else result, status)

    handler.__name__ = method
    app.add_api_route(path, handler, methods=[verb], summary=summary or method.replace("_", " "))


for _verb, _path, _method, _opts in [
    ("GET", "/v2/workspaces", "list_workspaces", {"listing": True}),
    ("POST", "/v2/workspaces", "create_workspace", {"body": True, "status": 201}),
    ("GET", WS, "get_workspace", {}),
    ("DELETE", WS, "delete_workspace", {}),
    ("GET", WS + "/models", "list_models", {"listing": True}),
    ("POST", WS + "/models", "create_model", {"body": True, "status": 201}),
    ("GET", WS + "/models/{name}", "get_model", {}),
    ("DELETE", WS + "/models/{name}", "delete_model", {}),
    ("GET", WS + "/datasets", "list_datasets", {"listing": True}),
    ("POST", WS + "/datasets", "create_dataset", {"body": True, "status": 201}),
    ("GET", WS + "/datasets/{name}", "get_dataset", {}),
    ("DELETE", WS + "/datasets/{name}", "delete_dataset", {}),
    ("GET", WS + "/customization/jobs", "list_jobs", {"listing": True}),
    ("POST", WS + "/customization/jobs", "create_job", {"body": True, "status": 201}),
    ("GET", WS + "/customization/jobs/{job_id}", "get_job", {}),
    ("GET", WS + "/customization/jobs/{job_id}/status", "job_status", {}),
    ("POST", WS + "/customization/jobs/{job_id}/cancel", "cancel_job", {}),
    ("POST", WS + "/customization/jobs/{job_id}/resume", "resume_job", {}),
    ("GET", WS + "/customization/jobs/{job_id}/logs", "job_logs", {"text": True}),
    ("GET", WS + "/deployment-configs", "list_deployment_configs", {"listing": True}),
    ("POST", WS + "/deployment-configs", "create_deployment_config", {"body": True, "status": 201}),
    ("GET", WS + "/deployment-configs/{name}", "get_deployment_config", {}),
    ("PATCH", WS + "/deployment-configs/{name}", "update_deployment_config", {"body": True}),
    ("DELETE", WS + "/deployment-configs/{name}", "delete_deployment_config", {}),
    ("GET", WS + "/deployments", "list_deployments", {"listing": True}),
    ("POST", WS + "/deployments", "create_deployment", {"body": True, "status": 201}),
    ("GET", WS + "/deployments/{name}", "get_deployment", {}),
    ("PATCH", WS + "/deployments/{name}", "update_deployment", {"body": True}),
    ("DELETE", WS + "/deployments/{name}", "delete_deployment", {}),
    ("GET", WS + "/providers", "list_providers", {"listing": True}),
    ("GET", WS + "/providers/{name}", "get_provider", {}),
]:
    management(_verb, _path, _method, **_opts)


@api_route("management", _metrics)
async def upload_dataset_file(request: Request) -> Response:
    """The request body is the file (any Content-Type), streamed to storage once it validates."""
    workspace, name, path = (request.path_params[k] for k in ("workspace", "name", "path"))
    _authorize(access_of(request.scope), "add_dataset_file", workspace)
    dataset = await _call("get_dataset", workspace, name)
    stored = await datasets.upload(request, dataset, path)
    return json_response(await _call("add_dataset_file", workspace, name, path, stored))


app.add_api_route(WS + "/datasets/{name}/files/{path:path}", upload_dataset_file, methods=["PUT"],
                  summary="upload a dataset file (training.jsonl, validation.jsonl, evaluation/corpus.jsonl, "
                          "evaluation/queries.jsonl, evaluation/qrels/test.tsv)")


@api_route("management", _metrics)
async def export_deployment(request: Request) -> Response:
    """`?format=rayservice` (the default; `image`, `k8s_name` optional): YAML, or JSON when the client accepts only that."""
    workspace, name = request.path_params["workspace"], request.path_params["name"]
    _authorize(access_of(request.scope), "export_deployment", workspace)
    query = request.query_params
    manifest = await _call("export_deployment", workspace, name, query.get("format", "rayservice"),
                           query.get("image") or None, query.get("k8s_name") or None)
    if "yaml" not in (accept := request.headers.get("accept", "")) and "json" in accept:
        return json_response(manifest)
    return Response(kuberay.render(manifest), media_type="application/yaml")


app.add_api_route(WS + "/deployments/{name}/export", export_deployment, methods=["GET"],
                  summary="a KubeRay RayService manifest that serves the deployment's model on a serving-only cluster")


# Like the standalone gateway, its code runs on the replica's own loop (GATEWAY_SERVE_ENV): the handlers await
# the control plane and the replicas; the blocking calls are the constructor's first poll (before it serves) and a
# named-actor lookup per management request (a local GCS call).
@serve.deployment(ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": GATEWAY_SERVE_ENV}},
                  max_ongoing_requests=4096, logging_config={"enable_access_log": False})
@serve.ingress(app)
class Api:
    def __init__(self):
        install_core(GatewayCore(GatewayConfig(), keys=None))  # no keys known yet: refuse until the first routes
        self._version = None
        try:
            self._poll()
        except Exception as exc:  # noqa: BLE001 - the thread below keeps asking
            log.warning("routes from the control plane: %s: %s", type(exc).__name__, exc)
        threading.Thread(target=self._follow_routes, name="routes", daemon=True).start()

    def _poll(self) -> None:
        routes = ray.get(_control_plane().routes.remote(self._version), timeout=10)
        if routes is not None:
            config = GatewayConfig.model_validate(routes["config"], context={"check_files": False})
            installed_core().set_table(config, routes["workspaces"], KeyRing(routes["keys"]))
            self._version = routes["version"]

    def _follow_routes(self) -> None:
        warned = False
        while True:
            time.sleep(ROUTES_POLL_S)
            try:
                self._poll()
                warned = False
            except Exception as exc:  # noqa: BLE001 - the control plane may be restarting
                if not warned:
                    log.warning("routes from the control plane: %s: %s", type(exc).__name__, exc)
                    warned = True


def build_api_app(args: dict | None = None):
    return Api.bind()
