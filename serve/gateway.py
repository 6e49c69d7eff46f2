"""The inference gateway: routes embeddings requests to replicas by model entity, by provider, or by
the OpenAI `model` field; answers every error with the OpenAI envelope from one handler
(`error_response`) and records request metrics.

`GatewayCore` holds the routing table (swappable at run time) and the handlers; `inference_routes`
mounts them on any FastAPI app: the standalone `Gateway` deployment here, and the control plane's
API ingress (cluster/api.py), whose table follows the deployments the control plane reports READY.
"""


import asyncio
import functools
import logging
import time
from typing import Callable

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import metrics
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from serve.auth import OPEN, Access, BearerAuth, KeyRing, access_of
from rayembed.errors import (ClientGone, InvalidRequest, MethodNotAllowed, NotFound, PayloadTooLarge, QueueFull,
                          RequestTimeout, ServeError, Unauthorized, Unavailable, UnsupportedMediaType, UpstreamTimeout,
                          envelope, status_of)
from serve.routing import RoutingTable, model_id
from serve.openapi import answers, install_openapi, json_body
from serve.schemas import EmbeddingRequest, EmbeddingResponse, Health, ModelList, parse_request, render
from serve.settings import GatewayConfig, ProviderSettings

log = logging.getLogger("ray.serve")
GATEWAY = "/v2/workspaces/{workspace}/inference/gateway"
READY_TIMEOUT_S = 5.0
REPLICA_ATTEMPTS = 3
# The gateway's code never blocks (parsing, routing, one awaited handle call, rendering), so its replicas run it
# on the replica's own event loop, and route handle calls from that loop too, instead of handing every request
# to a user-code thread and a router loop: 1.1x the texts/s at 32 clients x 1 text on 2 cores (docs/benchmarks.md
# §5). Set per deployment (runtime_env), since Serve reads them at process start. Model replicas do the same for
# their user code (serve.settings.REPLICA_SERVE_ENV); they make no handle calls.
GATEWAY_SERVE_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


def json_response(body: dict | bytes, status: int = 200, headers: dict | None = None) -> Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return Response(content=content, status_code=status, media_type="application/json", headers=headers)


def _domain_error(exc: BaseException) -> BaseException:
    """Name Serve's own failures in our terms (replicas return client errors as values, not raised)."""
    if isinstance(exc, BackPressureError):
        return QueueFull(f"the model's replicas and queue are full ({exc.message}); retry later")
    if isinstance(exc, (DeploymentUnavailableError, RayActorError)):
        return Unavailable(f"no healthy replica for this model: {exc}")
    if isinstance(exc, ClientDisconnect):
        return ClientGone("the client closed the connection before its request body arrived")
    return exc


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The JSON body of a POST/PATCH: declared as JSON, at most `limit` bytes, received within `timeout_s`
    (a client that stalls or trickles does not hold a connection forever)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {int(declared)} bytes; the limit is {limit}: split the request")
    chunks, size = [], 0

    async def receive() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body larger than the limit of {limit} bytes: split the request")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(receive(), timeout_s)
    except asyncio.TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout_s:g} s ({size} bytes received"
                             + (f" of {declared} declared" if declared else "") + ")") from None
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if size and media != "application/json" and not media.endswith("+json"):
        got = f"Content-Type {media[:80]!r}" if media else "no Content-Type"
        raise UnsupportedMediaType(f"the request body must be JSON: send the header Content-Type: application/json "
                                   f"(got {got})")
    return b"".join(chunks)


def install_error_handlers(app: FastAPI) -> None:
    """Unknown paths, wrong methods and FastAPI's own validation answer in the OpenAI envelope too, and
    a trailing slash is an unknown path (not a 307 with an empty body)."""
    app.router.redirect_slashes = False

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        path = request.url.path
        shown = path if len(path) <= 120 else path[:117] + "..."
        if exc.status_code == 404:
            return error_response(NotFound(f"no route {request.method} {shown}; see /docs"))
        if exc.status_code == 405:  # every route of the path, not just the first one matched (one per method)
            allow = ", ".join(sorted({m for r in request.app.routes if getattr(r, "methods", None)
                                      and r.matches(request.scope)[0] != Match.NONE for m in r.methods} - {"HEAD"}))
            return error_response(MethodNotAllowed(f"method {request.method} is not allowed on {shown}"
                                                   + (f"; use {allow}" if allow else ""), allow))
        return error_response(InvalidRequest(str(exc.detail)[:200]))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body"))
        return error_response(InvalidRequest(f"invalid request: {where + ': ' if where else ''}"
                                             f"{first.get('msg', 'see /docs')}", where or None))


