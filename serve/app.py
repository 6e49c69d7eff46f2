"""Serve application builders: `serve run serve.app:build_app config=...` / `serve deploy serve/config.yaml`.

`build_app` puts one EmbeddingReplica deployment per provider and the gateway in one application;
`build_provider_app` serves a single provider as its own application (one per model deployment,
as the control plane creates them), which a gateway reaches through `app:`.
"""

from __future__ import annotations

from pathlib import Path

from ray.serve import Application

from serve.gateway import Gateway
from serve.replica import EmbeddingReplica
from serve.settings import GatewayConfig, ProviderSettings, load_gateway_config


# The gateway's code never blocks (parsing, routing, one awaited handle call, rendering), so its replicas run it
# on the replica's own event loop, and route handle calls from that loop too, instead of handing every request
# to a user-code thread and a router loop: 1.1x the texts/s at 32 clients x 1 text on 2 cores (docs/benchmarks.md
# §5). Model replicas keep Ray's defaults: ONNX Runtime blocks their user-code loop on purpose.
GATEWAY_SERVE_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


def gateway_actor_options(config: GatewayConfig) -> dict:
    env = {k: v for k, v in {**GATEWAY_SERVE_ENV, **config.gateway_env}.items() if v != ""}
    return {"num_cpus": 0, "runtime_env": {"env_vars": env}} if env else {"num_cpus": 0}


def gateway_app(config: GatewayConfig) -> Application:
    handles = {p.name: EmbeddingReplica.options(**p.deployment_options()).bind(p.model_dump())
               for p in config.providers().values() if p.model_dir is not None}
    actor = gateway_actor_options(config)
    return Gateway.options(num_replicas=config.gateway_replicas, ray_actor_options=actor).bind(config.model_dump(), handles)


def build_app(args: dict) -> Application:
    """Args: `config` (a routing-table YAML path) or the table itself (`models`, `limits`)."""
    if "config" in args:
        return gateway_app(load_gateway_config(Path(args["config"])))
    return gateway_app(load_gateway_config(args))


def build_provider_app(args: dict) -> Application:
    """Args: one provider's settings (name, model_dir, replicas, batching ...)."""
    provider = ProviderSettings.model_validate(args)
    return EmbeddingReplica.options(**provider.deployment_options()).bind(provider.model_dump())
