"""The API ingress on the base URL (:8080): the management API (`/v2/workspaces/...`, shaped like the
customizer's) and the inference gateway's routes, in one Serve deployment.

Management calls go to the ControlPlane actor; its typed errors come back through the gateway's one
error handler (OpenAPI envelope, status from rayembed/errors.py). The gateway's routing table and the API
keys follow the control plane: a thread asks for them every half second and swaps them in when their
version changed. With keys configured, every route but the health probes needs one (serve/auth.py),
and a key sees only its workspaces: another workspace is "does not exist" (404), as if it did not.
"""

from __future__ import annotations

import inspect
import logging
import re
import threading
import time

import ray
from typing import Literal

from fastapi import FastAPI, Path, Query, Request
from fastapi.responses import PlainTextResponse, Response
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from pydantic import BaseModel

from cluster import console, kuberay, metrics, schemas, search, upload_ingress
from cluster.entities import DATASET_FILES, NAME_PATTERN
from cluster.services.base import check_body
from cluster.settings import CONTROL_PLANE, NAMESPACE
from serve.auth import Access, BearerAuth, KeyRing, access_of
from rayembed.errors import NotFound, PermissionDenied, ServeError, Unavailable, shown
from serve.gateway import GATEWAY_SERVE_ENV, GatewayCore, inference_routes, install_core, installed_core
from serve.http import api_route, error_response, install_error_handlers, json_response, read_body
from serve.openapi import answers, install_openapi, json_body
from serve.schemas import EmbeddingRequest, parse_json_object
from serve.settings import GatewayConfig

log = logging.getLogger("ray.serve")
ROUTES_POLL_S = 0.5
MAX_BODY_BYTES = 8 * 2**20  # a job spec or a deployment config; the inference routes have their own limit
BODY_TIMEOUT_S = 30.0
WS = "/v2/workspaces/{workspace}"

app = FastAPI(title="rayembed", description="Customize and serve embedding models on Ray: management API "
              "(workspaces, models, customization jobs, deployment configs, deployments, providers) and the "
              "OpenAI/NIM-compatible inference gateway.", docs_url=None, redoc_url=None)  # /docs: cluster/console (offline)
inference_routes(app, installed_core)  # the core lives in serve.gateway (see the note there)
install_error_handlers(app, name_rule=schemas.NAME_DOC)  # a name that breaks the rule is told the rule


def _keys() -> KeyRing | None:
    return installed_core().keys


app.add_middleware(BearerAuth, ring=_keys, on_error=error_response)
console.install(app)  # /console and /docs: static pages outside BearerAuth; they call the API with the user's key
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


PATH_DOC = {"workspace": "the workspace's name", "name": "the entity's name", "job_id": "the customization job's id",
            "path": "the dataset file"}
SORT_DOC = "a field, descending with a leading '-'"


def _path_param(name: str):
    return Path(description=f"{PATH_DOC[name]} ({schemas.NAME_DOC})", pattern=NAME_PATTERN)


def _signature(params: list[str], listing: bool, filters: dict[str, str]) -> inspect.Signature:
    """What FastAPI documents and passes: the request, the path parameters and, on a list route, the page (and the
    route's own filters: field -> description)."""
    kinds = inspect.Parameter.KEYWORD_ONLY
    out = [inspect.Parameter("request", kinds, annotation=Request)]
    out += [inspect.Parameter(p, kinds, annotation=str, default=_path_param(p)) for p in params]
    if listing:
        out += [inspect.Parameter("page", kinds, annotation=int, default=Query(1, ge=1, le=schemas.MAX_PAGE, description="from 1")),
                inspect.Parameter("page_size", kinds, annotation=int,
                                  default=Query(schemas.PAGE_SIZE, ge=1, le=schemas.MAX_PAGE_SIZE)),
                inspect.Parameter("sort", kinds, annotation=Literal[schemas.SORTS],  # type: ignore[valid-type]
                                  default=Query("-created_at", description=SORT_DOC)),
                inspect.Parameter("status", kinds, annotation=str | None,
                                  default=Query(None, max_length=64, description="only entities in this status"))]
        out += [inspect.Parameter(f, kinds, annotation=str | None, default=Query(None, max_length=64, description=doc))
                for f, doc in filters.items()]
    return inspect.Signature(out)


