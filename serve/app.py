"""Serve application builders: `serve run serve.app:build_app config=...` / `serve deploy serve/config.yaml`.

`build_app` puts one EmbeddingReplica deployment per provider and the gateway in one application;
`build_provider_app` serves a single provider as its own application (one per model deployment,
as the control plane creates them), which a gateway reaches through `app:`.
"""

from __future__ import annotations

from pathlib import Path

from ray.serve import Application

from serve.gateway import GATEWAY_SERVE_ENV, Gateway
from serve.replica import EmbeddingReplica
from serve.settings import GatewayConfig, ProviderSettings, load_gateway_config


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
