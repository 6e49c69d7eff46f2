"""What every service of the control plane shares: the store, its lock, names, body validation, the Ray jobs client."""

from __future__ import annotations

import logging
import time
from typing import Any

from pydantic import ValidationError

from cluster.tenancy import Confinement
from cluster.entities import (JOB_DONE, NAME, CustomizationJob, Dataset, Entity, ModelDeployment, ModelDeploymentConfig,
                              ModelEntity, ModelProvider, Workspace)
from cluster.store import redacted
from rayembed import storage
from rayembed.errors import Conflict, InvalidName, InvalidRequest, NotFound, QuotaExceeded, shown

log = logging.getLogger(__name__)
NAME_RULE = "2-63 characters of lowercase letters, digits and '-', starting with a letter or digit"
PENDING_TIMEOUT_S = 900.0
SUBMIT_TIMEOUT_S = 120.0  # a job still `created` this long after its row was written was never submitted
RETIRE_AFTER_S = 5.0  # an old generation keeps serving this long after the routes moved (gateways poll at 0.5 s)
DEFAULT_GPU_MEMORY_GIB = 80.0
# what the control plane passes on to its jobs (storage credentials and node-local folders come from each node)
JOB_ENV = ("RAYEMBED_ACCELERATOR_TYPE",)
KIND_OF = {Workspace: "workspace", ModelEntity: "model", CustomizationJob: "job", Dataset: "dataset",
           ModelDeploymentConfig: "deployment_config", ModelDeployment: "deployment", ModelProvider: "provider"}
WHAT = {"model": "model", "job": "customization job", "dataset": "dataset", "deployment_config": "deployment config",
        "deployment": "deployment", "provider": "provider"}


def check_name(name: Any, what: str, field: str = "name") -> str:
    if name is None:
        raise InvalidName(f"{field} is required: the {what} name ({NAME_RULE})", field)
    if not isinstance(name, str) or not NAME.match(name):
        raise InvalidName(f"{what} name {shown(name)} is invalid: use {NAME_RULE}", field)
    return name


def validated(model: type, body: dict, what: str, **fixed: Any):
    """`body` (with `fixed` fields) as `model`, or the error naming each field at fault and what is wrong."""
    try:
        return model.model_validate({**body, **fixed})
    except ValidationError as exc:
        errors = exc.errors()
        where = lambda e: ".".join(map(str, e["loc"])) or what  # noqa: E731
        if all(e["type"] == "string_pattern_mismatch" for e in errors):  # a name: the rule, as check_name says it
            e = errors[0]
            raise InvalidName(f"{where(e)} {shown(e['input'])} is invalid: use {NAME_RULE}", where(e)) from None
        problems = "; ".join(f"{where(e)}: {e['msg']}" for e in errors)
        raise InvalidRequest(f"invalid {what}: {problems}", where(errors[0])) from None