def management(verb: str, path: str, method: str, answer: type[BaseModel] | None, *, body: type[BaseModel] | None = None,
               status: int = 200, listing: bool = False, text: bool = False, summary: str = "",
               links: dict | None = None, filters: dict[str, str] | None = None) -> None:
    """One management route: path parameters (in order) and the JSON body go to the actor's `method`; its answer
    goes out through `answer` (ISO 8601 times, the documented fields only), a list as one page of them."""
    params = re.findall(r"{(\w+)}", path)

    async def handler(request: Request, **kw) -> Response:
        args = [kw[p] for p in params]
        access = access_of(request.scope)
        _authorize(access, method, kw.get("workspace"))
        if body is not None:  # checked here, once, before the actor is called (cluster/services/base.py: BODIES)
            args.append(check_body(method, await _body(request)))
        result = await _call(method, *args)
        if method == "list_workspaces":
            result = [w for w in result if access.allows(w["name"])]
        if text:
            return PlainTextResponse(result)
        if listing:
            page = schemas.page_of(result, kw["page"], kw["page_size"], kw["sort"], kw["status"],
                                   {f: kw[f] for f in filters or {}})
            page["data"] = [_out(answer, item) for item in page["data"]]
            return json_response(page)
        return json_response(_out(answer, result), status)

    handler.__signature__ = _signature(params, listing, filters or {})
    handler.__name__ = method
    shown_as = schemas.Page[answer] if listing else answer
    content = {"text/plain": {"schema": {"type": "string"}}} if text else None
    app.add_api_route(path, api_route("management", _metrics)(handler), methods=[verb], operation_id=method,
                      summary=summary or method.replace("_", " "), status_code=status, response_model=None,
                      responses=answers(status, shown_as, summary or method.replace("_", " "), links, content),
                      openapi_extra=json_body(body) if body is not None else None)


def _out(answer: type[BaseModel], value: dict) -> dict:
    return answer.model_validate(value).model_dump(mode="json")


def _links(get: str, param: str = "name", field: str = "name", **more: str) -> dict:
    """OpenAPI links from a create answer to the routes that read and remove what it made."""
    ops = {"get": get, **more}
    return {verb.title().replace("_", ""): {"operationId": op, "parameters": {
        "workspace": "$request.path.workspace", param: f"$response.body#/{field}"}} for verb, op in ops.items()}


