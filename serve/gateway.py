"""The inference gateway: routes embeddings requests to replicas by model entity, by provider, or by
the OpenAI `model` field (globally or within one workspace). Its HTTP edge (bodies, errors in the OpenAI envelope,
metrics) is serve/http.py, shared with the platform's API.

`GatewayCore` holds the routing table (swappable at run time) and the handlers; `inference_routes`
mounts them on any FastAPI app: the standalone `Gateway` deployment here, and the control plane's
API ingress (cluster/api.py), whose table follows the deployments the control plane reports READY.
"""


import asyncio
import logging
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from serve.auth import OPEN, Access, BearerAuth, KeyRing, access_of
from serve.http import (ANSWERED_BY, MODEL_HEADER, RequestMetrics, api_route, error_response, install_error_handlers, json_response,
                         read_body)
from rayembed.errors import ServeError, Unavailable, UpstreamTimeout
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


class GatewayCore:
    """The routing table, the provider handles and the request handlers, without any HTTP routing."""

    def __init__(self, config: GatewayConfig, handles: dict[str, DeploymentHandle] | None = None,
                 workspaces: tuple[str, ...] = (), keys: KeyRing | None = KeyRing()):
        self.set_table(config, workspaces, keys)
        self.handles = dict(handles or {})  # provider name or app name -> handle
        self.metrics = RequestMetrics()
        self._pending: dict[str, list[tuple[tuple, asyncio.Future]]] = {}  # provider -> requests for the next call
        self._sending: set[asyncio.Task] = set()
        self._http = None  # aiohttp's session to the providers' own routes (made on the replica's loop, when first used)

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

    async def _openai(self, request: Request, route) -> Response:
        """An OpenAI route's request: the body read and checked here, routed by its `model`; to a provider that
        answers its own route over HTTP (`direct_url`) the body goes as it came, else through the app handle."""
        limits = self.config.limits
        raw = await read_body(request, limits.max_body_bytes, limits.body_timeout_s)
        body = parse_request(raw)
        _, provider = route(body.model, access_of(request.scope))
        if provider.direct_url:
            forwarded = await self._forward(provider, raw, request, body.model)
            if forwarded is not None:
                return forwarded
        return await self._embed(body, provider, body.model)

    async def _forward(self, provider: ProviderSettings, raw: bytes, request: Request, model: str) -> Response | None:
        """POST the body to the provider's own route over one keep-alive pool (its answer, errors included, goes back
        as it is); None when it cannot be reached, so the handle path answers instead."""
        import aiohttp

        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256, ttl_dns_cache=None),
                                               timeout=aiohttp.ClientTimeout(total=provider.request_timeout_s))
        headers = {"Content-Type": "application/json", MODEL_HEADER: model}
        if auth := request.headers.get("authorization"):
            headers["Authorization"] = auth
        try:
            async with self._http.post(provider.direct_url, data=raw, headers=headers) as answer:
                content = await answer.read()
                kept = {k: v for k, v in answer.headers.items()
                        if k.lower() in ("retry-after", "www-authenticate", "allow", ANSWERED_BY)}
                return Response(content=content, status_code=answer.status, media_type="application/json", headers=kept)
        except (aiohttp.ClientError, OSError) as exc:
            log.warning("provider %s did not answer on %s (%s); through its handle instead", provider.name,
                        provider.direct_url, exc)
            return None

    async def openai_embeddings(self, request: Request) -> Response:
        return await self._openai(request, self.table.openai)

    async def workspace_openai_embeddings(self, workspace: str, request: Request) -> Response:
        """The OpenAI route of one workspace: `model` is a model entity's name there (`workspace/name` of this
        workspace also works, so an id from its `/v1/models` goes back as it came)."""
        return await self._openai(request, lambda model, access: self.table.workspace_openai(workspace, model, access))

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
              "model entity (workspace/name, or a bare name in the default workspace)", **embed)
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
