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


def gateway_app(config: GatewayConfig) -> Application:
    handles = {p.name: EmbeddingReplica.options(**p.deployment_options()).bind(p.model_dump())
               for p in config.providers().values() if p.model_dir is not None}
    return Gateway.options(num_replicas=config.gateway_replicas).bind(config.model_dump(), handles)


def build_app(args: dict) -> Application:
    """Args: `config` (a routing-table YAML path) or the table itself (`models`, `limits`)."""
    if "config" in args:
        return gateway_app(load_gateway_config(Path(args["config"])))
    return gateway_app(load_gateway_config(args))


def build_provider_app(args: dict) -> Application:
    """Args: one provider's settings (name, model_dir, replicas, batching ...)."""
    provider = ProviderSettings.model_validate(args)
    return EmbeddingReplica.options(**provider.deployment_options()).bind(provider.model_dump())
