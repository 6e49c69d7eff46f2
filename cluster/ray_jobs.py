"""Ray's job API as the control plane uses it: submit a job's driver with its reservation, stop it, read its
status and its log. One object (built by ControlPlane with the dashboard's address), so a test can pass a fake."""

from __future__ import annotations

import json
import os

from rayembed.progress import PROGRESS_ENV

DRIVER_CPUS = 0.25  # a job's driver mostly waits on its Ray Train worker, which reserves its own CPUs (or GPU)
DRIVER_MEMORY_BYTES = 1 * 2**30
# what the control plane passes on to its jobs (storage credentials and node-local folders come from each node)
JOB_ENV = ("RAYEMBED_ACCELERATOR_TYPE",)


def driver_reservation() -> dict:
    """What each job's driver reserves, so drivers never pile up unaccounted: RAYEMBED_DRIVER_CPUS (default 0.25) and
    1 GiB, plus RAYEMBED_DRIVER_RESOURCES (JSON custom resources). A head started with no CPUs (KubeRay's advice) keeps
    the drivers with `RAYEMBED_DRIVER_CPUS=0` and a custom resource it alone has, e.g. `ray start --head --resources
    '{"driver": 8}'` and RAYEMBED_DRIVER_RESOURCES='{"driver": 1}': at most 8 drivers at once, all on the head."""
    cpus = float(os.environ.get("RAYEMBED_DRIVER_CPUS", DRIVER_CPUS))
    extra = json.loads(os.environ.get("RAYEMBED_DRIVER_RESOURCES") or "{}")
    return {"entrypoint_num_cpus": cpus, "entrypoint_memory": DRIVER_MEMORY_BYTES,
            **({"entrypoint_resources": extra} if extra else {})}


class RayJobs:
    """Submit, stop and follow Ray jobs through the dashboard's job API (a network call each: never under a lock)."""

    def __init__(self, dashboard_url: str, driver: dict | None = None):
        self.dashboard_url = dashboard_url
        self.driver = driver if driver is not None else driver_reservation()  # what each job's driver reserves
        self._client = None

    def client(self):
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(self.dashboard_url)
        return self._client

    def request(self, progress_uri: str | None = None) -> dict:
        """What a job's Ray submission asks for. Its driver reserves no GPU: the Ray Train worker it starts holds
        the GPU (a driver holding one would leave a one-GPU cluster's worker unplaceable). A pinned accelerator
        type (RAYEMBED_ACCELERATOR_TYPE) goes to the worker, and so does where to write its progress record."""
        env = {k: os.environ[k] for k in JOB_ENV if os.environ.get(k)}
        if progress_uri:
            env[PROGRESS_ENV] = progress_uri
        return {**self.driver, **({"runtime_env": {"env_vars": env}} if env else {})}

    def submit(self, entrypoint: str, submission_id: str, metadata: dict, progress_uri: str | None = None) -> None:
        self.client().submit_job(entrypoint=entrypoint, submission_id=submission_id, metadata=metadata,
                                 **self.request(progress_uri))

    def stop(self, job_id: str) -> None:
        self.client().stop_job(job_id)

    def info(self, job_id: str):
        """Ray's JobInfo, or None when the cluster does not know the job (restarted since)."""
        try:
            return self.client().get_job_info(job_id)
        except RuntimeError:
            return None

    def logs(self, job_id: str) -> str:
        """The driver's log; raises RuntimeError when Ray has none."""
        return self.client().get_job_logs(job_id)

    def has_gpu(self) -> bool:
        import ray

        return ray.cluster_resources().get("GPU", 0) >= 1