def error_response(exc: BaseException) -> Response:
    """The one place an exception becomes an HTTP answer; unknown errors are a 500 with no traceback."""
    exc = _domain_error(exc)
    status, err_type, code = status_of(exc)
    if isinstance(exc, ServeError):
        message, param = exc.message, exc.param
    else:
        log.exception("unhandled error in the gateway", exc_info=exc)
        message, param = "internal error; the gateway log has the details", None
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    if isinstance(exc, MethodNotAllowed) and exc.allow:
        headers = {"Allow": exc.allow}
    if isinstance(exc, Unauthorized):
        headers = {"WWW-Authenticate": 'Bearer realm="rayembed"'}
    return json_response(envelope(message, err_type, param, code), status, headers)


class RequestMetrics:
    def __init__(self):
        self.requests = metrics.Counter("rayembed_requests", "gateway requests by route and HTTP status",
                                        tag_keys=("route", "status"))
        self.latency = metrics.Histogram(
            "rayembed_request_ms", "gateway request latency", tag_keys=("route", "status"),
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000])

    def record(self, kind: str, status: int, start: float) -> None:
        tags = {"route": kind, "status": str(status)}
        self.requests.inc(tags=tags)
        self.latency.observe((time.perf_counter() - start) * 1000, tags=tags)


def api_route(kind: str, metrics_of: Callable[[], RequestMetrics]):
    """Wrap a route: map every exception through `error_response` and record metrics."""
    def wrap(fn):
        @functools.wraps(fn)
        async def route(*args, **kwargs):
            start = time.perf_counter()
            try:
                response = await fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - the single edge handler
                response = error_response(exc)
            metrics_of().record(kind, response.status_code, start)
            return response
        return route
    return wrap


