"""Customization jobs: submitted as Ray jobs (outside the store lock), followed through Ray and their progress record."""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys

from cluster import jobs
from cluster.entities import JOB_DONE, CustomizationJob, ModelEntity, StatusChange, now
from cluster.schemas import JobCreate
from rayembed import storage
from rayembed.progress import PROGRESS_ENV
from cluster.services.base import DEFAULT_GPU_MEMORY_GIB, JOB_ENV, Core, check_name, validated

DRIVER_CPUS = 0.25  # a job's driver mostly waits on its Ray Train worker, which reserves its own CPUs (or GPU)
DRIVER_MEMORY_BYTES = 1 * 2**30


def driver_reservation() -> dict:
    """What each job's driver reserves, so drivers never pile up unaccounted: RAYEMBED_DRIVER_CPUS (default 0.25) and
    1 GiB, plus RAYEMBED_DRIVER_RESOURCES (JSON custom resources). A head started with no CPUs (KubeRay's advice) keeps
    the drivers with `RAYEMBED_DRIVER_CPUS=0` and a custom resource it alone has, e.g. `ray start --head --resources
    '{"driver": 8}'` and RAYEMBED_DRIVER_RESOURCES='{"driver": 1}': at most 8 drivers at once, all on the head."""
    cpus = float(os.environ.get("RAYEMBED_DRIVER_CPUS", DRIVER_CPUS))
    extra = json.loads(os.environ.get("RAYEMBED_DRIVER_RESOURCES") or "{}")
    return {"entrypoint_num_cpus": cpus, "entrypoint_memory": DRIVER_MEMORY_BYTES,
            **({"entrypoint_resources": extra} if extra else {})}
from rayembed.errors import Conflict, InvalidRequest, Unavailable

log = logging.getLogger(__name__)


