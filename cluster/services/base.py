"""What every service of the control plane shares: the Context (the store, storage, the Ray adapters, the
operator's settings) and its record plumbing (load, create, compare-and-set, admission), names, body validation.

No service holds a lock: each write is a compare-and-set on the entity it read (cluster.store), and the checks that
span entities of a workspace (quotas, a name not yet taken, a dataset no job reads) are admissions, which end with a
compare-and-set on the workspace's record: of two concurrent admissions one wins and the other checks again."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from pydantic import ValidationError

from cluster.tenancy import Confinement
from cluster.entities import (JOB_DONE, NAME, CustomizationJob, Dataset, ModelDeployment, ModelDeploymentConfig,
                              ModelEntity, ModelProvider, Workspace)
from cluster import schemas, search
from cluster.schemas import NAME_DOC as NAME_RULE
from cluster.store import Store
from rayembed import storage
from rayembed.errors import Conflict, InvalidName, InvalidRequest, NotFound, QuotaExceeded, Unavailable, shown

log = logging.getLogger(__name__)
T = TypeVar("T")
TRIES = 8  # a compare-and-set lost this many times in a row: the caller gets a 503 to retry
PENDING_TIMEOUT_S = 900.0
SUBMIT_TIMEOUT_S = 120.0  # a job still `created` this long after its row was written was never submitted
RETIRE_AFTER_S = 5.0  # an old generation keeps serving this long after the routes moved (gateways poll at 0.5 s)
DEFAULT_GPU_MEMORY_GIB = 80.0
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


class Checked(dict):
    """A request body `check_body` accepted (the API ingress checks every body before the actor is called)."""


def _model_body(body: dict) -> None:
    base, artifact = body.get("base_model"), body.get("artifact")
    if (base is None) == (artifact is None):
        raise InvalidRequest("give exactly one of base_model (exported once) or artifact (an ONNX folder)", "base_model")
    for key, value in (("base_model", base), ("artifact", artifact)):
        if value is not None and not isinstance(value, str):
            raise InvalidRequest(f"{key} must be a string (a folder path or model name), not {shown(value)}", key)


def _job_body(body: dict) -> None:
    if ("config" in body) == ("sweep" in body):
        raise InvalidRequest("give exactly one of config (a training job config) or sweep (a learning-rate sweep)", "config")
    kind = "sweep" if "sweep" in body else "config"
    if not isinstance(body[kind], dict):
        raise InvalidRequest(f"{kind} must be a JSON object", "config")


# each management call that takes a body: its model (cluster/schemas.py), what it is called, the field holding the
# new entity's name (checked first, with the rule), and any check of its shape made before the model's
BODIES: dict[str, tuple[type, str, str | None, Callable[[dict], None] | None]] = {
    "create_workspace": (schemas.WorkspaceCreate, "workspace", "name", None),
    "create_dataset": (schemas.DatasetCreate, "dataset", "name", None),
    "create_model": (schemas.ModelCreate, "model", "name", _model_body),
    "create_job": (schemas.JobCreate, "customization job", "output_model", _job_body),
    "create_deployment_config": (schemas.DeploymentConfigCreate, "deployment config", "name", None),
    "update_deployment_config": (schemas.DeploymentConfigUpdate, "deployment config change", None, None),
    "create_deployment": (schemas.DeploymentCreate, "deployment", "name", None),
    "update_deployment": (schemas.DeploymentUpdate, "deployment change", None, None),
    "search_deployment": (search.SearchRequest, "search", None, None),
}


def check_body(method: str, body: Any) -> Checked:
    """The body of management call `method`, checked once: by the API ingress before the actor is called, or by the
    service for a Ray caller (the CLI). A body already checked passes as it is."""
    if isinstance(body, Checked):
        return body
    if not isinstance(body, dict):
        raise InvalidRequest(f"the request body must be a JSON object, not {shown(body)}", "body")
    model, what, name_field, shape = BODIES[method]
    if name_field is not None:
        check_name(body.get(name_field), "output model" if name_field == "output_model" else what, name_field)
    if shape is not None:
        shape(body)
    validated(model, body, what)
    return Checked(body)


class Routes:
    """The version of the gateway's routing table: a change to keys, workspaces or providers bumps it."""

    def __init__(self) -> None:
        self.version = time.time_ns()  # a restart changes it, so every gateway re-reads the routes

    def bump(self) -> None:
        self.version = max(time.time_ns(), self.version + 1)