class Core:
    """The state the services share (set up by ControlPlane.__init__) and the plumbing over it."""

    def _jobs_client(self):
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(self.dashboard_url)
        return self._client

    def _save(self, entity) -> None:
        kind = KIND_OF[type(entity)]
        workspace = "" if kind == "workspace" else entity.workspace
        self.store.put(kind, workspace, entity.name, entity.model_dump(mode="json"))

    def _load(self, kind: str, workspace: str, name: str, model: type):
        check_name(name, WHAT.get(kind, kind))
        body = self.store.get(kind, workspace, name)
        if body is None:
            raise NotFound(f"{WHAT.get(kind, kind)} {name!r} does not exist in workspace {workspace!r}")
        return model.model_validate(body)

    def _all(self, kind: str, model: type, workspace: str | None = None) -> list:
        return [model.model_validate(b) for b in self.store.list(kind, workspace)]

    def _workspace(self, workspace: str) -> str:
        check_name(workspace, "workspace")
        if self.store.get("workspace", "", workspace) is None:
            raise NotFound(f"workspace {workspace!r} does not exist; create it with POST /v2/workspaces")
        return workspace

    def _confinement(self, workspace: str) -> Confinement:
        """Where a tenant's jobs in `workspace` may read besides their own datasets: its grants, the global roots."""
        ws = Workspace.model_validate(self.store.get("workspace", "", workspace) or {"name": workspace})
        return Confinement([*ws.data_grants, *self.data_roots])

    def _quota(self, workspace: str):
        return Workspace.model_validate(self.store.get("workspace", "", workspace) or {"name": workspace}).quota

    def _trainable_model(self, workspace: str, value: Any, field: str) -> str:
        """What a tenant's `model` names, as the job reads it: a model entity of the workspace (its merged weights,
        or the allowed base model it was exported from) or an allowed base model. Nothing else: not a path, not a
        Hub id the operator did not list (it would be downloaded and loaded on the cluster)."""
        if isinstance(value, str) and NAME.match(value) and (body := self.store.get("model", workspace, value)):
            model = ModelEntity.model_validate(body)
            if model.status != "ready":
                raise Conflict(f"{field}: model {value!r} is {model.status}; wait until it is ready")
            if model.artifact.hf_uri:
                return model.artifact.hf_uri
            if model.base_model in self.base_models:
                return model.base_model
            raise InvalidRequest(f"{field}: model {value!r} holds no trainable weights (it was registered from an "
                                 "ONNX folder); name the base model it came from", field)
        if isinstance(value, str) and value in self.base_models:
            return value
        raise InvalidRequest(f"{field}: {shown(value)} is neither a model of this workspace nor an allowed base model "
                             f"({', '.join(self.base_models)}); register it first (POST .../models) or ask the operator "
                             "to allow it (RAYEMBED_BASE_MODELS)", field)

    def _quota_for_job(self, workspace: str) -> None:
        """The workspace's limit on jobs (and model exports) not yet finished."""
        quota = self._quota(workspace)
        active = [j for j in self._all("job", CustomizationJob, workspace) if j.status not in JOB_DONE]
        active += [m for m in self._all("model", ModelEntity, workspace) if m.status == "exporting"]
        if len(active) >= quota.max_active_jobs:
            raise QuotaExceeded(f"workspace {workspace!r} has {len(active)} unfinished jobs and exports, its quota "
                                f"(max_active_jobs {quota.max_active_jobs}); wait for one to finish or cancel one",
                                "config")

    def _quota_for_deployment(self, workspace: str, cfg, name: str) -> None:
        """The workspace's limits on replicas (over all its deployments but `name`, plus this one at its most) and on
        the CPUs and GPUs of one deployment."""
        quota = self._quota(workspace)
        most = lambda c: c.autoscaling.max_replicas if c.autoscaling else c.num_replicas  # noqa: E731
        replicas = most(cfg)
        cpus, gpus = cfg.num_cpus * replicas, cfg.num_gpus * replicas
        limits = [(cpus, quota.max_cpus_per_deployment, "max_cpus_per_deployment", "CPUs"),
                  (gpus, quota.max_gpus_per_deployment, "max_gpus_per_deployment", "GPUs")]
        for used, limit, key, what in limits:
            if used > limit:
                raise QuotaExceeded(f"deployment {name!r} would reserve {used:g} {what} ({replicas} replicas); the "
                                    f"workspace's quota is {limit:g} ({key}): use fewer replicas or smaller ones")
        others = 0
        for dep in self._all("deployment", ModelDeployment, workspace):
            body = self.store.get("deployment_config", workspace, dep.config) if dep.name != name else None
            if body is not None:
                others += most(ModelDeploymentConfig.model_validate(body))
        if others + replicas > quota.max_replicas:
            raise QuotaExceeded(f"workspace {workspace!r} runs up to {others} replicas in its other deployments; "
                                f"{replicas} more pass its quota (max_replicas {quota.max_replicas})")

    def _workspace_root(self, workspace: str) -> str:
        """The workspace's folder in the storage root: by its id, never reused, so a workspace created again under
        an old name never reaches the old one's files (a workspace from before ids keeps `workspaces/<name>`)."""
        body = self.store.get("workspace", "", workspace) or {}
        uid = body.get("uid") or ""
        return storage.join(self.storage, "workspaces", f"{workspace}-{uid}" if uid else workspace)

    def _bump_routes(self) -> None:
        self._routes_version = time.time_ns()

    def ping(self) -> dict:
        return {"ok": True, "schema_version": self.store.schema_version(), "home": str(self.home), "storage": self.storage,
                "state": redacted(self.state_url),
                "api_keys": len(self.store.list("apikey")), "data_roots": self.data_roots, "base_models": self.base_models,
                "open": self.open_mode()}

    def _fresh(self, entity: Entity, model: type):
        """The stored entity if nobody changed it since `entity` was read, else None (skip this tick)."""
        body = self.store.get(KIND_OF[model], entity.workspace, entity.name)
        if body is None or body["updated_at"] != entity.updated_at:
            return None
        return model.model_validate(body)

