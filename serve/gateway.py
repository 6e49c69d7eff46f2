"""The inference gateway: a FastAPI ingress deployment that routes embeddings requests to replicas.

Routes by model entity, by provider, or by the OpenAI `model` field; answers every error with the
OpenAI envelope from one handler (`_error_response`), and records request metrics.
"""


import asyncio
import functools
import logging
import time

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import metrics
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException
from ray.serve.handle import DeploymentHandle

from serve.errors import PayloadTooLarge, QueueFull, ServeError, Unavailable, envelope, status_of
from serve.routing import RoutingTable, model_id
from serve.schemas import EmbeddingRequest, parse_request, render
from serve.settings import GatewayConfig, ProviderSettings

log = logging.getLogger("ray.serve")
app = FastAPI(title="rayembed inference gateway", docs_url="/docs", redoc_url=None)
GATEWAY = "/v2/workspaces/{workspace}/inference/gateway"
READY_TIMEOUT_S = 5.0


def _json(body: dict | bytes, status: int = 200, headers: dict | None = None) -> Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return Response(content=content, status_code=status, media_type="application/json", headers=headers)


def _domain_error(exc: BaseException) -> BaseException:
    """Name Serve's own failures in our terms (replicas return client errors as values, not raised)."""
    if isinstance(exc, BackPressureError):
        return QueueFull(f"the model's replicas and queue are full ({exc.message}); retry later")
    if isinstance(exc, (DeploymentUnavailableError, RayActorError)):
        return Unavailable(f"no healthy replica for this model: {exc}")
    return exc


def _error_response(exc: BaseException) -> Response:
    """The one place an exception becomes an HTTP answer; unknown errors are a 500 with no traceback."""
    exc = _domain_error(exc)
    status, err_type, code = status_of(exc)
    if isinstance(exc, ServeError):
        message, param = exc.message, exc.param
    else:
        log.exception("unhandled error in the gateway", exc_info=exc)
        message, param = "internal error; the gateway log has the details", None
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return _json(envelope(message, err_type, param, code), status, headers)


def _api(kind: str):
    """Wrap a route: map every exception through `_error_response` and record metrics."""
    def wrap(fn):
        @functools.wraps(fn)
        async def route(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                response = await fn(self, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - the single edge handler
                response = _error_response(exc)
            tags = {"route": kind, "status": str(response.status_code)}
            self._m_requests.inc(tags=tags)
            self._m_latency.observe((time.perf_counter() - start) * 1000, tags=tags)
            return response
        return route
    return wrap


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096, logging_config={"enable_access_log": False})
@serve.ingress(app)
class Gateway:
    def __init__(self, config: dict, handles: dict[str, DeploymentHandle]):
        self.config = GatewayConfig.model_validate(config, context={"check_files": False})
        self.table = RoutingTable(self.config)
        self.handles = dict(handles)  # provider -> handle (deployments of this application)
        self._m_requests = metrics.Counter("rayembed_requests", "gateway requests by route and HTTP status",
                                           tag_keys=("route", "status"))
        self._m_latency = metrics.Histogram(
            "rayembed_request_ms", "gateway request latency", tag_keys=("route", "status"),
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000])

    def _handle(self, provider: ProviderSettings) -> DeploymentHandle:
        handle = self.handles.get(provider.name)
        if handle is None:  # a provider served by its own application (created by the control plane)
            try:
                handle = self.handles[provider.name] = serve.get_app_handle(provider.app)
            except RayServeException as exc:
                raise Unavailable(f"no healthy replica for provider {provider.name!r}: application "
                                  f"{provider.app!r} is not running ({exc})") from None
        return handle

    async def _body(self, request: Request) -> EmbeddingRequest:
        limit = self.config.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"request body of {int(declared)} bytes; the limit is {limit}: split the request")
        raw = await request.body()
        if len(raw) > limit:
            raise PayloadTooLarge(f"request body of {len(raw)} bytes; the limit is {limit}: split the request")
        return parse_request(raw)

    async def _embed(self, body: EmbeddingRequest, provider: ProviderSettings, model: str) -> Response:
        texts = body.texts(self.config.limits)
        result = await self._handle(provider).embed.remote(texts, body.input_type, body.truncate, body.dimensions)
        if isinstance(result, ServeError):
            raise result
        embeddings, tokens = result
        return _json(render(embeddings, body.encoding_format, model, tokens))

    @app.post("/v1/embeddings")
    @_api("openai")
    async def openai_embeddings(self, request: Request) -> Response:
        body = await self._body(request)
        _, provider = self.table.openai(body.model)
        return await self._embed(body, provider, body.model)

    @app.post(GATEWAY + "/model/{name}/-/v1/embeddings")
    @_api("model")
    async def model_embeddings(self, workspace: str, name: str, request: Request) -> Response:
        route, provider = self.table.entity(workspace, name)
        return await self._embed(await self._body(request), provider, model_id(route))

    @app.post(GATEWAY + "/provider/{deployment}/-/v1/embeddings")
    @_api("provider")
    async def provider_embeddings(self, workspace: str, deployment: str, request: Request) -> Response:
        route, provider = self.table.provider(workspace, deployment)
        return await self._embed(await self._body(request), provider, model_id(route))

    @app.get(GATEWAY + "/provider/{deployment}/-/v1/models")
    @_api("provider_models")
    async def provider_models(self, workspace: str, deployment: str) -> Response:
        route, _ = self.table.provider(workspace, deployment)
        return _json(self.table.listing([route]))

    @app.get("/v1/models")
    @_api("models")
    async def models(self) -> Response:
        return _json(self.table.listing())

    @app.get("/v1/health/live")
    @_api("live")
    async def live(self) -> Response:
        return _json({"status": "live"})

    @app.get("/v1/health/ready")
    @_api("ready")
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
        if failures:
            raise Unavailable("not ready: " + "; ".join(failures))
        return _json({"status": "ready", "providers": [p.name for p in providers]})
