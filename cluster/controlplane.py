"""The ControlPlane: a detached, named Ray actor that owns the state and every lifecycle.

It is built from one service per resource (cluster/services/): workspaces and keys, datasets, models, jobs,
deployment configs and deployments, and the verification of what is served. Each service is an object made with
what it needs, the Context (the store, storage, the Ray jobs and Serve adapters, the operator's settings) and the
services it calls, passed in explicitly. The ControlPlane routes each public call (the API ingress and the CLI call
them through Ray) to its service, and reconciles once a second: each unfinished job, exporting model and deployment
goes to its service's `reconcile(entity)`, one task per entity at a time. Killed, Ray restarts it; it reloads the
store and picks every lifecycle up where it was.

No lock is held across any I/O: every write is a compare-and-set in the store (cluster/services/base.py).
"""

from __future__ import annotations

import functools
import logging
import threading
import uuid
from concurrent import futures
from pathlib import Path

from cluster import serve_apps
from cluster.entities import DEFAULT_WORKSPACE, JOB_DONE, CustomizationJob, ModelDeployment, ModelEntity, Workspace
from cluster.ray_jobs import RayJobs
from cluster.services.base import Context
from cluster.services.datasets import DatasetService
from cluster.services.deployments import DeploymentService
from cluster.services.jobs import JobService
from cluster.services.models import ModelService
from cluster.services.verification import VerificationService
from cluster.services.workspaces import WorkspaceService
from cluster.store import open_store, redacted
from cluster.tenancy import allowed_base_models

log = logging.getLogger(__name__)
TICK_S = 1.0
RECONCILE_WORKERS = 16  # entities reconciled at once (each task is mostly waiting on Ray or a probe)
# the public calls, by the service that answers them (the API ingress and the CLI call these names through Ray)
ROUTES: dict[str, tuple[str, ...]] = {
    "workspaces": ("create_key", "open_mode", "set_open_mode", "list_keys", "revoke_key", "list_workspaces",
                   "create_workspace", "get_workspace", "delete_workspace", "grant_data", "revoke_grant", "set_quota",
                   "set_policy",
                   "list_providers", "get_provider", "routes"),
    "datasets": ("create_dataset", "list_datasets", "get_dataset", "begin_upload", "end_upload", "add_dataset_file",
                 "delete_dataset"),
    "models": ("list_models", "get_model", "create_model", "delete_model"),
    "jobs": ("create_job", "list_jobs", "get_job", "job_status", "cancel_job", "resume_job", "delete_job", "job_logs",
             "job_metrics"),
    "deployments": ("create_deployment_config", "update_deployment_config", "get_deployment_config",
                    "list_deployment_configs", "delete_deployment_config", "create_deployment", "update_deployment",
                    "get_deployment", "export_deployment", "list_deployments", "delete_deployment", "verify_deployment",
                    "search_deployment"),
}


class ControlPlane:
    """The one actor: the services, every public call routed to one of them (ROUTES), and the reconciler."""

    def __init__(self, home: str, dashboard_url: str, base_url: str, state_url: str | None = None,
                 data_roots: list[str] | None = None, storage_root: str | None = None,
                 base_models: list[str] | None = None, driver: dict | None = None, serve=serve_apps):
        self.home = Path(home)
        self.state_url = state_url or str(self.home / "state.db")
        self.store = open_store(self.state_url)
        self.ctx = Context(store=self.store, storage=storage_root or str(self.home), home=self.home,
                           ray_jobs=RayJobs(dashboard_url, driver), serve=serve, base_url=base_url,
                           data_roots=list(data_roots or []), base_models=allowed_base_models(base_models))
        self.workspaces = WorkspaceService(self.ctx)
        self.datasets = DatasetService(self.ctx)
        self.models = ModelService(self.ctx)
        self.jobs = JobService(self.ctx, datasets=self.datasets, models=self.models)
        self.verification = VerificationService(self.ctx)
        self.deployments = DeploymentService(self.ctx, verification=self.verification)
        if self.store.get("workspace", "", DEFAULT_WORKSPACE) is None:
            self.store.put("workspace", "", DEFAULT_WORKSPACE, Workspace(
                name=DEFAULT_WORKSPACE, description="always exists", uid=uuid.uuid4().hex[:12]).model_dump(mode="json"),
                expect=None)
        self._pool = futures.ThreadPoolExecutor(max_workers=RECONCILE_WORKERS, thread_name_prefix="reconcile")
        self._tasks_lock = threading.Lock()
        self._running: set[tuple] = set()  # (kind, workspace, name) with a reconcile task in flight
        self._stop = threading.Event()
        threading.Thread(target=self._loop, name="reconcile", daemon=True).start()

    def ping(self) -> dict:
        return {"ok": True, "schema_version": self.store.schema_version(), "home": str(self.home),
                "storage": self.ctx.storage, "state": redacted(self.state_url), "api_keys": len(self.store.list("apikey")),
                "data_roots": self.ctx.data_roots, "base_models": self.ctx.base_models,
                "open": self.workspaces.open_mode()}

    # ---------------------------------------------------------------- the reconciler
    def _loop(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self.reconcile(wait=False)
            except Exception:  # noqa: BLE001 - keep reconciling; the next tick retries
                log.exception("reconcile failed")

    def reconcile(self, wait: bool = True) -> None:
        """One pass over every unfinished job, exporting model and deployment, each in its own task, concurrently;
        one still running from an earlier pass is skipped, so a slow probe or Ray call holds up only its own
        entity. `wait`: return when this pass's tasks are done (the loop does not wait)."""
        tasks = []
        for job in self.ctx.all("job", CustomizationJob):
            if job.status not in JOB_DONE:
                tasks.append(self._spawn(("job", job.workspace, job.name), self.jobs.reconcile, job))
        for model in self.ctx.all("model", ModelEntity):
            if model.status == "exporting":
                tasks.append(self._spawn(("model", model.workspace, model.name), self.models.reconcile, model))
        apps = self.ctx.serve.statuses()
        for dep in self.ctx.all("deployment", ModelDeployment):
            tasks.append(self._spawn(("deployment", dep.workspace, dep.name), self.deployments.reconcile, dep, apps))
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


def _route(service: str, method: str):
    target = getattr({"workspaces": WorkspaceService, "datasets": DatasetService, "models": ModelService,
                      "jobs": JobService, "deployments": DeploymentService}[service], method)

    @functools.wraps(target)
    def call(self, *args, **kwargs):
        return getattr(getattr(self, service), method)(*args, **kwargs)

    return call


for _service, _methods in ROUTES.items():
    for _method in _methods:
        setattr(ControlPlane, _method, _route(_service, _method))