Out, S = schemas, schemas  # the answer models and the request models live in cluster/schemas.py
for _verb, _path, _method, _answer, _opts in [
    ("GET", "/v2/workspaces", "list_workspaces", Out.WorkspaceOut, {"listing": True}),
    ("POST", "/v2/workspaces", "create_workspace", Out.WorkspaceOut, {"body": S.WorkspaceCreate, "status": 201, "links": {
        "GetWorkspace": {"operationId": "get_workspace", "parameters": {"workspace": "$response.body#/name"}},
        "DeleteWorkspace": {"operationId": "delete_workspace", "parameters": {"workspace": "$response.body#/name"}}}}),
    ("GET", WS, "get_workspace", Out.WorkspaceOut, {}),
    ("DELETE", WS, "delete_workspace", Out.Deleted, {}),
    ("GET", WS + "/models", "list_models", Out.ModelOut, {"listing": True}),
    ("POST", WS + "/models", "create_model", Out.ModelOut, {"body": S.ModelCreate, "status": 201,
                                                            "links": _links("get_model", delete="delete_model")}),
    ("GET", WS + "/models/{name}", "get_model", Out.ModelOut, {}),
    ("DELETE", WS + "/models/{name}", "delete_model", Out.Deleted, {}),
    ("GET", WS + "/datasets", "list_datasets", Out.DatasetOut, {"listing": True}),
    ("POST", WS + "/datasets", "create_dataset", Out.DatasetOut, {"body": S.DatasetCreate, "status": 201,
                                                                  "links": _links("get_dataset", delete="delete_dataset")}),
    ("GET", WS + "/datasets/{name}", "get_dataset", Out.DatasetOut, {}),
    ("DELETE", WS + "/datasets/{name}", "delete_dataset", Out.Deleted, {}),
    ("GET", WS + "/customization/jobs", "list_jobs", Out.JobOut, {"listing": True, "filters": {
        "kind": "only jobs of this kind: training or sweep"}}),
    ("POST", WS + "/customization/jobs", "create_job", Out.JobOut, {"body": S.JobCreate, "status": 201, "links": _links(
        "get_job", "job_id", status="job_status", cancel="cancel_job")}),
    ("GET", WS + "/customization/jobs/{job_id}", "get_job", Out.JobOut, {}),
    ("GET", WS + "/customization/jobs/{job_id}/status", "job_status", Out.JobStatusOut, {}),
    ("POST", WS + "/customization/jobs/{job_id}/cancel", "cancel_job", Out.JobOut, {}),
    ("POST", WS + "/customization/jobs/{job_id}/resume", "resume_job", Out.JobOut, {}),
    ("DELETE", WS + "/customization/jobs/{job_id}", "delete_job", Out.Deleted, {}),
    ("GET", WS + "/customization/jobs/{job_id}/logs", "job_logs", None, {"text": True}),
    ("GET", WS + "/deployment-configs", "list_deployment_configs", Out.DeploymentConfigOut, {"listing": True}),
    ("POST", WS + "/deployment-configs", "create_deployment_config", Out.DeploymentConfigOut, {
        "body": S.DeploymentConfigCreate, "status": 201,
        "links": _links("get_deployment_config", delete="delete_deployment_config")}),
    ("GET", WS + "/deployment-configs/{name}", "get_deployment_config", Out.DeploymentConfigDetail, {}),
    ("PATCH", WS + "/deployment-configs/{name}", "update_deployment_config", Out.DeploymentConfigOut,
     {"body": S.DeploymentConfigUpdate}),
    ("DELETE", WS + "/deployment-configs/{name}", "delete_deployment_config", Out.Deleted, {}),
    ("GET", WS + "/deployments", "list_deployments", Out.DeploymentOut, {"listing": True}),
    ("POST", WS + "/deployments", "create_deployment", Out.DeploymentOut, {
        "body": S.DeploymentCreate, "status": 201, "links": _links("get_deployment", delete="delete_deployment")}),
    ("GET", WS + "/deployments/{name}", "get_deployment", Out.DeploymentOut, {}),
    ("PATCH", WS + "/deployments/{name}", "update_deployment", Out.DeploymentOut, {"body": S.DeploymentUpdate}),
    ("DELETE", WS + "/deployments/{name}", "delete_deployment", Out.DeploymentOut, {}),
    ("POST", WS + "/deployments/{name}/verify", "verify_deployment", Out.DeploymentOut, {}),
    ("POST", WS + "/deployments/{name}/search", "search_deployment", search.SearchOut, {"body": search.SearchRequest}),
    ("GET", WS + "/providers", "list_providers", Out.ProviderOut, {"listing": True}),
    ("GET", WS + "/providers/{name}", "get_provider", Out.ProviderOut, {}),
]:
    management(_verb, _path, _method, _answer, **_opts)


@api_route("management", _metrics)
async def upload_dataset_file(request: Request, workspace: str = _path_param("workspace"), name: str = _path_param("name"),
                              path: Literal[tuple(DATASET_FILES)] = Path(description="the dataset file")  # type: ignore[valid-type]
                              ) -> Response:
    """Uploads have their own ingress (cluster/upload_ingress.py), so a body never passes through the replica that
    serves inference: this answers 308 to its URL before reading the body."""
    _authorize(access_of(request.scope), "add_dataset_file", workspace)
    target = upload_ingress.PREFIX + f"/workspaces/{workspace}/datasets/{name}/files/{path}"
    return json_response({"error": {"message": f"upload the file to {target} (PUT, the file as the body)",
                                    "type": "invalid_request_error", "param": "path", "code": "moved"}},
                         308, headers={"Location": target})


