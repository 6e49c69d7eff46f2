"""Kubernetes manifests checked offline: KubeRay v1.7's CRD schemas (tests/kuberay/, Apache-2.0) with jsonschema, and
a serveConfigV2 against Ray Serve's own config schema."""

from __future__ import annotations

import functools
from pathlib import Path

import yaml

CRDS = Path(__file__).resolve().parent / "kuberay" / "crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml"}


@functools.cache
def crd_schema(kind: str) -> dict:
    crd = yaml.load((CRDS / CRD_FILES[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def crd_errors(manifest: dict) -> list[str]:
    """Every schema violation of a ray.io/v1 manifest, as 'path: message' (empty when it is valid)."""
    import jsonschema

    if manifest.get("apiVersion") != "ray.io/v1" or manifest.get("kind") not in CRD_FILES:
        return [f"apiVersion/kind: {manifest.get('apiVersion')}/{manifest.get('kind')} is not a KubeRay v1 kind"]
    validator = jsonschema.Draft7Validator(crd_schema(manifest["kind"]))
    return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(manifest)]


def serve_config(manifest: dict):
    """The RayService's serveConfigV2, parsed and validated by Ray Serve's ServeDeploySchema (raises when invalid)."""
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))


def run_applications(config, **overrides) -> list[str]:
    """`serve.run` every application of a validated Serve config on the connected Ray, as `serve deploy` builds them
    (import_path called with args); `overrides` replace an application's name or route_prefix. Their names."""
    from ray import serve
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    names = []
    for app in config.applications:
        target = call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), app.args)
        name, prefix = overrides.get("name", app.name), overrides.get("route_prefix", app.route_prefix)
        serve.run(target, name=name, route_prefix=prefix)
        names.append(name)
    return names
