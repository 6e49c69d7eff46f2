"""The ControlPlane: a detached, named Ray actor that owns the state and every lifecycle.

It validates and stores entities (cluster.store), submits customization jobs and base-model exports
as Ray jobs, and reconciles once a second: job status and progress from Ray, deployments from Serve
(PENDING -> READY once the application runs and a probe embedding comes back; then its provider
exists and the gateway's routes change), model swaps as a new generation beside the old one, and
deletions. Killed, Ray restarts it; it reloads the store and picks every lifecycle up where it was.

The parts: one service per resource in cluster/services/ (workspaces and keys, models, datasets, jobs, deployment
configs and deployments), each with its routes and its entity's reconcile step; this module composes them into the
one actor and runs the reconciler. No network call is made under the store lock.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent import futures
from pathlib import Path

from cluster.entities import DEFAULT_WORKSPACE, JOB_DONE, CustomizationJob, ModelDeployment, ModelEntity, Workspace
from cluster import deployments
from cluster.services.base import SUBMIT_TIMEOUT_S, check_name  # noqa: F401 - check_name: imported from here by tests
from cluster.services.datasets import DatasetService
from cluster.services.deployments import DeploymentService
from cluster.services.jobs import JobService, driver_reservation
from cluster.services.verification import VerificationService
from cluster.services.models import ModelService
from cluster.services.workspaces import WorkspaceService
from cluster.store import open_store
from cluster.tenancy import allowed_base_models

log = logging.getLogger(__name__)
TICK_S = 1.0
RECONCILE_WORKERS = 16  # entities reconciled at once (each task is mostly waiting on Ray or a probe)


class ControlPlane(WorkspaceService, ModelService, DatasetService, JobService, DeploymentService, VerificationService):
    """The one actor: every service's routes (its methods, called by the API ingress and the CLI through Ray), and
    the reconciler, which runs each entity's own reconcile step on a pool, one task per entity at a time."""

    def __init__(self, home: str, dashboard_url: str, base_url: str, state_url: str | None = None,
                 data_roots: list[str] | None = None, storage_root: str | None = None,
                 base_models: list[str] | None = None, driver: dict | None = None):
        self.home = Path(home)
        self.storage = storage_root or str(self.home)  # datasets, jobs' outputs, models: shared by every node
        self.data_roots = list(data_roots or [])  # single-tenant installs: where every workspace's jobs may read
        self.base_models = allowed_base_models(base_models)  # what a tenant may name as a job's or a model's base
        self.driver = driver if driver is not None else driver_reservation()  # what each job's driver reserves
        self.dashboard_url = dashboard_url
        self.base_url = base_url
        self.state_url = state_url or str(self.home / "state.db")
        self.store = open_store(self.state_url)
        self._lock = threading.RLock()
        self._routes_version = time.time_ns()  # a restart changes it, so every gateway re-reads the routes
        self._client = None
        self._started_apps: set[str] = set()  # Serve applications this incarnation deployed
        self._graphs: set[tuple] = set()  # (artifact, digest, graph) found in storage (cluster/services/deployments.py)
        if self.store.get("workspace", "", DEFAULT_WORKSPACE) is None:
            self._save(Workspace(name=DEFAULT_WORKSPACE, description="always exists", uid=uuid.uuid4().hex[:12]))
        self._pool = futures.ThreadPoolExecutor(max_workers=RECONCILE_WORKERS, thread_name_prefix="reconcile")
        self._tasks_lock = threading.Lock()
        self._running: set[tuple] = set()  # (kind, workspace, name) with a reconcile task in flight
        self._stop = threading.Event()
        threading.Thread(target=self._loop, name="reconcile", daemon=True).start()

    # ---------------------------------------------------------------- the reconciler
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