_FILE_BODY = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}
app.add_api_route(WS + "/datasets/{name}/files/{path:path}", upload_dataset_file, methods=["PUT"],
                  operation_id="upload_dataset_file_moved", response_model=None,  # the body is never read here
                  include_in_schema=False)  # the route before the upload ingress: a 308 to it, not the contract
# Served by the upload ingress's own Serve application (route prefix /v2/uploads: Serve sends these requests there,
# never to this replica); listed here so /openapi.json documents every route of the base URL.
app.add_api_route(upload_ingress.PREFIX + upload_ingress.ROUTE, upload_ingress.upload_dataset_file, methods=["PUT"],
                  operation_id="upload_dataset_file", response_model=None, openapi_extra=_FILE_BODY,
                  responses=answers(200, schemas.DatasetOut, "the dataset with the file recorded"),
                  summary="upload a dataset file (training.jsonl, validation.jsonl, evaluation/corpus.jsonl, "
                          "evaluation/queries.jsonl, evaluation/qrels/test.tsv), validated off the serving path")


@api_route("management", _metrics)
async def export_deployment(request: Request, workspace: str = _path_param("workspace"), name: str = _path_param("name"),
                            format: Literal[kuberay.FORMATS] = Query("rayservice"),  # type: ignore[valid-type]  # noqa: A002
                            image: str | None = Query(None, max_length=512, description="the containers' image"),
                            k8s_name: str | None = Query(None, max_length=63, description="metadata.name")) -> Response:
    """`?format=rayservice` (the default; `image`, `k8s_name` optional): YAML, or JSON when the client accepts only that."""
    _authorize(access_of(request.scope), "export_deployment", workspace)
    manifest = await _call("export_deployment", workspace, name, format, image or None, k8s_name or None)
    if "yaml" not in (accept := request.headers.get("accept", "")) and "json" in accept:
        return json_response(manifest)
    return Response(kuberay.render(manifest), media_type="application/yaml")


app.add_api_route(WS + "/deployments/{name}/export", export_deployment, methods=["GET"], operation_id="export_deployment",
                  response_model=None, responses=answers(200, None, "the manifest", content={
                      "application/yaml": {"schema": {"type": "string"}}, "application/json": {"schema": {"type": "object"}}}),
                  summary="a KubeRay RayService manifest that serves the deployment's model on a serving-only cluster")


@api_route("management", _metrics)
async def job_metrics(request: Request, workspace: str = _path_param("workspace"), job_id: str = _path_param("job_id"),
                      page: int = Query(1, ge=1, le=schemas.MAX_PAGE, description="from 1"),
                      page_size: int = Query(metrics.DEFAULT_POINTS, ge=1, le=schemas.MAX_PAGE_SIZE)) -> Response:
    _authorize(access_of(request.scope), "job_metrics", workspace)
    return json_response(_out(metrics.JobMetricsOut, await _call("job_metrics", workspace, job_id, page, page_size)))


app.add_api_route(WS + "/customization/jobs/{job_id}/metrics", job_metrics, methods=["GET"], operation_id="job_metrics",
                  response_model=None, responses=answers(200, metrics.JobMetricsOut, "the metrics history"),
                  summary="the job's training records (step, loss, lr, examples/s) and validations, downsampled, paged")
install_openapi(app, [search.SearchRequest, schemas.WorkspaceCreate, schemas.ModelCreate, schemas.DatasetCreate, schemas.JobCreate,
                      schemas.DeploymentConfigCreate, schemas.DeploymentConfigUpdate, schemas.DeploymentCreate,
                      schemas.DeploymentUpdate, EmbeddingRequest])


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
            installed_core().set_table(config, routes["workspaces"], KeyRing(routes["keys"], routes.get("open", False)))
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