@dataclass
class Context:
    """What the services are built with: the store, the storage root and the operator's settings, and the adapters
    to Ray's job API (cluster.ray_jobs.RayJobs) and to Serve (the cluster.serve_apps module, or a fake in a test)."""

    store: Store
    storage: str  # datasets, jobs' outputs, models: shared by every node
    home: Path
    ray_jobs: Any
    serve: Any
    base_url: str = ""
    data_roots: list[str] = field(default_factory=list)  # single-tenant installs: where every workspace's jobs may read
    base_models: list[str] = field(default_factory=list)  # what a tenant may name as a job's or a model's base
    routes: Routes = field(default_factory=Routes)

    # ---------------------------------------------------------------- records
    def save(self, entity) -> None:
        """Write `entity` whatever is stored (a test's fixture, a setting); services compare-and-set instead."""
        kind = KIND_OF[type(entity)]
        self.store.put(kind, "" if kind == "workspace" else entity.workspace, entity.name, entity.model_dump(mode="json"))

    def create(self, entity, what: str | None = None) -> None:
        """Store a new entity, or 409 when its name is taken (an insert only if absent: no race between two creates)."""
        kind = KIND_OF[type(entity)]
        workspace = "" if kind == "workspace" else entity.workspace
        if not self.store.put(kind, workspace, entity.name, entity.model_dump(mode="json"), expect=None):
            where = "" if kind == "workspace" else f" in workspace {workspace!r}"
            raise Conflict(f"{what or WHAT.get(kind, kind)} {entity.name!r} already exists{where}")

    def replace(self, old, new):
        """`new` in place of `old` if nobody changed it since `old` was read (compare-and-set): `new` stamped later
        than `old`, or None when the race was lost."""
        kind = KIND_OF[type(old)]
        new = new.model_copy(update={"updated_at": max(round(time.time(), 3), round(old.updated_at + 0.001, 3))})
        workspace = "" if kind == "workspace" else old.workspace
        if self.store.put(kind, workspace, old.name, new.model_dump(mode="json"), expect=old.updated_at):
            return new
        return None

    def remove(self, entity) -> bool:
        """Delete `entity` if it is still the version read."""
        kind = KIND_OF[type(entity)]
        return self.store.delete(kind, "" if kind == "workspace" else entity.workspace, entity.name, expect=entity.updated_at)

    def modify(self, load: Callable[[], T], change: Callable[[T], T]) -> T:
        """Read, change, compare-and-set; read again while another writer wins. `change` raises to refuse, and
        returns what it got to change nothing."""
        for _ in range(TRIES):
            current = load()
            new = change(current)
            if new is current:
                return current
            if (done := self.replace(current, new)) is not None:
                return done
        raise Unavailable("the entity kept changing while this request ran; retry")

    def admitted(self, workspace: str, attempt: Callable[[], T], undo: Callable[[T], None]) -> T:
        """Checks that span a workspace's entities, made safe against concurrent requests: `attempt` reads, checks
        and writes, then the workspace's record is compare-and-set. Another admission in the workspace meanwhile
        makes that fail: `undo` this attempt's writes, then check again against what the other one wrote."""
        for _ in range(TRIES):
            ws = Workspace.model_validate(self.store.get("workspace", "", self.workspace(workspace)))
            result = attempt()
            if self.replace(ws, ws) is not None:
                return result
            undo(result)
        raise Unavailable(f"workspace {workspace!r} kept changing while this request ran; retry")

    def load(self, kind: str, workspace: str, name: str, model: type):
        check_name(name, WHAT.get(kind, kind))
        body = self.store.get(kind, workspace, name)
        if body is None:
            raise NotFound(f"{WHAT.get(kind, kind)} {name!r} does not exist in workspace {workspace!r}")
        return model.model_validate(body)

    def all(self, kind: str, model: type, workspace: str | None = None) -> list:
        return [model.model_validate(b) for b in self.store.list(kind, workspace)]

    # ---------------------------------------------------------------- workspaces: existence, folder, limits
    def workspace(self, workspace: str) -> str:
        check_name(workspace, "workspace")
        if self.store.get("workspace", "", workspace) is None:
            raise NotFound(f"workspace {workspace!r} does not exist; create it with POST /v2/workspaces")
        return workspace

    def workspace_root(self, workspace: str) -> str:
        """The workspace's folder in the storage root: by its id, never reused, so a workspace created again under
        an old name never reaches the old one's files (a workspace from before ids keeps `workspaces/<name>`)."""
        body = self.store.get("workspace", "", workspace) or {}
        uid = body.get("uid") or ""
        return storage.join(self.storage, "workspaces", f"{workspace}-{uid}" if uid else workspace)

    def confinement(self, workspace: str) -> Confinement:
        """Where a tenant's jobs in `workspace` may read besides their own datasets: its grants, the global roots."""
        ws = Workspace.model_validate(self.store.get("workspace", "", workspace) or {"name": workspace})
        return Confinement([*ws.data_grants, *self.data_roots])

    def quota(self, workspace: str):
        return Workspace.model_validate(self.store.get("workspace", "", workspace) or {"name": workspace}).quota

    def trainable_model(self, workspace: str, value: Any, field: str) -> str:
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

    def quota_for_job(self, workspace: str) -> None:
        """The workspace's limit on jobs (and model exports) not yet finished."""
        quota = self.quota(workspace)
        active = [j for j in self.all("job", CustomizationJob, workspace) if j.status not in JOB_DONE]
        active += [m for m in self.all("model", ModelEntity, workspace) if m.status == "exporting"]
        if len(active) >= quota.max_active_jobs:
            raise QuotaExceeded(f"workspace {workspace!r} has {len(active)} unfinished jobs and exports, its quota "
                                f"(max_active_jobs {quota.max_active_jobs}); wait for one to finish or cancel one",
                                "config")

    def config_of(self, dep: ModelDeployment, serving: bool = False) -> ModelDeploymentConfig | None:
        """The config version `dep` records (a config edited since changes nothing until the deployment is updated
        to it, which checks the quota), or with `serving` the one its serving generation was started from: from the
        config's history, else the config as it is now (a version stored before today's fields, unreadable now,
        too)."""
        name, version = ((dep.serving_config, dep.serving_config_version) if serving and dep.serving_config_version
                         else (dep.config, dep.config_version))
        current = self.store.get("deployment_config", dep.workspace, name)
        for body in self.config_versions(dep.workspace, name, current):
            if body.get("version") == version:
                try:
                    return ModelDeploymentConfig.model_validate(body)
                except ValidationError:
                    break
        return ModelDeploymentConfig.model_validate(current) if current is not None else None

    def config_versions(self, workspace: str, name: str, current: dict | None) -> list[dict]:
        """The stored versions of the config `current` (its history keeps those of a deleted config of the same name
        too: they are told apart by when the config was created)."""
        if current is None:
            return []
        return [v for v in self.store.versions("deployment_config", workspace, name)
                if v.get("created_at") == current.get("created_at")]

    def datasets_used(self, workspace: str, replacing: tuple[str, str] | None = None) -> dict[str, int]:
        """Bytes of the workspace's datasets (as recorded; a file being `replacing`'s (dataset, path) left out) and of
        its uploads running, at the size each declared."""
        datasets = self.all("dataset", Dataset, workspace)
        return {"datasets": sum(f.bytes for d in datasets for p, f in d.files.items() if (d.name, p) != replacing),
                "uploading": sum(d.uploading_bytes.get(p, 0) for d in datasets for p in running_uploads(d))}

    def folders_used(self, workspace: str) -> dict[str, int]:
        """Bytes in the workspace's jobs', models' and mining cache's folders (listed in storage)."""
        root = self.workspace_root(workspace)
        return {kind: sum(storage.list_files(storage.join(root, kind)).values()) for kind in ("jobs", "models", "mining")}

    def quota_for_storage(self, workspace: str, field: str = "config", more: int = 0,
                          used: dict[str, int] | None = None) -> None:
        """New work that writes (a job, a resumed job, a model export; an upload of `more` bytes) starts only while
        the workspace holds less than its storage quota; what a job then writes is bounded by its own size."""
        quota = self.quota(workspace)
        used = used or {**self.datasets_used(workspace), **self.folders_used(workspace)}
        total = sum(used.values())
        limit = quota.max_storage_gib * 2**30
        if (total + more > limit) if more else (total >= limit):
            held = ", ".join(f"{kind} {_size(n)}" for kind, n in used.items() if n) or "nothing"
            adding = f"; {_size(more)} more would pass its quota" if more else ", its quota"
            raise QuotaExceeded(f"workspace {workspace!r} holds {_size(total)} ({held}){adding} (max_storage_gib "
                                f"{quota.max_storage_gib:g}); delete finished jobs (DELETE .../customization/jobs/ID), "
                                "models or datasets first", field)

    def quota_for_deployment(self, workspace: str, cfg, name: str) -> None:
        """The workspace's limits on replicas (over all its deployments but `name`, plus this one at its most) and on
        the CPUs and GPUs of one deployment."""
        quota = self.quota(workspace)
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
        for dep in self.all("deployment", ModelDeployment, workspace):
            if dep.name == name:
                continue
            runs = [self.config_of(dep)]  # what it records, and what its serving generation runs if a swap is pending
            if dep.serving_config_version and (dep.serving_config, dep.serving_config_version) != (dep.config, dep.config_version):
                runs.append(self.config_of(dep, serving=True))
            others += max((most(c) for c in runs if c), default=0)
        if others + replicas > quota.max_replicas:
            raise QuotaExceeded(f"workspace {workspace!r} runs up to {others} replicas in its other deployments; "
                                f"{replicas} more pass its quota (max_replicas {quota.max_replicas})")


class Service:
    """A service of the control plane: its routes (public methods, which ControlPlane routes to) and, where its
    entities have a lifecycle, `reconcile(entity)`. Built with the Context and the services it calls."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.store = ctx.store


def _size(n: int) -> str:
    """Bytes as a person reads them: 80.0 KiB, 1.25 GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{n} bytes"


def running_uploads(ds: Dataset) -> dict[str, float]:
    """The dataset's uploads still running: path -> when it began (a mark older than the upload deadline is one
    that died)."""
    from cluster.uploads import deadline_s

    return {p: t for p, t in ds.uploading.items() if time.time() - t < deadline_s() + 600}