class GatewayCore:
    """The routing table, the provider handles and the request handlers, without any HTTP routing."""

    def __init__(self, config: GatewayConfig, handles: dict[str, DeploymentHandle] | None = None,
                 workspaces: tuple[str, ...] = (), keys: KeyRing | None = KeyRing()):
        self.set_table(config, workspaces, keys)
        self.handles = dict(handles or {})  # provider name or app name -> handle
        self.metrics = RequestMetrics()
        self._pending: dict[str, list[tuple[tuple, asyncio.Future]]] = {}  # provider -> requests for the next call
        self._sending: set[asyncio.Task] = set()

    def set_table(self, config: GatewayConfig, workspaces: tuple[str, ...] | list[str] = (),
                  keys: KeyRing | None = KeyRing()) -> None:
        """`keys`: the API keys requests must carry (empty: none needed; None: not known yet, so refuse)."""
        self.config = config
        self.table = RoutingTable(config, workspaces)
        self.keys = keys

    def _handle(self, provider: ProviderSettings) -> DeploymentHandle:
        key = provider.app or provider.name
        handle = self.handles.get(key)
        if handle is None:  # a provider served by its own application (created by the control plane)
            try:
                handle = serve.get_app_handle(provider.app)
            except RayServeException as exc:
                raise Unavailable(f"no healthy replica for provider {provider.name!r}: application "
                                  f"{provider.app!r} is not running ({exc})") from None
            self.handles[key] = handle
        return handle

    async def _body(self, request: Request) -> EmbeddingRequest:
        limits = self.config.limits
        return parse_request(await read_body(request, limits.max_body_bytes, limits.body_timeout_s))

    async def _embed(self, body: EmbeddingRequest, provider: ProviderSettings, model: str) -> Response:
        result = await self._submit(provider, (body.texts(self.config.limits), body.input_type, body.truncate,
                                               body.dimensions))
        if isinstance(result, ServeError):
            raise result
        embeddings, tokens = result
        return json_response(render(embeddings, body.encoding_format, model, tokens))

    async def _submit(self, provider: ProviderSettings, request: tuple) -> tuple | ServeError:
        """One request's result from `provider`'s replicas. Requests for the same provider that reach this point in the
        same pass of the event loop go in one handle call (`embed_many`): under load many arrive together, and each
        handle call costs the gateway and the replica a Ray task. A request alone goes out at the end of the pass."""
        loop = asyncio.get_running_loop()
        key = provider.app or provider.name
        group = self._pending.get(key)
        if group is None:
            group = self._pending[key] = []
            loop.call_soon(self._flush, key, provider)
        future = loop.create_future()
        group.append((request, future))
        return await future

    def _flush(self, key: str, provider: ProviderSettings) -> None:
        group = [(request, future) for request, future in self._pending.pop(key) if not future.cancelled()]
        if group:
            task = asyncio.ensure_future(self._send(provider, group))
            self._sending.add(task)  # a reference, so the task is not collected mid-call
            task.add_done_callback(self._sending.discard)

    async def _send(self, provider: ProviderSettings, group: list[tuple[tuple, asyncio.Future]]) -> None:
        # An embedding is idempotent: a group whose replica died, or did not answer within the provider's
        # deadline (hung, stopped), is sent again; Serve's router prefers the replica with the shorter queue.
        timeout = provider.request_timeout_s
        try:
            for attempt in range(REPLICA_ATTEMPTS):
                try:
                    results = await asyncio.wait_for(
                        self._handle(provider).embed_many.remote([request for request, _ in group]), timeout)
                    break
                except RayActorError:  # ActorDiedError, ActorUnavailableError
                    if attempt == REPLICA_ATTEMPTS - 1:
                        raise
                    log.warning("a replica of provider %s failed mid-request; retrying", provider.name)
                except asyncio.TimeoutError:
                    if attempt == REPLICA_ATTEMPTS - 1:
                        raise UpstreamTimeout(f"provider {provider.name!r} did not answer within {timeout:g} s, "
                                              f"{REPLICA_ATTEMPTS} times; retry later") from None
                    log.warning("provider %s did not answer within %g s; retrying", provider.name, timeout)
        except Exception as exc:  # noqa: BLE001 - each request of the group answers with it
            for _, future in group:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(group, results):
            if not future.done():
                future.set_result(result)

    async def openai_embeddings(self, request: Request) -> Response:
        body = await self._body(request)
        _, provider = self.table.openai(body.model, access_of(request.scope))
        return await self._embed(body, provider, body.model)

    async def workspace_openai_embeddings(self, workspace: str, request: Request) -> Response:
        """The OpenAI route of one workspace: `model` is a model entity's name there (`workspace/name` of this
        workspace also works, so an id from its `/v1/models` goes back as it came)."""
        body = await self._body(request)
        _, provider = self.table.workspace_openai(workspace, body.model, access_of(request.scope))
        return await self._embed(body, provider, body.model)

    async def workspace_models(self, workspace: str, access: Access = OPEN) -> Response:
        return json_response(self.table.listing(self.table.workspace_routes(workspace, access)))

    async def model_embeddings(self, workspace: str, name: str, request: Request) -> Response:
        route, provider = self.table.entity(workspace, name, access_of(request.scope))
        return await self._embed(await self._body(request), provider, model_id(route))

    async def provider_embeddings(self, workspace: str, deployment: str, request: Request) -> Response:
        route, provider = self.table.provider(workspace, deployment, access_of(request.scope))
        return await self._embed(await self._body(request), provider, model_id(route))

    async def provider_models(self, workspace: str, deployment: str, access: Access = OPEN) -> Response:
        route, _ = self.table.provider(workspace, deployment, access)
        return json_response(self.table.listing([route]))

    async def models(self, access: Access = OPEN) -> Response:
        return json_response(self.table.listing(access=access))

    async def ready(self) -> Response:
        """Ready once every routed provider answers (each has at least one running replica)."""
        providers = list(self.table.providers.values())

        async def probe(p: ProviderSettings) -> str | None:
            try:
                await asyncio.wait_for(self._handle(p).info.remote(), READY_TIMEOUT_S)
                return None
            except Exception as exc:  # noqa: BLE001 - any failure means not ready
                return f"{p.name}: {type(exc).__name__}"

        failures = [f for f in await asyncio.gather(*(probe(p) for p in providers)) if f]
        private = self.keys is None or self.keys.enabled  # the probe needs no key, so it names nothing then
        if failures:
            raise Unavailable(f"not ready: {len(failures)} of {len(providers)} providers do not answer" if private
                              else "not ready: " + "; ".join(failures))
        return json_response({"status": "ready", "providers": len(providers) if private else [p.name for p in providers]})


