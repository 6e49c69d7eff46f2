"""One Serve application per model deployment (generation): start it without blocking, read its
status, probe it with a real embedding, embed an evaluation set through it, delete it. Called from the ControlPlane actor."""

from __future__ import annotations

import logging

import numpy as np

from ray import serve
from ray.serve.api import RunTarget

from cluster.entities import ModelDeployment, ModelDeploymentConfig, ModelEntity
from serve.app import build_provider_app
from rayembed.errors import ServeError
from serve.settings import ProviderSettings

log = logging.getLogger(__name__)
PROBE_TEXT = "rayembed readiness probe"


def app_name(workspace: str, deployment: str, generation: int) -> str:
    return f"rayembed.{workspace}.{deployment}.g{generation}"


def provider_settings(dep: ModelDeployment, cfg: ModelDeploymentConfig, model: ModelEntity, generation: int) -> ProviderSettings:
    return ProviderSettings.model_validate({
        "name": app_name(dep.workspace, dep.name, generation), "model_dir": model.artifact.uri,
        "model_sha256": model.artifact.sha256,
        "num_replicas": cfg.num_replicas, "autoscaling": cfg.autoscaling.model_dump() if cfg.autoscaling else None,
        "num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus, "default_input_type": cfg.default_input_type,
        "default_dimensions": cfg.default_dimensions,
        "precision": cfg.precision, **cfg.batching.model_dump()})


def start(settings: ProviderSettings) -> None:
    """Deploy the provider's application and return at once (the reconciler watches it come up)."""
    serve.run_many([RunTarget(target=build_provider_app(settings.model_dump()), name=settings.name, route_prefix=None)],
                   wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)


def statuses() -> dict[str, tuple[str, str]]:
    """Every Serve application -> (status, message)."""
    return {name: (getattr(app.status, "value", str(app.status)), app.message or "")
            for name, app in serve.status().applications.items()}


def probe(app: str, expected_dim: int | None, timeout_s: float = 30) -> str | None:
    """Embed one text through the application; None when it answered with the right size, else why not."""
    try:
        result = serve.get_app_handle(app).embed.remote([PROBE_TEXT], "query", "END", None).result(timeout_s=timeout_s)
    except Exception as exc:  # noqa: BLE001 - any failure means not ready yet
        return f"probe failed: {type(exc).__name__}: {exc}"[:500]
    if isinstance(result, ServeError):
        return f"probe refused: {result.message}"
    embeddings, _ = result
    if expected_dim is not None and embeddings.shape != (1, expected_dim):
        return f"probe returned shape {embeddings.shape}, expected (1, {expected_dim})"
    return None


class _Answer:
    """A replica's answer to one `embed` call: `.result()` is the embeddings, or raises what went wrong."""

    def __init__(self, response, timeout_s: float):
        self.response, self.timeout_s = response, timeout_s

    def result(self) -> np.ndarray:
        out = self.response.result(timeout_s=self.timeout_s)
        if isinstance(out, ServeError):
            raise out
        return out[0]


def embedder(app: str, timeout_s: float = 120):
    """`embed(texts, input_type, dims)` -> an answer, through the application's replicas, truncating as a client
    that sends truncate=END (the job's evaluation truncates at max_seq_length too)."""
    handle = serve.get_app_handle(app)
    return lambda texts, input_type, dims: _Answer(handle.embed.remote(texts, input_type, "END", dims), timeout_s)


def replica_info(app: str, timeout_s: float = 30) -> dict:
    """What one of the application's replicas loaded (its graph, sizes, threads)."""
    return serve.get_app_handle(app).info.remote().result(timeout_s=timeout_s)


def delete(app: str) -> None:
    try:
        serve.delete(app, _blocking=False)
    except Exception as exc:  # noqa: BLE001 - already gone is fine
        log.warning("deleting Serve application %s: %s", app, exc)
