"""Customization jobs: submitted as Ray jobs (ctx.ray_jobs), followed through Ray and their progress record."""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time

from cluster import job_files
from cluster.entities import JOB_DONE, CustomizationJob, ModelEntity, StatusChange, now
from cluster.services.base import DEFAULT_GPU_MEMORY_GIB, SUBMIT_TIMEOUT_S, Context, Service, check_body
from cluster.services.datasets import DatasetService
from cluster.services.models import ModelService
from rayembed import storage
from rayembed.config import places
from rayembed.errors import Conflict, InvalidRequest, Unavailable, shown
from rayembed.locations import Location, LocationError, parse

log = logging.getLogger(__name__)


class JobService(Service):
    """Customization jobs (training and sweeps), and reconciling each one against its Ray job. It resolves a job's
    dataset through the datasets service and makes the finished job's model entity through the models service."""

    def __init__(self, ctx: Context, datasets: DatasetService, models: ModelService):
        super().__init__(ctx)
        self.datasets, self.models = datasets, models

    # ---------------------------------------------------------------- customization jobs
    def create_job(self, workspace: str, body: dict, operator: bool = False) -> dict:
        """A customization job. From a tenant (the HTTP API: `operator` False) the spec names entities only: a
        dataset by name and a model entity or an allowed base model; every location is the server's choice
        (cluster.tenancy). The operator (the CLI over Ray) may give paths and URIs."""
        self.ctx.workspace(workspace)
        body = check_body("create_job", body)
        output_model = body["output_model"]
        kind = "sweep" if "sweep" in body else "training"
        spec = body[kind if kind == "sweep" else "config"]
        if not operator:
            spec = self._tenant_spec(workspace, kind, spec)
        given = spec.get("job") if kind == "sweep" else spec
        named = given.get("dataset") if isinstance(given, dict) else None
        dataset_name = named.get("name") if isinstance(named, dict) else None
        if kind == "sweep" and isinstance(spec.get("job"), dict):
            spec = {**spec, "job": self.datasets.resolve_spec(workspace, spec["job"], "sweep.job")}
        else:
            spec = self.datasets.resolve_spec(workspace, spec, "config")
        self.ctx.quota_for_job(workspace)
        self.ctx.quota_for_storage(workspace)
        self.models._name_free(workspace, output_model)  # fails fast, before anything is written
        job_id = job_files.new_job_id()
        job_dir = storage.join(self.ctx.workspace_root(workspace), "jobs", job_id)
        gpu_gib = float(os.environ.get("RAYEMBED_GPU_MEMORY_GIB", DEFAULT_GPU_MEMORY_GIB)) if self.ctx.ray_jobs.has_gpu() else None
        prepared = job_files.prepare(kind, spec, job_dir, gpu_gib)
        job = CustomizationJob(workspace=workspace, name=job_id, kind=kind, spec=prepared.spec, output_model=output_model,
                               output_dir=prepared.artifact_dir, ray_job_id=job_id, warnings=prepared.warnings,
                               gpu_estimate=prepared.gpu_estimate, status_history=[StatusChange(status="created")],
                               by_operator=operator)

        def attempt() -> CustomizationJob:  # again, against concurrent requests: quota, name, no upload on its dataset
            self.ctx.quota_for_job(workspace)
            self.models._name_free(workspace, output_model)
            if dataset_name is not None:
                self.datasets.resolve_spec(workspace, {"dataset": {"name": dataset_name}}, "config")
            self.ctx.create(job)  # created: it holds its output model's name while it is submitted
            return job

        try:
            self.ctx.admitted(workspace, attempt, self.ctx.remove)
        except (Conflict, InvalidRequest):
            storage.delete_tree(job_dir)  # the folder prepared for it
            raise
        self._submit(job, prepared.entrypoint, job_id, {"rayembed": "customization-job", "workspace": workspace,
                                                        "output_model": output_model})
        job = self.ctx.modify(lambda: self.ctx.load("job", workspace, job_id, CustomizationJob),
                              lambda j: _moved(j, "pending", "submitted to Ray as job " + job_id))
        return job.model_dump(mode="json")

    def _tenant_spec(self, workspace: str, kind: str, spec: dict) -> dict:
        """A tenant's spec checked and completed: no place but reads under the workspace's grants, the model an
        entity of the workspace or an allowed base model, mining's cache in the workspace's own folder."""
        from train.config import JobConfig
        from tune.config import SweepConfig

        field = "sweep" if kind == "sweep" else "config"
        self.ctx.confinement(workspace).job(SweepConfig if kind == "sweep" else JobConfig, spec, field)
        job = spec.get("job") if kind == "sweep" else spec
        if not isinstance(job, dict):
            return spec  # refused by validation, naming the key
        where = f"{field}.job" if kind == "sweep" else field
        job = dict(job)
        if "model" in job:
            job["model"] = self.ctx.trainable_model(workspace, job["model"], f"{where}.model")
        mining = (job.get("dataset") or {}).get("mining") if isinstance(job.get("dataset"), dict) else None
        if isinstance(mining, dict):
            cache = storage.join(self.ctx.workspace_root(workspace), "mining")
            job["dataset"] = {**job["dataset"], "mining": {**mining, "cache_dir": cache}}
        return {**spec, "job": job} if kind == "sweep" else job

    def _submit(self, job: CustomizationJob, entrypoint: str, ray_job_id: str, metadata: dict) -> None:
        """Submit a Ray job. Refused (Ray's job agent not up yet, the dashboard restarting), the job is marked failed
        with the reason, which frees its output model's name, and the caller gets a 503 to retry."""
        try:
            self.ctx.ray_jobs.submit(entrypoint, ray_job_id, metadata, job_files.progress_uri(job.output_dir))
        except Exception as exc:  # noqa: BLE001 - whatever Ray answered, the job did not start
            reason = f"Ray did not accept the submission: {type(exc).__name__}: {exc}"[:1000]
            self.ctx.modify(lambda: self.ctx.load("job", job.workspace, job.name, CustomizationJob),
                            lambda j: _moved(j, "failed", reason, error=reason, finished_at=now()))
            raise Unavailable(f"{reason}; nothing ran: retry in a few seconds (job {job.name} is marked failed)") from None

    def _status(self, job: CustomizationJob, status: str, reason: str = "", **changes) -> CustomizationJob | None:
        """Compare-and-set `job` to `status`: None when it changed since it was read (the next pass sees it anew)."""
        return self.ctx.replace(job, _moved(job, status, reason, **changes))

    def list_jobs(self, workspace: str) -> list[dict]:
        self.ctx.workspace(workspace)
        return [j.model_dump(mode="json") for j in sorted(self.ctx.all("job", CustomizationJob, workspace),
                                                           key=lambda j: j.created_at, reverse=True)]

    def get_job(self, workspace: str, job_id: str) -> dict:
        self.ctx.workspace(workspace)
        return self.ctx.load("job", workspace, job_id, CustomizationJob).model_dump(mode="json")

    def job_status(self, workspace: str, job_id: str) -> dict:
        job = self.get_job(workspace, job_id)
        return {k: job[k] for k in ("name", "status", "progress", "status_history", "error", "output_model",
                                    "started_at", "finished_at", "warnings")}

    def cancel_job(self, workspace: str, job_id: str) -> dict:
        def change(job: CustomizationJob) -> CustomizationJob:
            if job.status in JOB_DONE:
                raise Conflict(f"job {job_id} is already {job.status}")
            return _moved(job, "cancelled", "cancelled by request; the Ray job was stopped", finished_at=now())

        job = self.ctx.modify(lambda: self.ctx.load("job", self.ctx.workspace(workspace), job_id, CustomizationJob), change)
        try:  # after the row says cancelled (the reconciler leaves it alone)
            self.ctx.ray_jobs.stop(job.ray_job_id)
        except Exception as exc:  # noqa: BLE001 - a job Ray no longer has is stopped
            log.warning("stopping Ray job %s: %s", job.ray_job_id, exc)
        return job.model_dump(mode="json")

    def resume_job(self, workspace: str, job_id: str) -> dict:
        """Submit a failed or cancelled training job again, as a new Ray job over the same folder: the job
        finds its config unchanged and Ray Train restores the last checkpoint registered under it."""
        self.ctx.workspace(workspace)
        job = self.ctx.load("job", workspace, job_id, CustomizationJob)
        if job.status not in ("failed", "cancelled"):
            raise Conflict(f"job {job_id} is {job.status}; only a failed or cancelled job can be resumed")
        if job.kind != "training":
            raise Conflict(f"job {job_id} is a sweep: create it again (a sweep's trials are not resumed)")
        if not job.by_operator:
            self._readable_today(job)
        self.ctx.quota_for_storage(workspace, "job_id")
        config_path = storage.join(storage.parent(job.output_dir), "job.yaml")
        if not storage.is_file(config_path):
            raise Conflict(f"job {job_id}'s config {config_path} is gone; create the job again")
        attempt = 1 + sum(1 for h in job.status_history if h.status == "pending")
        ray_job_id = f"{job.name}-{attempt}"

        def claim() -> CustomizationJob:  # unfinished again, it holds its output model's name (and its quota)
            current = self.ctx.load("job", workspace, job_id, CustomizationJob)
            if (current.status, current.updated_at) != (job.status, job.updated_at):
                raise Conflict(f"job {job_id} changed meanwhile (it is {current.status}); look at it and try again")
            self.ctx.quota_for_job(workspace)
            if self.store.get("model", workspace, job.output_model) is not None:
                raise Conflict(f"model {job.output_model!r} exists meanwhile; the job's files stay in {job.output_dir}")
            resumed = self._status(current, "pending", f"resumed as Ray job {ray_job_id} (attempt {attempt}) from the "
                                   "last checkpoint in " + storage.join(job.output_dir, "checkpoints"),
                                   ray_job_id=ray_job_id, finished_at=None, error=None)
            if resumed is None:
                raise Conflict(f"job {job_id} changed meanwhile; try again")
            return resumed

        resumed = self.ctx.admitted(workspace, claim, lambda r: self.ctx.replace(r, job))
        entrypoint = f"{shlex.quote(sys.executable)} -m train --config {shlex.quote(config_path)}"
        try:
            self.ctx.ray_jobs.submit(entrypoint, ray_job_id, {"rayembed": "customization-job", "workspace": workspace,
                                                              "output_model": job.output_model, "resumes": job.name},
                                     job_files.progress_uri(job.output_dir))
        except Exception as exc:  # noqa: BLE001 - the job goes back to what it was
            self.ctx.replace(resumed, job)
            raise Unavailable(f"Ray did not accept the resubmission: {type(exc).__name__}: {exc}"[:1000] +
                              f"; job {job_id} is still {job.status}: retry in a few seconds") from None
        return resumed.model_dump(mode="json")

    def delete_job(self, workspace: str, job_id: str) -> dict:
        """A finished job, and its folder (config, checkpoints, progress, output). Refused while it runs, and while
        the model it made exists: that model's files are in the job's folder."""
        def attempt() -> CustomizationJob:
            job = self.ctx.load("job", self.ctx.workspace(workspace), job_id, CustomizationJob)
            if job.status not in JOB_DONE:
                raise Conflict(f"job {job_id} is {job.status}; cancel it first")
            made = [m.name for m in self.ctx.all("model", ModelEntity, workspace) if m.source_job == job.name]
            if made:
                raise Conflict(f"job {job_id} made model {made[0]!r}, whose files are in the job's folder; delete the "
                               "model first (its deployments before it)")
            info = self.ctx.ray_jobs.info(job.ray_job_id) if job.ray_job_id else None
            if info is not None and getattr(info.status, "value", str(info.status)) in ("PENDING", "RUNNING"):
                raise Conflict(f"job {job_id} is {job.status}, but its Ray job {job.ray_job_id} is still stopping (it "
                               "would write into its folder again); try again in a few seconds")
            if not self.ctx.remove(job):
                raise Conflict(f"job {job_id} changed while it was being deleted; try again")
            return job

        job = self.ctx.admitted(workspace, attempt, lambda j: self.ctx.create(j))
        try:
            storage.delete_tree(storage.join(self.ctx.workspace_root(workspace), "jobs", job.name))  # the id: never reused
        except Exception as exc:  # noqa: BLE001 - the record comes back, so the files can be deleted again
            self.ctx.create(job)
            raise Unavailable(f"job {job_id}'s folder could not be deleted ({type(exc).__name__}: {exc}); retry") from None
        return {"name": job_id, "deleted": True}

    def _readable_today(self, job: CustomizationJob) -> None:
        """A tenant's job, resumed, reads only what its workspace may read today: its own folder (its datasets, models
        and mining cache), its grants as they are now (one revoked since is a 400), a base model still allowed."""
        from train.config import JobConfig

        own = parse(self.ctx.workspace_root(job.workspace), "the workspace's folder")
        confinement = self.ctx.confinement(job.workspace)
        for key, kind, value in places(JobConfig, job.spec):
            where = f"config.{key}"
            if kind == "write" or _within(value, own):
                continue
            if kind == "model":
                if value not in self.ctx.base_models:
                    raise InvalidRequest(f"{where}: base model {shown(value)} is no longer one the operator allows "
                                         f"({', '.join(self.ctx.base_models)}); create the job again on one of them", where)
            else:
                confinement.read(value, where)

    def job_logs(self, workspace: str, job_id: str) -> str:
        self.ctx.workspace(workspace)
        job = self.ctx.load("job", workspace, job_id, CustomizationJob)
        try:
            return self.ctx.ray_jobs.logs(job.ray_job_id)
        except RuntimeError as exc:
            return f"(the Ray job's logs are not available: {exc})\n" + (job.error or "")

    # ---------------------------------------------------------------- the reconcile step
    def reconcile(self, job: CustomizationJob) -> None:
        """A job not yet finished, against its Ray job: its status and progress, its model once it succeeded."""
        if job.status == "created":  # being submitted right now, unless the actor died in between
            if time.time() - job.updated_at > SUBMIT_TIMEOUT_S:
                self._settle_submission(job)
            return
        info = self.ctx.ray_jobs.info(job.ray_job_id)
        status = getattr(info.status, "value", str(info.status)) if info else None
        # progress: the record the job writes to storage (a small read), not its log; the log only when it failed
        progress = job_files.read_job_progress(job.output_dir) if status in ("RUNNING", "FAILED", "SUCCEEDED") else None
        log_text = None
        if status == "FAILED":
            try:
                log_text = self.ctx.ray_jobs.logs(job.ray_job_id)
            except RuntimeError:
                log_text = ""
        update = {"progress": progress} if progress and progress != job.progress else {}
        if info is None:
            self._status(job, "failed", "the Ray job is gone: the cluster restarted while it ran", finished_at=now(),
                         error=f"the Ray job {job.ray_job_id} no longer exists (the Ray cluster was restarted while "
                               f"it was {job.status}); its files are in {storage.parent(job.output_dir)}; "
                               "create the job again")
        elif status == "PENDING" and job.status != "pending":
            self._status(job, "pending", info.message or "waiting for resources")
        elif status == "RUNNING":
            if job.status != "running":
                self._status(job, "running", "the Ray job started", started_at=now(), **update)
            elif update:
                self.ctx.replace(job, job.model_copy(update=update))
        elif status == "SUCCEEDED":
            self._complete(job, update, self._read_outcome(job))
        elif status == "FAILED":
            self._status(job, "failed", info.message or "the Ray job failed", finished_at=now(),
                         error=job_files.failure(log_text, info.message), **update)
        elif status == "STOPPED":
            self._status(job, "cancelled", "the Ray job was stopped", finished_at=now(), **update)

    def _settle_submission(self, job: CustomizationJob) -> None:
        """A job left `created` by an actor that died while submitting it: pending if Ray has it, else failed."""
        if self.ctx.ray_jobs.info(job.ray_job_id) is not None:
            self._status(job, "pending", "submitted to Ray as job " + job.ray_job_id)
        else:
            self._status(job, "failed", "its submission to Ray never completed (the control plane restarted "
                         "meanwhile); nothing ran: create the job again", finished_at=now(),
                         error="the submission to Ray never completed; nothing ran")

    def _read_outcome(self, job: CustomizationJob) -> tuple[dict, ModelEntity] | str:
        """A finished job's result and the model entity its artifact makes, read from storage; or why its output
        is not usable."""
        artifact_dir = job.output_dir
        try:
            result, evaluation = job_files.read_results(job.kind, artifact_dir, storage.parent(artifact_dir))
            base = job.spec["job"]["model"] if job.kind == "sweep" else job.spec["model"]
            model = self.models.entity_from_artifact(job.workspace, job.output_model, storage.join(artifact_dir, "onnx"),
                                                     base, storage.join(artifact_dir, "model"), job.name, evaluation)
        except (OSError, ValueError, KeyError, InvalidRequest) as exc:
            return f"the Ray job succeeded but its output in {artifact_dir} is not usable: {exc}"
        return result, model

    def _complete(self, job: CustomizationJob, update: dict, outcome: tuple[dict, ModelEntity] | str) -> None:
        artifact_dir = job.output_dir
        if isinstance(outcome, str):
            self._status(job, "failed", "the job finished without a usable artifact", finished_at=now(),
                         error=outcome, **update)
            return
        result, model = outcome
        try:
            self.ctx.create(model)
        except Conflict:
            self._status(job, "failed", "output model name taken", finished_at=now(),
                         error=f"model {job.output_model!r} was created meanwhile; the artifact stays in {artifact_dir}")
            return
        progress = update.get("progress") or job.progress
        progress = progress.model_copy(update={"step": progress.total_steps or progress.step, "percent": 100.0, "eta_seconds": 0})
        if self._status(job, "completed", f"model {model.name} created: {model.evaluation.summary()}", finished_at=now(),
                        result=result, progress=progress) is None:
            self.ctx.remove(model)  # the job changed meanwhile (cancelled): no model; the next pass looks again

    # ---------------------------------------------------------------- metrics history (the console plots it)
    def job_metrics(self, workspace: str, job_id: str, page: int = 1, page_size: int = 500) -> dict:
        """The job's training records and validations (cluster/metrics.py), one page of them."""
        from cluster import metrics

        return metrics.job_metrics(self.get_job(workspace, job_id), page, page_size)


def _moved(job: CustomizationJob, status: str, reason: str = "", **changes) -> CustomizationJob:
    """`job` in `status`, with the change in its history (a change to the same status adds none)."""
    history = job.status_history + ([StatusChange(status=status, reason=reason)] if status != job.status else [])
    return job.model_copy(update={"status": status, "status_history": history, **changes})


def _within(value, root: Location) -> bool:
    try:
        return parse(value, "location").within(root)
    except LocationError:
        return False