def inference_routes(app: FastAPI, core: Callable[[], GatewayCore]) -> None:
    """Mount the inference routes on `app`; `core()` returns the replica's GatewayCore."""
    metrics_of = lambda: core().metrics  # noqa: E731
    embed = {"responses": answers(200, EmbeddingResponse, "one embedding per input, in order"),
             "openapi_extra": json_body(EmbeddingRequest)}

    @app.post("/v1/embeddings", operation_id="create_embeddings", summary="embeddings (OpenAI): `model` names a "
              "model entity (workspace/name, or name in the key's workspace) or a deployment", **embed)
    @api_route("openai", metrics_of)
    async def openai_embeddings(request: Request) -> Response:
        return await core().openai_embeddings(request)

    @app.post(GATEWAY + "/openai/-/v1/embeddings", operation_id="workspace_openai_embeddings",
              summary="embeddings (OpenAI) within one workspace: `model` names one of its model entities", **embed)
    @api_route("workspace_openai", metrics_of)
    async def workspace_openai_embeddings(workspace: str, request: Request) -> Response:
        return await core().workspace_openai_embeddings(workspace, request)

    @app.get(GATEWAY + "/openai/-/v1/models", operation_id="workspace_models",
             summary="the models served in one workspace (OpenAI)", responses=answers(200, ModelList, "its models"))
    @api_route("workspace_models", metrics_of)
    async def workspace_models(workspace: str, request: Request) -> Response:
        return await core().workspace_models(workspace, access_of(request.scope))

    @app.post(GATEWAY + "/model/{name}/-/v1/embeddings", operation_id="model_embeddings",
              summary="embeddings from a model entity (any provider serving it)", **embed)
    @api_route("model", metrics_of)
    async def model_embeddings(workspace: str, name: str, request: Request) -> Response:
        return await core().model_embeddings(workspace, name, request)

    @app.post(GATEWAY + "/provider/{deployment}/-/v1/embeddings", operation_id="provider_embeddings",
              summary="embeddings from one deployment's provider", **embed)
    @api_route("provider", metrics_of)
    async def provider_embeddings(workspace: str, deployment: str, request: Request) -> Response:
        return await core().provider_embeddings(workspace, deployment, request)

    @app.get(GATEWAY + "/provider/{deployment}/-/v1/models", operation_id="provider_models",
             summary="the model a provider serves", responses=answers(200, ModelList, "the provider's model"))
    @api_route("provider_models", metrics_of)
    async def provider_models(workspace: str, deployment: str, request: Request) -> Response:
        return await core().provider_models(workspace, deployment, access_of(request.scope))

    @app.get("/v1/models", operation_id="list_served_models", summary="the models the gateway routes to (OpenAI)",
             responses=answers(200, ModelList, "models routed to, in the key's workspaces"))
    @api_route("models", metrics_of)
    async def models(request: Request) -> Response:
        return await core().models(access_of(request.scope))

    @app.get("/v1/health/live", operation_id="live", summary="the gateway answers",
             responses=answers(200, Health, "live"))
    @api_route("live", metrics_of)
    async def live() -> Response:
        return json_response({"status": "live"})

    @app.get("/v1/health/ready", operation_id="ready", summary="every routed provider answers (503 until then)",
             responses=answers(200, Health, "ready"))
    @api_route("ready", metrics_of)
    async def ready() -> Response:
        return await core().ready()


app = FastAPI(title="rayembed inference gateway", docs_url="/docs", redoc_url=None)
# This replica's core. Serve ships the ingress class and the FastAPI app by value (cloudpickle), so
# the core lives in this importable module and is reached through named module-level functions,
# which cloudpickle passes by reference: a lambda or the class's own globals would be private copies.
_CORE: list[GatewayCore] = []


def installed_core() -> GatewayCore:
    return _CORE[0]


def install_core(core: GatewayCore) -> None:
    _CORE[:] = [core]


inference_routes(app, installed_core)
install_error_handlers(app)
app.add_middleware(BearerAuth, ring=lambda: installed_core().keys, on_error=error_response)  # the config's keys
install_openapi(app, [EmbeddingRequest])


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096, logging_config={"enable_access_log": False})
@serve.ingress(app)
class Gateway:
    """The standalone gateway over a fixed routing table (`python -m serve`, `serve run`)."""

    def __init__(self, config: dict, handles: dict[str, DeploymentHandle]):
        config = GatewayConfig.model_validate(config, context={"check_files": False})
        install_core(GatewayCore(config, handles, keys=config.auth.ring()))  # no keys and not open: every call 401
