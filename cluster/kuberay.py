"""KubeRay manifests from the platform's own objects: `rayservice` is what `rayembed deployments export NAME --format
rayservice` writes, a RayService (ray.io/v1, KubeRay v1.7) whose serveConfigV2 serves one deployment's model artifact
behind the gateway on a serving-only cluster, sized from the deployment's config. deploy/kuberay/rayservice.yaml is
one such export, annotated."""

from __future__ import annotations

import math
import re
from importlib.metadata import PackageNotFoundError, version

import yaml

from cluster.serve_apps import provider_settings
from cluster.entities import ModelDeployment, ModelDeploymentConfig, ModelEntity
from rayembed import storage
from rayembed.errors import Conflict, InvalidRequest
from serve.settings import ProviderSettings

RAY_VERSION = "2.60.0"
SERVE_PORT = 8000  # KubeRay's serve Service targets the containers' port named "serve" (8000); 8080 is its metrics
GATEWAY_APP = "rayembed-gateway"
FORMATS = ("rayservice",)
SECRET = "rayembed"  # the bucket's credentials (and, on the platform's cluster, RAYEMBED_STORAGE and the database)
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def default_image() -> str:
    try:
        return f"rayembed:{version('rayembed')}-gpu"
    except PackageNotFoundError:
        return "rayembed:latest-gpu"


def k8s_name(name: str) -> str:
    """A Kubernetes object name (DNS-1123 label) from a platform name, which may hold '.', '_' and capitals."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:40].strip("-")
    if not label:
        raise InvalidRequest(f"{name!r} gives no Kubernetes name: pass one with `name`", "name")
    return label


def serve_config(workspace: str, model: str, provider: ProviderSettings) -> dict:
    """The Ray Serve config (ServeDeploySchema) of one model behind the gateway: the same routes as on the platform
    (by model entity, by provider, /v1/embeddings), the provider named like the deployment."""
    settings = provider.model_dump(mode="json", exclude_defaults=True)
    # the replicas and what each holds written out, defaults or not: what a reader of the manifest looks for
    sizing = {"autoscaling": provider.autoscaling.model_dump(mode="json")} if provider.autoscaling else \
        {"num_replicas": provider.num_replicas}
    settings.pop("num_replicas", None)
    settings = {"name": provider.name, **settings, **sizing, "num_cpus": provider.num_cpus, "num_gpus": provider.num_gpus}
    return {"proxy_location": "EveryNode", "http_options": {"host": "0.0.0.0", "port": SERVE_PORT},
            "applications": [{"name": GATEWAY_APP, "route_prefix": "/", "import_path": "serve.app:build_app",
                              "args": {"models": [{"workspace": workspace, "name": model, "providers": [settings]}]}}]}


def _container(name: str, image: str, resources: dict, ports: list[dict] | None = None) -> dict:
    container = {"name": name, "image": image, "imagePullPolicy": "IfNotPresent",
                 "envFrom": [{"secretRef": {"name": SECRET, "optional": True}}],
                 "resources": {"requests": dict(resources), "limits": dict(resources)}}
    if ports:
        container["ports"] = ports
    return container


def replica_memory_gib(model: ModelEntity) -> int:
    """One replica's memory: the fp32 weights about three times over (graph, ONNX Runtime's session and arena), plus
    the process; 4 GiB when the parameter count is unknown."""
    if not model.parameter_count:
        return 4
    return math.ceil(model.parameter_count * 4 * 3 / 2**30) + 2


def worker_group(cfg: ModelDeploymentConfig, model: ModelEntity, image: str) -> dict:
    """One pod per replica on CPU; on GPU, as many replicas per one-GPU pod as their num_gpus allows. Autoscaling
    deployments get the pods' range, and KubeRay's autoscaler follows Serve's replicas within it."""
    low, high = (cfg.autoscaling.min_replicas, cfg.autoscaling.max_replicas) if cfg.autoscaling else \
        (cfg.num_replicas, cfg.num_replicas)
    gpu = cfg.num_gpus > 0
    per_pod = max(1, int(1 // cfg.num_gpus)) if gpu else 1
    pods = lambda replicas: math.ceil(replicas / per_pod)  # noqa: E731
    cpus = max(1, math.ceil(cfg.num_cpus * per_pod))
    resources = {"cpu": str(cpus), "memory": f"{replica_memory_gib(model) * per_pod}Gi"}
    spec: dict = {"containers": [_container("ray-worker", image, {**resources, **({"nvidia.com/gpu": 1} if gpu else {})})]}
    if gpu:
        spec["tolerations"] = [dict(GPU_TOLERATION)]
    return {"groupName": "serve-gpu" if gpu else "serve-cpu", "replicas": pods(low), "minReplicas": pods(low),
            "maxReplicas": pods(high), "rayStartParams": {}, "template": {"spec": spec}}


def rayservice(dep: ModelDeployment, cfg: ModelDeploymentConfig, model: ModelEntity, *, image: str | None = None,
               name: str | None = None) -> dict:
    """The RayService manifest that serves `dep`'s model as the platform serves it now."""
    if model.artifact is None or not storage.is_uri(model.artifact.uri):
        where = model.artifact.uri if model.artifact else "nowhere yet"
        raise Conflict(f"model {model.name!r} is stored at {where}, a path on this platform's own nodes that another "
                       "cluster cannot read: run the platform with RAYEMBED_STORAGE set to a shared URI "
                       "(s3://bucket/prefix) and register or train the model there", "model")
    image = image or default_image()
    provider = provider_settings(dep, cfg, model, generation=0).model_copy(update={"name": dep.name})
    head = {"rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
            "template": {"spec": {"containers": [_container("ray-head", image, {"cpu": "2", "memory": "8Gi"}, [
                {"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                {"containerPort": 10001, "name": "client"}, {"containerPort": SERVE_PORT, "name": "serve"}])]}}}
    cluster = {"rayVersion": RAY_VERSION, "authOptions": {"mode": "token"},
               "enableInTreeAutoscaling": cfg.autoscaling is not None,
               "headGroupSpec": head, "workerGroupSpecs": [worker_group(cfg, model, image)]}
    if cfg.autoscaling is not None:
        cluster["autoscalerOptions"] = {"upscalingMode": "Default", "idleTimeoutSeconds": 300}
    labels = {"app.kubernetes.io/name": "rayembed", "rayembed/workspace": k8s_name(dep.workspace),
              "rayembed/model": k8s_name(model.name)}
    annotations = {"rayembed/artifact": model.artifact.uri, "rayembed/exported-from": f"{dep.workspace}/{dep.name}"}
    if model.artifact.sha256:
        annotations["rayembed/artifact-sha256"] = model.artifact.sha256
    return {"apiVersion": "ray.io/v1", "kind": "RayService",
            "metadata": {"name": k8s_name(name or dep.name), "labels": labels, "annotations": annotations},
            "spec": {"serveConfigV2": render(serve_config(dep.workspace, model.name, provider)),
                     "rayClusterConfig": cluster}}


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2) as literal blocks, as KubeRay's samples write them."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def render(manifest: dict) -> str:
    return yaml.dump(manifest, Dumper=_Dumper, sort_keys=False)
