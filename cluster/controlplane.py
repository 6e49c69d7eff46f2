"""The ControlPlane: a detached, named Ray actor that owns the state and every lifecycle.

It validates and stores entities (cluster.store), submits customization jobs and base-model exports
as Ray jobs, and reconciles once a second: job status and progress from Ray, deployments from Serve
(PENDING -> READY once the application runs and a probe embedding comes back; then its provider
exists and the gateway's routes change), model swaps as a new generation beside the old one, and
deletions. Killed, Ray restarts it; it reloads the store and picks every lifecycle up where it was.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cluster import deployments, jobs, kuberay
from cluster.paths import Confinement
from cluster.entities import (DATASET_FILES, DEFAULT_WORKSPACE, JOB_DONE, NAME, ApiKey, Artifact, CustomizationJob, Dataset,
                              DatasetFile, Entity, Evaluation, ModelDeployment,
                              ModelDeploymentConfig, ModelEntity, ModelProvider, StatusChange, Workspace, now)
from cluster.schemas import (DatasetCreate, DeploymentConfigCreate, DeploymentConfigUpdate, DeploymentCreate,
                             DeploymentUpdate, JobCreate, ModelCreate, WorkspaceCreate)
from cluster.store import open_store, redacted
from rayembed import storage
from rayembed.artifact import GRAPH_FP16, GRAPH_INT8, MANIFEST, REQUIRED_FILES, ArtifactError, parse_manifest
from serve import auth
from rayembed.progress import PROGRESS_ENV
from rayembed.errors import Conflict, InvalidName, InvalidRequest, NotFound, PromotionRefused, Unavailable, shown

log = logging.getLogger(__name__)
NAME_RULE = "2-63 characters of lowercase letters, digits and '-', starting with a letter or digit"
TICK_S = 1.0
PENDING_TIMEOUT_S = 900.0
RECONCILE_WORKERS = 16  # entities reconciled at once (each task is mostly waiting on Ray or a probe)
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


def _fields(model: type, body: dict, what: str, **fixed: Any):
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


class ControlPlane:
    def __init__(self, home: str, dashboard_url: str, base_url: str, state_url: str | None = None,
                 data_roots: list[str] | None = None, storage_root: str | None = None):
        self.home = Path(home)
        self.storage = storage_root or str(self.home)  # datasets, jobs' outputs, models: shared by every node
        self.data_roots = list(data_roots or [])  # besides its own folder, where a workspace's jobs may read
        self.dashboard_url = dashboard_url
        self.base_url = base_url
        self.state_url = state_url or str(self.home / "state.db")
        self.store = open_store(self.state_url)
        self._lock = threading.RLock()
        self._routes_version = time.time_ns()  # a restart changes it, so every gateway re-reads the routes
        self._client = None
        self._started_apps: set[str] = set()  # Serve applications this incarnation deployed
        if self.store.get("workspace", "", DEFAULT_WORKSPACE) is None:
            self._save(Workspace(name=DEFAULT_WORKSPACE, description="always exists"))
        self._pool = futures.ThreadPoolExecutor(max_workers=RECONCILE_WORKERS, thread_name_prefix="reconcile")
        self._tasks_lock = threading.Lock()
        self._running: set[tuple] = set()  # (kind, workspace, name) with a reconcile task in flight
        self._stop = threading.Event()
        threading.Thread(target=self._loop, name="reconcile", daemon=True).start()

    # ---------------------------------------------------------------- plumbing
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
        return Confinement(self._workspace_root(workspace), self.data_roots)

    def _workspace_root(self, workspace: str) -> str:
        return storage.join(self.storage, "workspaces", workspace)

    def _bump_routes(self) -> None:
        self._routes_version = time.time_ns()

    def ping(self) -> dict:
        return {"ok": True, "schema_version": self.store.schema_version(), "home": str(self.home), "storage": self.storage,
                "state": redacted(self.state_url),
                "api_keys": len(self.store.list("apikey")), "data_roots": self.data_roots}

    # ---------------------------------------------------------------- API keys (Ray callers only: `rayembed keys`)
    def create_key(self, workspaces: list[str], label: str = "") -> dict:
        """A key for `workspaces` (["*"]: all, an admin key). Returns the key itself, this once."""
        if not workspaces:
            raise InvalidRequest("a key needs at least one workspace, or all of them (*)", "workspaces")
        with self._lock:
            if auth.ALL not in workspaces:
                for w in workspaces:
                    self._workspace(w)
            key_id, key, sha = auth.new_key()
            record = ApiKey(id=key_id, sha256=sha, workspaces=sorted(set(workspaces)), label=str(label)[:200])
            self.store.put("apikey", "", key_id, record.model_dump(mode="json"))
            self._bump_routes()
        return {**record.public(), "key": key}

    def list_keys(self) -> list[dict]:
        return [ApiKey.model_validate(b).public() for b in self.store.list("apikey")]

    def revoke_key(self, key_id: str) -> dict:
        with self._lock:
            if not self.store.delete("apikey", "", str(key_id)):
                raise NotFound(f"API key {shown(key_id)} does not exist (`rayembed keys list` shows the ids)")
            self._bump_routes()
        return {"id": key_id, "revoked": True}

    # ---------------------------------------------------------------- workspaces
    def list_workspaces(self) -> list[dict]:
        return [w.model_dump(mode="json") for w in self._all("workspace", Workspace)]

    def create_workspace(self, body: dict) -> dict:
        name = check_name(body.get("name"), "workspace")
        _fields(WorkspaceCreate, body, "workspace")
        with self._lock:
            if self.store.get("workspace", "", name) is not None:
                raise Conflict(f"workspace {name!r} already exists")
            ws = _fields(Workspace, body, "workspace")
            self._save(ws)
            self._bump_routes()
        return ws.model_dump(mode="json")

    def get_workspace(self, name: str) -> dict:
        self._workspace(name)
        return self.store.get("workspace", "", name)

    def delete_workspace(self, name: str) -> dict:
        with self._lock:
            self._workspace(name)
            if name == DEFAULT_WORKSPACE:
                raise Conflict("the default workspace cannot be deleted")
            used = [k for k in ("model", "dataset", "job", "deployment_config", "deployment") if self.store.list(k, name)]
            if used:
                raise Conflict(f"workspace {name!r} still holds {', '.join(WHAT[k] + 's' for k in used)}; delete them first")
            keys = [k["id"] for k in self.store.list("apikey") if name in k["workspaces"]]
            if keys:  # a key would otherwise regain access to a workspace created later under the same name
                raise Conflict(f"workspace {name!r} is in the scope of API keys {', '.join(keys)}; revoke them first "
                               "(`rayembed keys revoke ID`)")
            self.store.delete("workspace", "", name)
            self._bump_routes()
        return {"name": name, "deleted": True}

    # ---------------------------------------------------------------- model entities
    def list_models(self, workspace: str) -> list[dict]:
        self._workspace(workspace)
        return [m.model_dump(mode="json") for m in self._all("model", ModelEntity, workspace)]

    def get_model(self, workspace: str, name: str) -> dict:
        self._workspace(workspace)
        return self._load("model", workspace, name, ModelEntity).model_dump(mode="json")

    def create_model(self, workspace: str, body: dict) -> dict:
        """Register a base model: `base_model` (a local HF folder, a Hub-layout nemotron folder, or
        all-MiniLM-L6-v2) is exported and verified once, as a Ray job; `artifact` (an ONNX folder this
        project wrote) is registered as it is."""
        self._workspace(workspace)
        name = check_name(body.get("name"), "model")
        base, artifact = body.get("base_model"), body.get("artifact")
        if (base is None) == (artifact is None):
            raise InvalidRequest("give exactly one of base_model (exported once) or artifact (an ONNX folder)", "base_model")
        for field, value in (("base_model", base), ("artifact", artifact)):
            if value is not None and not isinstance(value, str):
                raise InvalidRequest(f"{field} must be a string (a folder path or model name), not {shown(value)}", field)
        _fields(ModelCreate, body, "model")
        confinement = self._confinement(workspace)
        confinement.model(base, "base_model")
        confinement.read(artifact, "artifact")
        out = storage.join(self._workspace_root(workspace), "models", name, "onnx")
        if self.store.get("model", workspace, name) is not None:
            raise Conflict(f"model {name!r} already exists in workspace {workspace!r}")
        if artifact is not None:  # copied into storage (outside the lock), so every node reads the same files
            published = self._publish_artifact(str(artifact), out)
        with self._lock:
            if self.store.get("model", workspace, name) is not None:
                raise Conflict(f"model {name!r} already exists in workspace {workspace!r}")
            if artifact is not None:
                entity = self._entity_from_artifact(workspace, name, published, str(artifact), None, None,
                                                    description=str(body.get("description", "")))
            else:
                entity = ModelEntity(workspace=workspace, name=name, status="exporting", base_model=str(base),
                                     artifact=Artifact(uri=out), source_job=f"export-{workspace}-{name}-{jobs.new_job_id()[5:13]}",
                                     description=str(body.get("description", "")))
            self._save(entity)
        if artifact is None:  # the export runs as a Ray job, submitted outside the lock (a network call)
            entry = (f"{shlex.quote(sys.executable)} -m train.export --model {shlex.quote(str(base))} "
                     f"--output {shlex.quote(str(out))}")
            try:
                self._jobs_client().submit_job(entrypoint=entry, submission_id=entity.source_job, **self._job_request(),
                                               metadata={"rayembed": "model-export", "workspace": workspace, "model": name})
            except Exception as exc:  # noqa: BLE001 - the export did not start: the name is free again
                with self._lock:
                    self.store.delete("model", workspace, name)
                raise Unavailable(f"Ray did not accept the export job: {type(exc).__name__}: {exc}"[:1000] +
                                  "; nothing was registered: retry in a few seconds") from None
        return entity.model_dump(mode="json")

    def _publish_artifact(self, folder: str, dest: str) -> str:
        """An ONNX folder a user registers, sealed where every node reads it: a published URI as it is, a folder
        inside a local storage root sealed in place (its files hashed again), any other folder copied to `dest`."""
        if storage.is_uri(folder) and storage.read_seal(folder) is not None:
            return folder
        files = storage.list_files(folder) if storage.exists(folder) else {}
        missing = [f for f in REQUIRED_FILES if f not in files]
        if missing:
            raise InvalidRequest(f"artifact {shown(folder)} lacks {', '.join(missing)}: give a folder written by "
                                 "`python -m train.export` or a job's onnx/", "artifact")
        inside = not storage.is_uri(folder) and not storage.is_uri(self.storage) and \
            Path(folder).resolve().is_relative_to(Path(self.storage).resolve())
        target = folder if inside else dest
        storage.publish(folder, target)
        return target

    def _entity_from_artifact(self, workspace: str, name: str, uri: str, base_model: str, hf_uri: str | None,
                              source_job: str | None, evaluation=None, description: str = "") -> ModelEntity:
        """A ready model entity from a published ONNX folder in storage (read through the storage API, so the
        actor's node needs none of the files)."""
        seal = storage.read_seal(uri)
        if seal is None:
            raise InvalidRequest(f"artifact {uri} was not published completely (no seal): run its job or export "
                                 "again", "artifact")
        missing = [f for f in REQUIRED_FILES if f not in seal["files"]]
        if missing:
            raise InvalidRequest(f"artifact {uri} lacks {', '.join(missing)}: give a folder written by "
                                 "`python -m train.export` or a job's onnx/", "artifact")
        try:
            m = parse_manifest(storage.read_text(storage.join(uri, MANIFEST)), uri)
        except ArtifactError as exc:
            raise InvalidRequest(str(exc), "artifact") from None
        if evaluation is None and "eval.json" in seal["files"]:  # a job's onnx/ carries its evaluation
            try:
                evaluation = Evaluation.from_report(json.loads(storage.read_text(storage.join(uri, "eval.json"))))
            except (ValueError, KeyError) as exc:
                raise InvalidRequest(f"{uri}/eval.json is not a job's evaluation report: {exc}", "artifact") from None
        params = None
        if hf_uri and storage.is_file(storage.join(hf_uri, "model.safetensors")):
            params = _count_parameters(storage.join(hf_uri, "model.safetensors"))
        return ModelEntity(workspace=workspace, name=name, status="ready",
                           base_model=m.base_model if base_model == uri else base_model,
                           artifact=Artifact(uri=uri, sha256=seal["sha256"], hf_uri=hf_uri),
                           parameter_count=params, precision="fp32 (ONNX; trained bf16-mixed on GPU)",
                           embedding_dim=m.embedding_dim, matryoshka_dims=m.dims, max_seq_length=m.max_seq_length,
                           prefixes=m.prefixes.model_dump(), evaluation=evaluation, source_job=source_job,
                           description=description)

    def delete_model(self, workspace: str, name: str) -> dict:
        with self._lock:
            self._workspace(workspace)
            self._load("model", workspace, name, ModelEntity)
            users = [d.name for d in self._all("deployment", ModelDeployment, workspace) if name in (d.model, d.pending_model)]
            if users:
                raise Conflict(f"model {name!r} is deployed by {', '.join(users)}; delete or repoint those deployments first")
            self.store.delete("model", workspace, name)
        return {"name": name, "deleted": True}

    # ---------------------------------------------------------------- datasets (the files go through the API ingress)
    def create_dataset(self, workspace: str, body: dict) -> dict:
        self._workspace(workspace)
        name = check_name(body.get("name"), "dataset")
        _fields(DatasetCreate, body, "dataset")
        with self._lock:
            if self.store.get("dataset", workspace, name) is not None:
                raise Conflict(f"dataset {name!r} already exists in workspace {workspace!r}")
            ds = _fields(Dataset, {"description": body.get("description", "")}, "dataset", workspace=workspace,
                         name=name, uri=storage.join(self._workspace_root(workspace), "datasets", name))
            self._save(ds)
        return ds.model_dump(mode="json")

    def list_datasets(self, workspace: str) -> list[dict]:
        self._workspace(workspace)
        return [d.model_dump(mode="json") for d in self._all("dataset", Dataset, workspace)]

    def get_dataset(self, workspace: str, name: str) -> dict:
        self._workspace(workspace)
        return self._load("dataset", workspace, name, Dataset).model_dump(mode="json")

    def add_dataset_file(self, workspace: str, name: str, path: str, stored: dict) -> dict:
        """Record a file the API ingress validated and stored at the dataset's folder (a new upload replaces it)."""
        with self._lock:
            self._workspace(workspace)
            ds = self._load("dataset", workspace, name, Dataset)
            if path not in DATASET_FILES:
                raise InvalidRequest(f"{shown(path)} is not a dataset file: use one of {', '.join(DATASET_FILES)}", "path")
            ds = ds.touched(files={**ds.files, path: DatasetFile.model_validate(stored)})
            self._save(ds)
        return ds.model_dump(mode="json")

    def _jobs_reading(self, ds: Dataset) -> list[str]:
        """Unfinished jobs whose config reads the dataset's files."""
        def reads(job: CustomizationJob) -> bool:
            given = (job.spec.get("job") if job.kind == "sweep" else job.spec).get("dataset") or {}
            return any(isinstance(given.get(k), str) and given[k].startswith(ds.uri.rstrip("/") + "/")
                       for k in ("training", "validation", "evaluation"))

        return [j.name for j in self._all("job", CustomizationJob, ds.workspace) if j.status not in JOB_DONE and reads(j)]

    def delete_dataset(self, workspace: str, name: str) -> dict:
        with self._lock:
            self._workspace(workspace)
            ds = self._load("dataset", workspace, name, Dataset)
            users = self._jobs_reading(ds)
            if users:
                raise Conflict(f"dataset {name!r} is read by job {', '.join(users)}; wait for it to finish or cancel it")
            self.store.delete("dataset", workspace, name)
        storage.delete_tree(ds.uri)  # outside the lock: the entity is gone, so no new job can name it
        return {"name": name, "deleted": True}

    def _with_dataset(self, workspace: str, spec: dict, field: str) -> dict:
        """`dataset: {name: ...}` in a job config -> the dataset's files as the config's paths (in storage)."""
        given = spec.get("dataset")
        if not isinstance(given, dict) or "name" not in given:
            return spec
        ds = self._load("dataset", workspace, check_name(given["name"], "dataset", f"{field}.dataset.name"), Dataset)
        fields = ds.job_fields()
        if "training" not in fields:
            raise InvalidRequest(f"dataset {ds.name!r} has no training.jsonl yet: upload it first "
                                 f"(`rayembed datasets upload {ds.name} --training FILE`)", f"{field}.dataset.name")
        clash = sorted(set(fields) & set(given))
        if clash:
            raise InvalidRequest(f"{field}.dataset: give either name (dataset {ds.name!r}) or {', '.join(clash)}, not "
                                 "both", f"{field}.dataset")
        return {**spec, "dataset": {**{k: v for k, v in given.items() if k != "name"}, **fields}}

    # ---------------------------------------------------------------- customization jobs
    def _job_request(self, progress_uri: str | None = None) -> dict:
        """What a job's Ray submission asks for. Its driver reserves no GPU: the Ray Train worker it starts holds
        the GPU (a driver holding one would leave a one-GPU cluster's worker unplaceable). A pinned accelerator
        type (RAYEMBED_ACCELERATOR_TYPE) goes to the worker, and so does where to write its progress record."""
        env = {k: os.environ[k] for k in JOB_ENV if os.environ.get(k)}
        if progress_uri:
            env[PROGRESS_ENV] = progress_uri
        return {"runtime_env": {"env_vars": env}} if env else {}

    def _cluster_has_gpu(self) -> bool:
        import ray

        return ray.cluster_resources().get("GPU", 0) >= 1

    def create_job(self, workspace: str, body: dict) -> dict:
        self._workspace(workspace)
        output_model = check_name(body.get("output_model"), "output model", "output_model")
        if ("config" in body) == ("sweep" in body):
            raise InvalidRequest("give exactly one of config (a training job config) or sweep (a learning-rate sweep)", "config")
        kind = "sweep" if "sweep" in body else "training"
        spec = body[kind if kind == "sweep" else "config"]
        if not isinstance(spec, dict):
            raise InvalidRequest(f"{'sweep' if kind == 'sweep' else 'config'} must be a JSON object", "config")
        _fields(JobCreate, body, "customization job")
        if kind == "sweep" and isinstance(spec.get("job"), dict):
            spec = {**spec, "job": self._with_dataset(workspace, spec["job"], "sweep.job")}
        else:
            spec = self._with_dataset(workspace, spec, "config")
        with self._lock:
            if self.store.get("model", workspace, output_model) is not None:
                raise Conflict(f"model {output_model!r} already exists in workspace {workspace!r}: choose another output_model")
            clash = [j.name for j in self._all("job", CustomizationJob, workspace)
                     if j.output_model == output_model and j.status not in JOB_DONE]
            if clash:
                raise Conflict(f"job {clash[0]} already creates model {output_model!r}")
            job_id = jobs.new_job_id()
            job_dir = storage.join(self._workspace_root(workspace), "jobs", job_id)
            has_gpu = self._cluster_has_gpu()
            gpu_gib = float(os.environ.get("RAYEMBED_GPU_MEMORY_GIB", DEFAULT_GPU_MEMORY_GIB)) if has_gpu else None
            prepared = jobs.prepare(kind, spec, job_dir, gpu_gib, self._confinement(workspace))
            job = CustomizationJob(workspace=workspace, name=job_id, kind=kind, spec=prepared.spec,
                                   output_model=output_model, output_dir=prepared.artifact_dir,
                                   ray_job_id=job_id, warnings=prepared.warnings, gpu_estimate=prepared.gpu_estimate,
                                   status_history=[StatusChange(status="created")])
            self._save(job)  # created: it holds its output model's name while it is submitted
        self._submit(job, prepared.entrypoint, job_id, {"rayembed": "customization-job", "workspace": workspace,
                                                        "output_model": output_model})
        with self._lock:
            job = self._job_status(self._fresh(job, CustomizationJob) or job, "pending", "submitted to Ray as job " + job_id)
        return job.model_dump(mode="json")

    def _submit(self, job: CustomizationJob, entrypoint: str, ray_job_id: str, metadata: dict) -> None:
        """Submit a Ray job, outside the store lock (a network call). Refused (Ray's job agent not up yet, the
        dashboard restarting), the job is marked failed with the reason, which frees its output model's name, and
        the caller gets a 503 to retry."""
        try:
            self._jobs_client().submit_job(entrypoint=entrypoint, submission_id=ray_job_id, metadata=metadata,
                                           **self._job_request(jobs.progress_uri(job.output_dir)))
        except Exception as exc:  # noqa: BLE001 - whatever Ray answered, the job did not start
            reason = f"Ray did not accept the submission: {type(exc).__name__}: {exc}"[:1000]
            with self._lock:
                current = self._fresh(job, CustomizationJob) or job
                self._job_status(current, "failed", reason, error=reason, finished_at=now())
            raise Unavailable(f"{reason}; nothing ran: retry in a few seconds (job {job.name} is marked failed)") from None

    def _job_status(self, job: CustomizationJob, status: str, reason: str = "", **changes) -> CustomizationJob:
        history = job.status_history + ([StatusChange(status=status, reason=reason)] if status != job.status else [])
        job = job.touched(status=status, status_history=history, **changes)
        self._save(job)
        return job

    def list_jobs(self, workspace: str) -> list[dict]:
        self._workspace(workspace)
        return [j.model_dump(mode="json") for j in sorted(self._all("job", CustomizationJob, workspace),
                                                           key=lambda j: j.created_at, reverse=True)]

    def get_job(self, workspace: str, job_id: str) -> dict:
        self._workspace(workspace)
        return self._load("job", workspace, job_id, CustomizationJob).model_dump(mode="json")

    def job_status(self, workspace: str, job_id: str) -> dict:
        job = self.get_job(workspace, job_id)
        return {k: job[k] for k in ("name", "status", "progress", "status_history", "error", "output_model",
                                    "started_at", "finished_at", "warnings")}

    def cancel_job(self, workspace: str, job_id: str) -> dict:
        with self._lock:
            self._workspace(workspace)
            job = self._load("job", workspace, job_id, CustomizationJob)
            if job.status in JOB_DONE:
                raise Conflict(f"job {job_id} is already {job.status}")
            job = self._job_status(job, "cancelled", "cancelled by request; the Ray job was stopped", finished_at=now())
        try:  # after the row says cancelled (the reconciler leaves it alone), outside the lock: a network call
            self._jobs_client().stop_job(job.ray_job_id)
        except Exception as exc:  # noqa: BLE001 - a job Ray no longer has is stopped
            log.warning("stopping Ray job %s: %s", job.ray_job_id, exc)
        return job.model_dump(mode="json")

    def resume_job(self, workspace: str, job_id: str) -> dict:
        """Submit a failed or cancelled training job again, as a new Ray job over the same folder: the job
        finds its config unchanged and Ray Train restores the last checkpoint registered under it."""
        with self._lock:
            self._workspace(workspace)
            job = self._load("job", workspace, job_id, CustomizationJob)
            if job.status not in ("failed", "cancelled"):
                raise Conflict(f"job {job_id} is {job.status}; only a failed or cancelled job can be resumed")
            if job.kind != "training":
                raise Conflict(f"job {job_id} is a sweep: create it again (a sweep's trials are not resumed)")
            if self.store.get("model", workspace, job.output_model) is not None:
                raise Conflict(f"model {job.output_model!r} exists meanwhile; the job's files stay in {job.output_dir}")
            config_path = storage.join(storage.parent(job.output_dir), "job.yaml")
            if not storage.is_file(config_path):
                raise Conflict(f"job {job_id}'s config {config_path} is gone; create the job again")
            attempt = 1 + sum(1 for h in job.status_history if h.status == "pending")
            ray_job_id = f"{job.name}-{attempt}"
            entrypoint = f"{shlex.quote(sys.executable)} -m train --config {shlex.quote(config_path)}"
        try:  # outside the lock: a network call
            self._jobs_client().submit_job(entrypoint=entrypoint, submission_id=ray_job_id,
                                           **self._job_request(jobs.progress_uri(job.output_dir)),
                                           metadata={"rayembed": "customization-job", "workspace": workspace,
                                                     "output_model": job.output_model, "resumes": job.name})
        except Exception as exc:  # noqa: BLE001 - the job stays as it was
            raise Unavailable(f"Ray did not accept the resubmission: {type(exc).__name__}: {exc}"[:1000] +
                              f"; job {job_id} is still {job.status}: retry in a few seconds") from None
        with self._lock:
            job = self._load("job", workspace, job_id, CustomizationJob)
            job = self._job_status(job, "pending", f"resumed as Ray job {ray_job_id} (attempt {attempt}) from the "
                                   "last checkpoint in " + storage.join(job.output_dir, "checkpoints"),
                                   ray_job_id=ray_job_id, finished_at=None, error=None)
        return job.model_dump(mode="json")

    def job_logs(self, workspace: str, job_id: str) -> str:
        self._workspace(workspace)
        job = self._load("job", workspace, job_id, CustomizationJob)
        try:
            return self._jobs_client().get_job_logs(job.ray_job_id)
        except RuntimeError as exc:
            return f"(the Ray job's logs are not available: {exc})\n" + (job.error or "")

    # ---------------------------------------------------------------- deployment configs
    def create_deployment_config(self, workspace: str, body: dict) -> dict:
        self._workspace(workspace)
        name = check_name(body.get("name"), "deployment config")
        _fields(DeploymentConfigCreate, body, "deployment config")
        with self._lock:
            if self.store.get("deployment_config", workspace, name) is not None:
                raise Conflict(f"deployment config {name!r} already exists in workspace {workspace!r}")
            cfg = _fields(ModelDeploymentConfig, body, "deployment config", workspace=workspace, version=1)
            self._model_for(workspace, cfg.model)
            self._save(cfg)
            self.store.add_version("deployment_config", workspace, name, 1, cfg.model_dump(mode="json"))
        return cfg.model_dump(mode="json")

    def update_deployment_config(self, workspace: str, name: str, body: dict) -> dict:
        _fields(DeploymentConfigUpdate, body, "deployment config change")
        with self._lock:
            self._workspace(workspace)
            old = self._load("deployment_config", workspace, name, ModelDeploymentConfig)
            merged = {**old.model_dump(mode="json", exclude={"created_at", "updated_at"}), **body}
            cfg = _fields(ModelDeploymentConfig, merged, "deployment config", workspace=workspace, name=name,
                          version=old.version + 1, created_at=old.created_at)
            self._model_for(workspace, cfg.model)
            self._save(cfg)
            self.store.add_version("deployment_config", workspace, name, cfg.version, cfg.model_dump(mode="json"))
        return cfg.model_dump(mode="json")

    def get_deployment_config(self, workspace: str, name: str) -> dict:
        self._workspace(workspace)
        cfg = self._load("deployment_config", workspace, name, ModelDeploymentConfig).model_dump(mode="json")
        cfg["versions"] = self.store.versions("deployment_config", workspace, name)
        return cfg

    def list_deployment_configs(self, workspace: str) -> list[dict]:
        self._workspace(workspace)
        return [c.model_dump(mode="json") for c in self._all("deployment_config", ModelDeploymentConfig, workspace)]

    def delete_deployment_config(self, workspace: str, name: str) -> dict:
        with self._lock:
            self._workspace(workspace)
            self._load("deployment_config", workspace, name, ModelDeploymentConfig)
            users = [d.name for d in self._all("deployment", ModelDeployment, workspace) if d.config == name]
            if users:
                raise Conflict(f"deployment config {name!r} is used by {', '.join(users)}")
            self.store.delete("deployment_config", workspace, name)
        return {"name": name, "deleted": True}

    # ---------------------------------------------------------------- deployments
    def _model_for(self, workspace: str, name: str) -> ModelEntity:
        model = self._load("model", workspace, check_name(name, "model"), ModelEntity)
        if model.status != "ready" or model.artifact is None:
            raise Conflict(f"model {name!r} is {model.status}" + (f": {model.error}" if model.error else "; wait until it is ready"))
        return model

    def _gate(self, model: ModelEntity, allow_worse: bool, cfg: ModelDeploymentConfig) -> None:
        """Promotion gate: a model its own job found worse than its base is not deployed without an override;
        and the graph the config asks for must be in the model's artifact."""
        graph = {"int8": GRAPH_INT8, "fp16": GRAPH_FP16}.get(cfg.precision)
        if graph and not storage.is_file(storage.join(model.artifact.uri, graph)):
            how = ("`python -m train.quantize --model-dir DIR --eval BEIR_DIR`, or output.export_int8 in the job"
                   if graph == GRAPH_INT8 else "export_fp16: true in the job")
            raise InvalidRequest(f"precision {cfg.precision} needs {graph} in model {model.name!r}'s artifact "
                                 f"({model.artifact.uri}); write it with {how}, or use precision auto", "precision")
        ev = model.evaluation
        if ev is not None and ev.verdict == "worse" and not allow_worse:
            raise PromotionRefused(f"model {model.name!r} is worse than its base model: {ev.summary()}. "
                                   "Deploy it anyway with allow_worse: true, or train again", "model")

    def create_deployment(self, workspace: str, body: dict) -> dict:
        self._workspace(workspace)
        name = check_name(body.get("name"), "deployment")
        _fields(DeploymentCreate, body, "deployment")
        allow_worse = bool(body.get("allow_worse", False))
        with self._lock:
            if self.store.get("deployment", workspace, name) is not None:
                raise Conflict(f"deployment {name!r} already exists in workspace {workspace!r}")
            inline = "config" not in body
            if not inline:
                cfg = self._load("deployment_config", workspace, check_name(body["config"], "deployment config"),
                                 ModelDeploymentConfig)
            else:  # inline settings: a config of the deployment's name, owned by it
                settings = {k: v for k, v in body.items() if k not in ("name", "allow_worse")}
                if self.store.get("deployment_config", workspace, name) is not None:
                    raise Conflict(f"deployment config {name!r} already exists: pass config: {name!r} to use it")
                cfg = _fields(ModelDeploymentConfig, {**settings, "name": name}, "deployment config",
                              workspace=workspace, version=1)
            model = self._model_for(workspace, cfg.model)
            self._gate(model, allow_worse, cfg)  # before anything is stored
            if inline:
                self._save(cfg)
                self.store.add_version("deployment_config", workspace, name, 1, cfg.model_dump(mode="json"))
            dep = ModelDeployment(workspace=workspace, name=name, config=cfg.name, config_version=cfg.version,
                                  model=model.name, allow_worse=allow_worse, owns_config=inline,
                                  status_history=[StatusChange(status="CREATED", reason=f"model {model.name}")])
            self._save(dep)
        return dep.model_dump(mode="json")

    def update_deployment(self, workspace: str, name: str, body: dict) -> dict:
        """Point a deployment at another model (or config version): a new generation starts beside the
        old one, and the routes move only once it answers (zero-downtime swap)."""
        _fields(DeploymentUpdate, body, "deployment change")
        with self._lock:
            self._workspace(workspace)
            dep = self._load("deployment", workspace, name, ModelDeployment)
            if dep.status == "DELETING":
                raise Conflict(f"deployment {name!r} is being deleted")
            allow_worse = bool(body.get("allow_worse", dep.allow_worse))
            changes = {k: v for k, v in body.items() if k not in ("allow_worse", "config")}
            cfg_name = check_name(body.get("config", dep.config), "deployment config")
            cfg = self._load("deployment_config", workspace, cfg_name, ModelDeploymentConfig)
            if changes:
                cfg = ModelDeploymentConfig.model_validate(self.update_deployment_config(workspace, cfg_name, changes))
            model = self._model_for(workspace, cfg.model)
            self._gate(model, allow_worse, cfg)
            if (dep.status == "READY" and dep.pending_model is None and model.name == dep.model
                    and (cfg.name, cfg.version) == (dep.config, dep.config_version)):
                return dep.model_dump(mode="json")  # nothing changed: keep serving
            dep = dep.touched(config=cfg.name, config_version=cfg.version, pending_model=model.name, allow_worse=allow_worse,
                              status_history=dep.status_history + [StatusChange(
                                  status=dep.status, reason=f"update to model {model.name} (config v{cfg.version})")])
            self._save(dep)
        return dep.model_dump(mode="json")

    def get_deployment(self, workspace: str, name: str) -> dict:
        self._workspace(workspace)
        return self._load("deployment", workspace, name, ModelDeployment).model_dump(mode="json")

    def export_deployment(self, workspace: str, name: str, fmt: str, image: str | None = None,
                          k8s_name: str | None = None) -> dict:
        """A manifest that serves the deployment's model elsewhere as it is served here (cluster.kuberay)."""
        if fmt not in kuberay.FORMATS:
            raise InvalidRequest(f"format {shown(fmt)} is not one of {', '.join(kuberay.FORMATS)}", "format")
        self._workspace(workspace)
        dep = self._load("deployment", workspace, name, ModelDeployment)
        cfg = self._load("deployment_config", workspace, dep.config, ModelDeploymentConfig)
        model = self._model_for(workspace, dep.model)
        return kuberay.rayservice(dep, cfg, model, image=image or os.environ.get("RAYEMBED_IMAGE"), name=k8s_name)

    def list_deployments(self, workspace: str) -> list[dict]:
        self._workspace(workspace)
        return [d.model_dump(mode="json") for d in self._all("deployment", ModelDeployment, workspace)]

    def delete_deployment(self, workspace: str, name: str) -> dict:
        with self._lock:
            self._workspace(workspace)
            dep = self._load("deployment", workspace, name, ModelDeployment)
            dep = self._deployment_status(dep, "DELETING", "deleted by request")
            if self.store.delete("provider", workspace, name):
                self._bump_routes()
        return dep.model_dump(mode="json")

    def _deployment_status(self, dep: ModelDeployment, status: str, reason: str, **changes) -> ModelDeployment:
        history = dep.status_history + [StatusChange(status=status, reason=reason)]
        dep = dep.touched(status=status, status_history=history[-50:], **changes)
        self._save(dep)
        return dep

    # ---------------------------------------------------------------- providers and routes
    def list_providers(self, workspace: str) -> list[dict]:
        self._workspace(workspace)
        return [p.model_dump(mode="json") for p in self._all("provider", ModelProvider, workspace)]

    def get_provider(self, workspace: str, name: str) -> dict:
        self._workspace(workspace)
        return self._load("provider", workspace, name, ModelProvider).model_dump(mode="json")

    def routes(self, known_version: int | None = None) -> dict | None:
        """The gateway's routing table (None when `known_version` is current): READY providers by model entity."""
        version = self._routes_version
        if known_version == version:
            return None
        by_model: dict[tuple[str, str], list[dict]] = {}
        for p in self._all("provider", ModelProvider):
            by_model.setdefault((p.workspace, p.model), []).append({"name": p.name, "app": p.app})
        models = [{"workspace": w, "name": m, "providers": ps} for (w, m), ps in sorted(by_model.items())]
        workspaces = [w.name for w in self._all("workspace", Workspace)]
        keys = [{k: b[k] for k in ("id", "sha256", "workspaces")} for b in self.store.list("apikey")]
        return {"version": version, "workspaces": workspaces, "config": {"models": models}, "keys": keys}

    # ---------------------------------------------------------------- reconciliation
    def _loop(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self.reconcile(wait=False)
            except Exception:  # noqa: BLE001 - keep reconciling; the next tick retries
                log.exception("reconcile failed")

    def reconcile(self, wait: bool = True) -> None:
        """One pass over every job, exporting model and deployment. Each is reconciled in its own task, concurrently,
        and one still running from an earlier pass is skipped: a slow probe or Ray call holds up only its own
        entity. `wait`: return when this pass's tasks are done (the loop does not wait)."""
        tasks = []
        for job in self._all("job", CustomizationJob):
            if job.status == "created":  # being submitted right now, unless this actor died in between
                if time.time() - job.updated_at > SUBMIT_TIMEOUT_S:
                    tasks.append(self._spawn(("job", job.workspace, job.name), self._settle_submission, job))
            elif job.status not in JOB_DONE:
                tasks.append(self._spawn(("job", job.workspace, job.name), self._reconcile_job, job))
        for model in self._all("model", ModelEntity):
            if model.status == "exporting":
                tasks.append(self._spawn(("model", model.workspace, model.name), self._reconcile_export, model))
        apps = deployments.statuses()
        for dep in self._all("deployment", ModelDeployment):
            tasks.append(self._spawn(("deployment", dep.workspace, dep.name), self._reconcile_deployment, dep, apps))
        if wait:
            futures.wait([t for t in tasks if t is not None])

    def _spawn(self, key: tuple, fn, *args) -> futures.Future | None:
        """Run `fn(*args)` on the reconcile pool unless the entity `key` still has a task running."""
        with self._tasks_lock:
            if key in self._running:
                return None
            self._running.add(key)

        def run() -> None:
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - the next pass retries
                log.exception("reconciling %s/%s/%s failed", *key)
            finally:
                with self._tasks_lock:
                    self._running.discard(key)

        return self._pool.submit(run)

    def _fresh(self, entity: Entity, model: type):
        """The stored entity if nobody changed it since `entity` was read, else None (skip this tick)."""
        body = self.store.get(KIND_OF[model], entity.workspace, entity.name)
        if body is None or body["updated_at"] != entity.updated_at:
            return None
        return model.model_validate(body)

    def _settle_submission(self, job: CustomizationJob) -> None:
        """A job left `created` by an actor that died while submitting it: pending if Ray has it, else failed."""
        submitted = self._ray_job(job.ray_job_id) is not None
        with self._lock:
            if (job := self._fresh(job, CustomizationJob)) is None:
                return
            if submitted:
                self._job_status(job, "pending", "submitted to Ray as job " + job.ray_job_id)
            else:
                self._job_status(job, "failed", "its submission to Ray never completed (the control plane restarted "
                                 "meanwhile); nothing ran: create the job again", finished_at=now(),
                                 error="the submission to Ray never completed; nothing ran")

    def _ray_job(self, job_id: str):
        try:
            return self._jobs_client().get_job_info(job_id)
        except RuntimeError:  # the cluster does not know it (restarted since)
            return None

    def _reconcile_job(self, job: CustomizationJob) -> None:
        info = self._ray_job(job.ray_job_id)
        status = getattr(info.status, "value", str(info.status)) if info else None
        # progress: the record the job writes to storage (a small read), not its log; the log only when it failed
        progress = jobs.read_job_progress(job.output_dir) if status in ("RUNNING", "FAILED", "SUCCEEDED") else None
        log_text = None
        if status == "FAILED":
            try:
                log_text = self._jobs_client().get_job_logs(job.ray_job_id)
            except RuntimeError:
                log_text = ""
        with self._lock:
            job = self._fresh(job, CustomizationJob)
            if job is None or job.status in JOB_DONE:
                return
            update = {"progress": progress} if progress and progress != job.progress else {}
            if info is None:
                self._job_status(job, "failed", "the Ray job is gone: the cluster restarted while it ran", finished_at=now(),
                                 error=f"the Ray job {job.ray_job_id} no longer exists (the Ray cluster was restarted while "
                                       f"it was {job.status}); its files are in {storage.parent(job.output_dir)}; "
                                       "create the job again")
            elif status == "PENDING" and job.status != "pending":
                self._job_status(job, "pending", info.message or "waiting for resources")
            elif status == "RUNNING":
                if job.status != "running":
                    self._job_status(job, "running", "the Ray job started", started_at=now(), **update)
                elif update:
                    self._save(job.touched(**update))
            elif status == "SUCCEEDED":
                self._complete_job(job, update)
            elif status == "FAILED":
                self._job_status(job, "failed", info.message or "the Ray job failed", finished_at=now(),
                                 error=jobs.last_lines(log_text or info.message or ""), **update)
            elif status == "STOPPED":
                self._job_status(job, "cancelled", "the Ray job was stopped", finished_at=now(), **update)

    def _complete_job(self, job: CustomizationJob, update: dict) -> None:
        artifact_dir = job.output_dir
        try:
            result, evaluation = jobs.read_results(job.kind, artifact_dir, storage.parent(artifact_dir))
            base = job.spec["job"]["model"] if job.kind == "sweep" else job.spec["model"]
            model = self._entity_from_artifact(job.workspace, job.output_model, storage.join(artifact_dir, "onnx"), base,
                                               storage.join(artifact_dir, "model"), job.name, evaluation)
        except (OSError, ValueError, KeyError) as exc:
            self._job_status(job, "failed", "the job finished without a usable artifact", finished_at=now(),
                             error=f"the Ray job succeeded but its output in {artifact_dir} is not usable: {exc}", **update)
            return
        if self.store.get("model", job.workspace, job.output_model) is not None:
            self._job_status(job, "failed", "output model name taken", finished_at=now(),
                             error=f"model {job.output_model!r} was created meanwhile; the artifact stays in {artifact_dir}")
            return
        self._save(model)
        progress = update.get("progress") or job.progress
        progress = progress.model_copy(update={"step": progress.total_steps or progress.step, "percent": 100.0, "eta_seconds": 0})
        self._job_status(job, "completed", f"model {model.name} created: {evaluation.summary()}", finished_at=now(),
                         result=result, progress=progress)

    def _reconcile_export(self, model: ModelEntity) -> None:
        info = self._ray_job(model.source_job)
        status = getattr(info.status, "value", str(info.status)) if info else "GONE"
        if status in ("PENDING", "RUNNING") or (status == "GONE" and time.time() - model.created_at < SUBMIT_TIMEOUT_S):
            return  # running, or still being submitted
        log_text = ""
        if status == "FAILED":
            try:
                log_text = self._jobs_client().get_job_logs(model.source_job)
            except RuntimeError:
                pass
        with self._lock:
            model = self._fresh(model, ModelEntity)
            if model is None:
                return
            if status == "SUCCEEDED":
                try:
                    ready = self._entity_from_artifact(model.workspace, model.name, model.artifact.uri, model.base_model,
                                                       None, model.source_job, description=model.description)
                    self._save(ready.model_copy(update={"created_at": model.created_at}))
                except InvalidRequest as exc:
                    self._save(model.touched(status="failed", error=exc.message))
            else:
                why = {"GONE": "the export's Ray job is gone (cluster restarted); register the model again",
                       "STOPPED": "the export was stopped"}.get(status, jobs.last_lines(log_text or (info.message if info else "")))
                self._save(model.touched(status="failed", error=why))

    def _reconcile_deployment(self, dep: ModelDeployment, apps: dict[str, tuple[str, str]]) -> None:
        if dep.status == "DELETING":
            self._reconcile_delete(dep, apps)
            return
        due = [a for a, at in dep.retiring.items() if at <= time.time()]
        for app in due:
            deployments.delete(app)
        if due:
            with self._lock:
                fresh = self._fresh(dep, ModelDeployment)
                if fresh is not None:
                    dep = fresh.touched(retiring={a: t for a, t in fresh.retiring.items() if a not in due})
                    self._save(dep)
        if dep.status == "FAILED" and dep.pending_model is None:
            return
        # a generation to start: the first, a model swap, or a READY app that vanished (cluster restarted)
        lost = dep.status == "READY" and dep.app not in apps and dep.pending_app is None
        wants = dep.pending_app is None and (dep.status == "CREATED" or dep.pending_model is not None or lost)
        # a pending generation Serve does not know, deployed by an earlier incarnation of this actor:
        # the cluster went down before it ran (Serve lists an application as soon as it is deployed)
        vanished = dep.pending_app is not None and dep.pending_app not in apps and dep.pending_app not in self._started_apps
        if wants or vanished:
            self._start_generation(dep, lost or (vanished and dep.app not in apps), vanished=dep.pending_app if vanished else None)
            return
        if dep.pending_app is not None:
            self._watch_generation(dep, apps)

    def _start_generation(self, dep: ModelDeployment, lost: bool, vanished: str | None = None) -> None:
        target = dep.pending_model or dep.model
        try:
            with self._lock:
                model = self._model_for(dep.workspace, target)
                cfg = self._load("deployment_config", dep.workspace, dep.config, ModelDeploymentConfig)
            generation = dep.generation + 1
            settings = deployments.provider_settings(dep, cfg, model, generation)
            self._started_apps.add(settings.name)
            deployments.start(settings)  # outside the lock: a call to Serve's controller
            failure = None
        except Exception as exc:  # noqa: BLE001 - recorded on the deployment
            failure = exc
        with self._lock:
            fresh = self._fresh(dep, ModelDeployment)
        if fresh is None:  # deleted or changed meanwhile: the next pass starts what it wants now
            if failure is None:
                deployments.delete(settings.name)
            return
        with self._lock:
            dep = self._fresh(fresh, ModelDeployment)
            if dep is None:
                return
            if failure is not None:
                self._deployment_status(dep, "FAILED" if dep.status != "READY" else "READY",
                                        f"could not start model {target}: {failure}"[:1000], pending_model=None,
                                        error=str(failure)[:1000])
                return
            status = "READY" if dep.status == "READY" and not lost else "PENDING"
            gone = vanished or (dep.app if lost else None)
            reason = (f"application {gone} is gone (the cluster restarted); redeploying as generation {generation}" if gone
                      else f"starting generation {generation} with model {target}")
            if lost and self.store.delete("provider", dep.workspace, dep.name):
                self._bump_routes()
            self._deployment_status(dep, status, reason, generation=generation, pending_app=settings.name,
                                    pending_model=target, pending_since=now(), error=None)

    def _watch_generation(self, dep: ModelDeployment, apps: dict[str, tuple[str, str]]) -> None:
        status, message = apps.get(dep.pending_app, ("NOT_STARTED", ""))
        failure = None
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            failure = f"Serve reports {status}: {message}"[:2000]
        elif status != "RUNNING":
            if time.time() - (dep.pending_since or dep.updated_at) > PENDING_TIMEOUT_S:
                failure = f"not running after {PENDING_TIMEOUT_S:.0f} s (Serve: {status} {message})"[:2000]
            else:
                return
        model = self.store.get("model", dep.workspace, dep.pending_model)
        if failure is None:
            failure = deployments.probe(dep.pending_app, (model or {}).get("embedding_dim"))
            if failure is not None and time.time() - (dep.pending_since or dep.updated_at) < PENDING_TIMEOUT_S:
                return  # replicas may still be warming up; probe again next tick
        if failure is not None:  # outside the lock: a call to Serve's controller
            deployments.delete(dep.pending_app)
        with self._lock:
            dep = self._fresh(dep, ModelDeployment)
            if dep is None:
                return
            if failure is not None:
                swapping = dep.status == "READY"
                reason = (f"swap to model {dep.pending_model} failed, still serving {dep.model}: " if swapping else "") + failure
                self._deployment_status(dep, "READY" if swapping else "FAILED", reason, pending_app=None,
                                        pending_model=None, error=failure)
                return
            old = dep.app
            retiring = dict(dep.retiring)
            if old and old != dep.pending_app:
                retiring[old] = time.time() + RETIRE_AFTER_S
            dep = self._deployment_status(dep, "READY", f"model {dep.pending_model} answered a probe embedding",
                                          app=dep.pending_app, model=dep.pending_model, pending_app=None,
                                          pending_model=None, retiring=retiring, error=None)
            base = f"{self.base_url}/v2/workspaces/{dep.workspace}/inference/gateway"
            self._save(ModelProvider(workspace=dep.workspace, name=dep.name, deployment=dep.name, model=dep.model,
                                     app=dep.app, embedding_dim=(model or {}).get("embedding_dim"),
                                     routes={"model": f"{base}/model/{dep.model}/-/v1/embeddings",
                                             "provider": f"{base}/provider/{dep.name}/-/v1/embeddings",
                                             "openai": f"{self.base_url}/v1/embeddings"}))
            self._bump_routes()

    def _reconcile_delete(self, dep: ModelDeployment, apps: dict[str, tuple[str, str]]) -> None:
        mine = [a for a in (dep.app, dep.pending_app, *dep.retiring) if a]
        alive = [a for a in mine if a in apps]
        for app in alive:
            if apps[app][0] != "DELETING":
                deployments.delete(app)
        if alive:
            return
        with self._lock:
            if self._fresh(dep, ModelDeployment) is None:
                return
            self.store.delete("deployment", dep.workspace, dep.name)
            if dep.owns_config:
                self.store.delete("deployment_config", dep.workspace, dep.config)
            if self.store.delete("provider", dep.workspace, dep.name):
                self._bump_routes()


def _count_parameters(uri: str) -> int | None:
    """Parameters in a safetensors file in storage, read from its header alone (no torch)."""
    import struct

    try:
        size = struct.unpack("<Q", storage.read_head(uri, 8))[0]
        header = json.loads(storage.read_head(uri, 8 + size)[8:])
    except (OSError, ValueError, struct.error):
        return None
    total = 0
    for key, meta in header.items():
        if key != "__metadata__":
            n = 1
            for d in meta["shape"]:
                n *= d
            total += n
    return total