class JobService(Core):
    """Customization jobs (training and sweeps), and reconciling each one against its Ray job."""

    # ---------------------------------------------------------------- customization jobs
    def _job_request(self, progress_uri: str | None = None) -> dict:
        """What a job's Ray submission asks for. Its driver reserves no GPU: the Ray Train worker it starts holds
        the GPU (a driver holding one would leave a one-GPU cluster's worker unplaceable). A pinned accelerator
        type (RAYEMBED_ACCELERATOR_TYPE) goes to the worker, and so does where to write its progress record."""
        env = {k: os.environ[k] for k in JOB_ENV if os.environ.get(k)}
        if progress_uri:
            env[PROGRESS_ENV] = progress_uri
        return {**self.driver, **({"runtime_env": {"env_vars": env}} if env else {})}

    def _cluster_has_gpu(self) -> bool:
        import ray

        return ray.cluster_resources().get("GPU", 0) >= 1

    def create_job(self, workspace: str, body: dict, operator: bool = False) -> dict:
        """A customization job. From a tenant (the HTTP API: `operator` False) the spec names entities only: a
        dataset by name and a model entity or an allowed base model; every location is the server's choice
        (cluster.tenancy). The operator (the CLI over Ray) may give paths and URIs."""
        self._workspace(workspace)
        output_model = check_name(body.get("output_model"), "output model", "output_model")
        if ("config" in body) == ("sweep" in body):
            raise InvalidRequest("give exactly one of config (a training job config) or sweep (a learning-rate sweep)", "config")
        kind = "sweep" if "sweep" in body else "training"
        spec = body[kind if kind == "sweep" else "config"]
        if not isinstance(spec, dict):
            raise InvalidRequest(f"{'sweep' if kind == 'sweep' else 'config'} must be a JSON object", "config")
        validated(JobCreate, body, "customization job")
        if not operator:
            spec = self._tenant_spec(workspace, kind, spec)
        named = ((spec.get("job") if kind == "sweep" else spec) or {}).get("dataset")
        dataset_name = named.get("name") if isinstance(named, dict) else None
        if kind == "sweep" and isinstance(spec.get("job"), dict):
            spec = {**spec, "job": self._with_dataset(workspace, spec["job"], "sweep.job")}
        else:
            spec = self._with_dataset(workspace, spec, "config")
        self._quota_for_job(workspace)
        self._output_model_free(workspace, output_model)  # fails fast, before anything is written
        job_id = jobs.new_job_id()
        job_dir = storage.join(self._workspace_root(workspace), "jobs", job_id)
        # outside the lock: a call to Ray (the cluster's GPUs) and the job's folder written to storage
        gpu_gib = float(os.environ.get("RAYEMBED_GPU_MEMORY_GIB", DEFAULT_GPU_MEMORY_GIB)) if self._cluster_has_gpu() else None
        prepared = jobs.prepare(kind, spec, job_dir, gpu_gib)
        try:
            with self._lock:
                self._output_model_free(workspace, output_model)  # again: another request may have taken it meanwhile
                if dataset_name is not None:  # and no upload began on its dataset meanwhile
                    self._with_dataset(workspace, {"dataset": {"name": dataset_name}}, "config")
                job = self._created_job(workspace, job_id, kind, output_model, prepared)
        except Conflict:
            storage.delete_tree(job_dir)  # the folder prepared for it (outside the lock)
            raise
        self._submit(job, prepared.entrypoint, job_id, {"rayembed": "customization-job", "workspace": workspace,
                                                        "output_model": output_model})
        with self._lock:
            job = self._job_status(self._fresh(job, CustomizationJob) or job, "pending", "submitted to Ray as job " + job_id)
        return job.model_dump(mode="json")

    def _tenant_spec(self, workspace: str, kind: str, spec: dict) -> dict:
        """A tenant's spec checked and completed: no place but reads under the workspace's grants, the model an
        entity of the workspace or an allowed base model, mining's cache in the workspace's own folder."""
        from train.config import JobConfig
        from tune.config import SweepConfig

        field = "sweep" if kind == "sweep" else "config"
        self._confinement(workspace).job(SweepConfig if kind == "sweep" else JobConfig, spec, field)
        job = spec.get("job") if kind == "sweep" else spec
        if not isinstance(job, dict):
            return spec  # refused by validation, naming the key
        where = f"{field}.job" if kind == "sweep" else field
        job = dict(job)
        if "model" in job:
            job["model"] = self._trainable_model(workspace, job["model"], f"{where}.model")
        mining = (job.get("dataset") or {}).get("mining") if isinstance(job.get("dataset"), dict) else None
        if isinstance(mining, dict):
            cache = storage.join(self._workspace_root(workspace), "mining")
            job["dataset"] = {**job["dataset"], "mining": {**mining, "cache_dir": cache}}
        return {**spec, "job": job} if kind == "sweep" else job

    def _created_job(self, workspace: str, job_id: str, kind: str, output_model: str, prepared) -> CustomizationJob:
        job = CustomizationJob(workspace=workspace, name=job_id, kind=kind, spec=prepared.spec, output_model=output_model,
                               output_dir=prepared.artifact_dir, ray_job_id=job_id, warnings=prepared.warnings,
                               gpu_estimate=prepared.gpu_estimate, status_history=[StatusChange(status="created")])
        self._save(job)  # created: it holds its output model's name while it is submitted
        return job

    def _output_model_free(self, workspace: str, output_model: str) -> None:
        if self.store.get("model", workspace, output_model) is not None:
            raise Conflict(f"model {output_model!r} already exists in workspace {workspace!r}: choose another output_model")
        clash = [j.name for j in self._all("job", CustomizationJob, workspace)
                 if j.output_model == output_model and j.status not in JOB_DONE]
        if clash:
            raise Conflict(f"job {clash[0]} already creates model {output_model!r}")

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
        outcome = self._read_outcome(job) if status == "SUCCEEDED" else None
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
                self._complete_job(job, update, outcome)
            elif status == "FAILED":
                self._job_status(job, "failed", info.message or "the Ray job failed", finished_at=now(),
                                 error=jobs.failure(log_text, info.message), **update)
            elif status == "STOPPED":
                self._job_status(job, "cancelled", "the Ray job was stopped", finished_at=now(), **update)


    def _read_outcome(self, job: CustomizationJob) -> tuple[dict, ModelEntity] | str:
        """A finished job's result and the model entity its artifact makes, read from storage (before the lock is
        taken); or why its output is not usable."""
        artifact_dir = job.output_dir
        try:
            result, evaluation = jobs.read_results(job.kind, artifact_dir, storage.parent(artifact_dir))
            base = job.spec["job"]["model"] if job.kind == "sweep" else job.spec["model"]
            model = self._entity_from_artifact(job.workspace, job.output_model, storage.join(artifact_dir, "onnx"), base,
                                               storage.join(artifact_dir, "model"), job.name, evaluation)
        except (OSError, ValueError, KeyError, InvalidRequest) as exc:
            return f"the Ray job succeeded but its output in {artifact_dir} is not usable: {exc}"
        return result, model

    def _complete_job(self, job: CustomizationJob, update: dict, outcome: tuple[dict, ModelEntity] | str) -> None:
        artifact_dir = job.output_dir
        if isinstance(outcome, str):
            self._job_status(job, "failed", "the job finished without a usable artifact", finished_at=now(),
                             error=outcome, **update)
            return
        result, model = outcome
        if self.store.get("model", job.workspace, job.output_model) is not None:
            self._job_status(job, "failed", "output model name taken", finished_at=now(),
                             error=f"model {job.output_model!r} was created meanwhile; the artifact stays in {artifact_dir}")
            return
        self._save(model)
        progress = update.get("progress") or job.progress
        progress = progress.model_copy(update={"step": progress.total_steps or progress.step, "percent": 100.0, "eta_seconds": 0})
        self._job_status(job, "completed", f"model {model.name} created: {model.evaluation.summary()}", finished_at=now(),
                         result=result, progress=progress)

    # ---------------------------------------------------------------- metrics history (issue 36: the console plots it)
    def job_metrics(self, workspace: str, job_id: str, page: int = 1, page_size: int = 500) -> dict:
        """The job's training records and validations (cluster/metrics.py), one page of them."""
        from cluster import metrics

        return metrics.job_metrics(self.get_job(workspace, job_id), page, page_size)
