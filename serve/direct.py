"""A provider that answers its own provider route: one hop fewer than through the gateway.

`python -m serve` runs each provider as its own Serve application whose route prefix is the gateway's
provider route (`/v2/workspaces/<ws>/inference/gateway/provider/<name>/-`), so Serve's ingress (HAProxy, or
its proxy) sends `<that>/v1/embeddings` straight to the provider's replicas, which parse, batch and render
it themselves (docs/benchmarks.md §5). The gateway still owns `/v1/embeddings` (routing by the `model` field),
the model-entity route and the listings, and reaches the same replicas through their application handle.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve
from ray.serve import Application

from rayembed.errors import NotFound, ServeError
from serve.auth import BearerAuth, access_of
from serve.gateway import GATEWAY
from serve.http import (ANSWERED_BY, MODEL_HEADER, RequestMetrics, api_route, error_response, install_error_handlers, json_response,
                         read_body)
from serve.replica import EmbeddingReplica
from serve.routing import RoutingTable
from serve.schemas import parse_request, render
from serve.settings import GatewayAuth, GatewayConfig, Limits, ProviderSettings


def provider_prefix(workspace: str, provider: str) -> str:
    """The route prefix under which the gateway serves this provider (and its own application answers)."""
    return GATEWAY.format(workspace=workspace) + f"/provider/{provider}/-"


app = FastAPI(title="rayembed provider", docs_url=None, redoc_url=None)
# This replica. Serve ships the ingress class and the FastAPI app by value (cloudpickle), so, as in
# serve/gateway.py, the instance lives in this importable module, set and read through its functions.
_REPLICA: list["ProviderIngress"] = []


def installed() -> "ProviderIngress":
    return _REPLICA[0]


def install(replica: "ProviderIngress") -> None:
    _REPLICA[:] = [replica]


def _metrics() -> RequestMetrics:
    return installed().request_metrics


@app.post("/v1/embeddings")
@api_route("provider_direct", _metrics)
async def embeddings(request: Request) -> Response:
    replica = installed()
    if not access_of(request.scope).allows(replica.workspace):  # as the gateway answers another workspace's provider
        raise NotFound(f"no provider here for workspace {replica.workspace!r}")
    limits = replica.limits
    body = parse_request(await read_body(request, limits.max_body_bytes, limits.body_timeout_s))
    result = await replica.embed(body.texts(limits), body.input_type, body.truncate, body.dimensions)
    if isinstance(result, ServeError):
        raise result
    vectors, tokens = result
    # a gateway forwarding the OpenAI route names the model as its client did (workspace/name, or the bare name)
    named = request.headers.get(MODEL_HEADER) or replica.model
    return json_response(render(vectors, body.encoding_format, named[:200], tokens), headers={ANSWERED_BY: "provider"})


@app.get("/v1/models")
@api_route("provider_direct_models", _metrics)
async def models() -> Response:
    return json_response({"object": "list", "data": [installed().listing]})


install_error_handlers(app)
app.add_middleware(BearerAuth, ring=lambda: installed().keys, on_error=error_response)  # the gateway's keys, here too


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 1}, logging_config={"enable_access_log": False})
@serve.ingress(app)
class ProviderIngress(EmbeddingReplica.func_or_class):
    """An EmbeddingReplica that also answers HTTP under its application's route prefix. Its handle methods
    (`embed`, `info`) are the plain replica's, so the gateway calls it like any provider application."""

    def __init__(self, settings: dict, listing: dict, limits: dict, auth: dict | None = None, workspace: str = "default"):
        """`listing`: the model entity as the gateway's /v1/models lists it (its id names the responses); `auth`: the
        gateway's key settings (serve.settings.GatewayAuth), checked on this route as on the gateway's."""
        super().__init__(settings)
        self.listing, self.model, self.workspace = listing, listing["id"], workspace
        self.limits = Limits.model_validate(limits)
        self.keys = GatewayAuth.model_validate(auth or {}).ring()
        self.request_metrics = RequestMetrics()
        install(self)  # a module function: the class travels by value, its globals would be a copy


def standalone_apps(config: GatewayConfig, gateway_name: str, base_url: str | None = None) -> list[tuple[str, Application, str]]:
    """(application name, application, route prefix) for `python -m serve`: each provider with a model_dir as
    its own application answering its provider route, then the gateway at / over them (through `app:`, and, given
    Serve's HTTP address `base_url`, over HTTP: the gateway forwards `/v1/embeddings` to the provider's route)."""
    from serve.app import gateway_app

    apps, models, table = [], [], RoutingTable(config)
    for route in config.models:
        providers = []
        for p in route.providers:
            if p.model_dir is None:  # already served by another application
                providers.append(p)
                continue
            name = f"{gateway_name}.{route.workspace}.{p.name}"
            listing = table.listing([route])["data"][0]
            target = ProviderIngress.options(**p.deployment_options()).bind(
                p.model_dump(), listing, config.limits.model_dump(), config.auth.model_dump(), route.workspace)
            apps.append((name, target, provider_prefix(route.workspace, p.name)))
            direct = f"{base_url}{provider_prefix(route.workspace, p.name)}/v1/embeddings" if base_url else None
            providers.append(ProviderSettings.model_validate({**p.model_dump(), "model_dir": None, "app": name,
                                                              "direct_url": direct}))
        models.append(route.model_copy(update={"providers": providers}))
    apps.append((gateway_name, gateway_app(config.model_copy(update={"models": models})), "/"))
    return apps
