"""Each control-plane service alone: built with an in-memory store and fake Ray and Serve adapters, as
cluster/controlplane.py builds it with the real ones. And the compare-and-set that replaced the one lock: concurrent
requests never overwrite each other, and a workspace's quota holds against a burst of them."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from cluster.entities import Artifact, CustomizationJob, Dataset, ModelDeployment, ModelEntity, Workspace
from cluster.services.base import Context
from cluster.services.datasets import DatasetService
from cluster.services.deployments import DeploymentService
from cluster.services.jobs import JobService
from cluster.services.models import ModelService
from cluster.services.verification import VerificationService
from cluster.services.workspaces import WorkspaceService
from cluster.store import SQLiteStore
from rayembed.artifact import REQUIRED_FILES
from rayembed.errors import Conflict, QuotaExceeded
from tests.conftest import SAMPLE


class FakeRayJobs:
    """cluster.ray_jobs.RayJobs without Ray: what was submitted, and each job's status as the test sets it."""

    def __init__(self):
        self.submitted, self.status, self.stopped = [], {}, []

    def submit(self, entrypoint, submission_id, metadata, progress_uri=None):
        self.submitted.append(submission_id)
        self.status[submission_id] = "PENDING"

    def stop(self, job_id):
        self.stopped.append(job_id)

    def info(self, job_id):
        status = self.status.get(job_id)
        return None if status is None else SimpleNamespace(status=status, message="")

    def logs(self, job_id):
        return "Traceback: boom"

    def has_gpu(self):
        return False


class FakeServe:
    """cluster.serve_apps without Serve: applications start RUNNING and answer the probe."""

    def __init__(self):
        from cluster import serve_apps

        self.apps, self.provider_settings = {}, serve_apps.provider_settings

    def start(self, settings):
        self.apps[settings.name] = ("RUNNING", "")
        self.started = getattr(self, "started", []) + [settings]

    def statuses(self):
        return dict(self.apps)

    def probe(self, app, dim):
        return None

    def delete(self, app):
        self.apps.pop(app, None)


class SlowStore(SQLiteStore):
    """An in-memory store whose reads take a while, as PostgreSQL's round trips do: races get a window to happen."""

    def list(self, kind, workspace=None):
        time.sleep(0.01)
        return super().list(kind, workspace)


def at_once(n: int, request) -> list[str]:
    """`request(i)` for i in range(n) on n threads released together: "done" or the exception's name, each."""
    outcomes: list[str] = []
    start = threading.Barrier(n)

    def one(i: int) -> None:
        start.wait()
        try:
            request(i)
            outcomes.append("done")
        except Exception as exc:  # noqa: BLE001 - what each request got
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def context(tmp_path: Path, store=None) -> Context:
    store = store or SQLiteStore(":memory:")
    store.put("workspace", "", "default", Workspace(name="default", uid="0" * 12).model_dump(mode="json"))
    return Context(store=store, storage=str(tmp_path / "storage"), home=tmp_path / "home", ray_jobs=FakeRayJobs(),
                   serve=FakeServe(), base_url="http://gw", base_models=["all-MiniLM-L6-v2"])


def artifact(tmp_path: Path) -> Path:
    """A folder with the artifact's required files (empty JSON): enough to be deployed by a fake Serve."""
    onnx = tmp_path / "art" / "onnx"
    onnx.mkdir(parents=True)
    for name in REQUIRED_FILES:
        (onnx / name).write_text("{}")
    return onnx


def test_workspaces_alone_keys_close_the_api_and_grants_change_by_compare_and_set(tmp_path):
    ctx = context(tmp_path)
    ws = WorkspaceService(ctx)
    ws.set_open_mode(True)
    assert ws.open_mode() and ws.routes()["open"]
    ws.create_workspace({"name": "team-a"})
    with pytest.raises(Conflict, match="workspace 'team-a' already exists"):
        ws.create_workspace({"name": "team-a"})
    key = ws.create_key(["team-a"])
    ws.revoke_key(key["id"])  # revoking the last key keeps the API closed
    assert not ws.open_mode() and ws.routes()["open"] is False
    grants = [tmp_path / f"g{i}" for i in range(6)]
    threads = [threading.Thread(target=ws.grant_data, args=("team-a", str(g))) for g in grants]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(ws.get_workspace("team-a")["data_grants"]) == sorted(str(g) for g in grants)  # none lost


def test_datasets_alone_an_upload_and_a_job_reading_the_dataset_exclude_each_other(tmp_path):
    ctx = context(tmp_path)
    datasets = DatasetService(ctx)
    datasets.create_dataset("default", {"name": "docs"})
    datasets.begin_upload("default", "docs", "training.jsonl", 10)
    with pytest.raises(Conflict, match="being uploaded right now"):
        datasets.begin_upload("default", "docs", "training.jsonl", 10)
    with pytest.raises(Conflict, match="has an upload running"):
        datasets.delete_dataset("default", "docs")
    datasets.end_upload("default", "docs", "training.jsonl")
    stored = {"uri": str(tmp_path / "t.jsonl"), "bytes": 10, "sha256": "0" * 64, "records": 1}
    ds = datasets.add_dataset_file("default", "docs", "training.jsonl", stored)
    assert ds["files"]["training.jsonl"]["bytes"] == 10 and ds["uploading"] == {}
    ctx.save(CustomizationJob(name="cust-1", spec={"dataset": {"training": ds["uri"] + "/training.jsonl"}},
                              output_model="m", output_dir="/o", status="running"))
    with pytest.raises(Conflict, match="is read by job cust-1"):
        datasets.begin_upload("default", "docs", "training.jsonl", 10)
    with pytest.raises(QuotaExceeded, match="max_storage_gib"):
        datasets.create_dataset("default", {"name": "big"}) and datasets.begin_upload("default", "big", "training.jsonl", 30 * 2**30)


def test_uploads_running_at_once_count_against_the_storage_quota(tmp_path):
    """A quota of 32 KiB; four uploads of 12 KiB each begin at once into four datasets: two fit. An upload that ends
    (stored or failed) no longer counts as running; a stored one counts as its file. Before, each upload saw only
    the files already stored, and all four began."""
    ctx = context(tmp_path, SlowStore(":memory:"))
    ctx.modify(lambda: Workspace.model_validate(ctx.store.get("workspace", "", "default")),
               lambda ws: ws.model_copy(update={"quota": ws.quota.model_copy(update={"max_storage_gib": 32 / 2**20})}))
    datasets = DatasetService(ctx)
    for i in range(4):
        datasets.create_dataset("default", {"name": f"ds{i}"})
    outcomes = at_once(4, lambda i: datasets.begin_upload("default", f"ds{i}", "training.jsonl", 12 * 2**10))
    assert outcomes.count("done") == 2 and set(outcomes) - {"done"} <= {"QuotaExceeded", "Unavailable"}, outcomes
    running = [d.name for d in ctx.all("dataset", Dataset) if d.uploading]
    assert len(running) == 2 and all(d.uploading_bytes == {"training.jsonl": 12 * 2**10}
                                     for d in ctx.all("dataset", Dataset) if d.uploading)
    with pytest.raises(QuotaExceeded, match=r"holds 24\.0 KiB \(uploading 24\.0 KiB\); 8\.8 KiB more would pass"):
        datasets.begin_upload("default", next(f"ds{i}" for i in range(4) if f"ds{i}" not in running), "training.jsonl", 9000)
    datasets.end_upload("default", running[0], "training.jsonl")  # failed: its bytes are free again
    stored = {"uri": str(tmp_path / "t.jsonl"), "bytes": 12 * 2**10, "sha256": "0" * 64, "records": 1}
    assert datasets.add_dataset_file("default", running[1], "training.jsonl", stored)["uploading_bytes"] == {}
    datasets.begin_upload("default", running[0], "training.jsonl", 12 * 2**10)  # 12 stored + 12 running + 0 <= 32
    with pytest.raises(QuotaExceeded):
        datasets.begin_upload("default", running[1], "validation.jsonl", 9 * 2**10)  # 12 + 12 + 9 > 32


def test_models_alone_an_export_is_a_ray_job_and_its_reconcile_makes_it_ready_or_failed(tmp_path):
    ctx = context(tmp_path)
    models = ModelService(ctx)
    made = models.create_model("default", {"name": "base", "base_model": "all-MiniLM-L6-v2"})
    assert made["status"] == "exporting" and ctx.ray_jobs.submitted == [made["source_job"]]
    ctx.ray_jobs.status[made["source_job"]] = "FAILED"
    models.reconcile(ModelEntity.model_validate(made))
    failed = models.get_model("default", "base")
    assert failed["status"] == "failed" and "Traceback: boom" in failed["error"]
    stale = ModelEntity.model_validate(made)  # a second pass with what it read before: loses the compare-and-set
    models.reconcile(stale)
    assert models.get_model("default", "base") == failed


def test_jobs_alone_submit_follow_and_cancel_through_the_ray_adapter(tmp_path):
    ctx = context(tmp_path)
    datasets, models = DatasetService(ctx), ModelService(ctx)
    jobs = JobService(ctx, datasets=datasets, models=models)
    config = {"model": "all-MiniLM-L6-v2", "schedule": {"max_steps": 2},
              "dataset": {"training": str(SAMPLE / "train.jsonl"), "evaluation": str(SAMPLE / "eval")}}
    job = jobs.create_job("default", {"output_model": "tuned", "config": config}, operator=True)
    assert job["status"] == "pending" and ctx.ray_jobs.submitted == [job["name"]]
    with pytest.raises(Conflict, match="already creates model 'tuned'"):
        jobs.create_job("default", {"output_model": "tuned", "config": config}, operator=True)
    ctx.ray_jobs.status[job["name"]] = "RUNNING"
    jobs.reconcile(CustomizationJob.model_validate(job))
    assert jobs.get_job("default", job["name"])["status"] == "running"
    jobs.reconcile(CustomizationJob.model_validate(job))  # stale: changes nothing
    assert [h["status"] for h in jobs.get_job("default", job["name"])["status_history"]] == ["created", "pending", "running"]
    cancelled = jobs.cancel_job("default", job["name"])
    assert cancelled["status"] == "cancelled" and ctx.ray_jobs.stopped == [job["name"]]


def test_what_jobs_and_models_hold_counts_against_the_storage_quota_and_a_finished_job_can_be_deleted(tmp_path):
    """max_storage_gib 64 KiB. A finished job's folder of 80 KiB (its checkpoints) stops a new job, a resume, an export
    and an upload (429 naming what is held); the job cannot be deleted while its model exists, and once deleted its
    folder is gone and new work starts again."""
    ctx = context(tmp_path)
    ctx.modify(lambda: Workspace.model_validate(ctx.store.get("workspace", "", "default")),
               lambda ws: ws.model_copy(update={"quota": ws.quota.model_copy(update={"max_storage_gib": 64 / 2**20})}))
    datasets, models = DatasetService(ctx), ModelService(ctx)
    jobs = JobService(ctx, datasets=datasets, models=models)
    folder = Path(ctx.workspace_root("default")) / "jobs" / "cust-old"
    (folder / "output" / "checkpoints").mkdir(parents=True)
    (folder / "output" / "checkpoints" / "state.bin").write_bytes(b"\0" * 80 * 2**10)
    ctx.save(CustomizationJob(name="cust-old", spec={}, output_model="old", output_dir=str(folder / "output"),
                              status="failed"))
    ctx.save(ModelEntity(name="old", base_model="b", source_job="cust-old", embedding_dim=8,
                         artifact=Artifact(uri=str(folder / "output" / "onnx"))))
    config = {"model": "all-MiniLM-L6-v2", "schedule": {"max_steps": 2},
              "dataset": {"training": str(SAMPLE / "train.jsonl"), "evaluation": str(SAMPLE / "eval")}}
    with pytest.raises(QuotaExceeded, match=r"holds 80\.0 KiB \(jobs 80\.0 KiB\)"):
        jobs.create_job("default", {"output_model": "new", "config": config}, operator=True)
    with pytest.raises(QuotaExceeded, match="max_storage_gib"):
        jobs.resume_job("default", "cust-old")
    with pytest.raises(QuotaExceeded, match="max_storage_gib"):
        models.create_model("default", {"name": "minilm", "base_model": "all-MiniLM-L6-v2"})
    datasets.create_dataset("default", {"name": "docs"})
    with pytest.raises(QuotaExceeded, match=r"holds 80\.0 KiB \(jobs 80\.0 KiB\); 10 bytes more would pass"):
        datasets.begin_upload("default", "docs", "training.jsonl", 10)
    with pytest.raises(Conflict, match="made model 'old'"):
        jobs.delete_job("default", "cust-old")
    ctx.remove(ModelEntity.model_validate(ctx.store.get("model", "default", "old")))
    assert jobs.delete_job("default", "cust-old") == {"name": "cust-old", "deleted": True}
    assert not folder.exists() and ctx.store.get("job", "default", "cust-old") is None
    assert jobs.create_job("default", {"output_model": "new", "config": config}, operator=True)["status"] == "pending"
    running = ctx.all("job", CustomizationJob)[0].name
    with pytest.raises(Conflict, match="cancel it first"):
        jobs.delete_job("default", running)
    jobs.cancel_job("default", running)  # cancelled, but Ray has not stopped it yet: it could still write
    with pytest.raises(Conflict, match="still stopping"):
        jobs.delete_job("default", running)
    ctx.ray_jobs.status[running] = "STOPPED"
    assert jobs.delete_job("default", running)["deleted"] is True


def test_a_burst_of_jobs_stays_within_the_workspace_quota(tmp_path):
    """Twelve requests at once against max_active_jobs 2 (the store slowed to PostgreSQL's pace): exactly two jobs
    start. Without the admission's compare-and-set on the workspace, every request passed the count."""
    ctx = context(tmp_path, SlowStore(":memory:"))
    jobs = JobService(ctx, datasets=DatasetService(ctx), models=ModelService(ctx))
    config = {"model": "all-MiniLM-L6-v2", "schedule": {"max_steps": 2},
              "dataset": {"training": str(SAMPLE / "train.jsonl"), "evaluation": str(SAMPLE / "eval")}}
    outcomes = at_once(12, lambda i: jobs.create_job("default", {"output_model": f"m{i}", "config": config}, operator=True))
    stored = [j for j in ctx.all("job", CustomizationJob) if j.status != "failed"]
    assert outcomes.count("done") == 2 and len(stored) == 2, outcomes
    assert set(outcomes) - {"done"} <= {"QuotaExceeded", "Unavailable"}


def test_concurrent_changes_to_a_workspaces_deployments_stay_within_its_replica_quota(tmp_path):
    """Four deployments of one replica each (max_replicas 8); four requests at once each take theirs to 3 replicas.
    Only two fit: each request alone saw the others at 1 (3 + 3 <= 8), so without the admission all four passed."""
    ctx = context(tmp_path, SlowStore(":memory:"))
    deployments = DeploymentService(ctx, verification=VerificationService(ctx))
    ctx.save(ModelEntity(name="mini", base_model="b", artifact=Artifact(uri=str(artifact(tmp_path))), embedding_dim=8))
    for i in range(4):
        deployments.create_deployment("default", {"name": f"web{i}", "model": "mini"})
    outcomes = at_once(4, lambda i: deployments.update_deployment("default", f"web{i}", {"num_replicas": 3}))
    replicas = [ctx.store.get("deployment_config", "default", f"web{i}")["num_replicas"] for i in range(4)]
    assert outcomes.count("done") == 2 and sorted(replicas) == [1, 1, 3, 3], (outcomes, replicas)
    assert set(outcomes) - {"done"} <= {"QuotaExceeded", "Unavailable"}
    # a refused change left its config as it was: version 1, and no version 2 recorded
    for i, n in enumerate(replicas):
        versions = ctx.store.versions("deployment_config", "default", f"web{i}")
        assert len(versions) == (2 if n == 3 else 1), (i, versions)


def test_a_config_edited_past_the_quota_is_not_run_until_a_change_that_checks_it(tmp_path):
    """max_replicas 2. A deployment's config edited to 3 replicas (PATCH .../deployment-configs/NAME) changes nothing
    that runs: the deployment keeps its version, a restarted generation starts from it, the quota counts it, and
    moving the deployment to the edited version (PATCH .../deployments/NAME with no body) is refused (429)."""
    ctx = context(tmp_path)
    ctx.modify(lambda: Workspace.model_validate(ctx.store.get("workspace", "", "default")),
               lambda ws: ws.model_copy(update={"quota": ws.quota.model_copy(update={"max_replicas": 2})}))
    deployments = DeploymentService(ctx, verification=VerificationService(ctx))
    ctx.save(ModelEntity(name="mini", base_model="b", artifact=Artifact(uri=str(artifact(tmp_path))), embedding_dim=8))
    deployments.create_deployment("default", {"name": "d1", "model": "mini", "num_cpus": 0.25})
    assert deployments.update_deployment_config("default", "d1", {"num_replicas": 3})["version"] == 2
    with pytest.raises(QuotaExceeded, match=r"max_replicas 2"):
        deployments.update_deployment("default", "d1", {})
    with pytest.raises(QuotaExceeded, match=r"max_replicas 2"):
        deployments.update_deployment("default", "d1", {"config": "d1"})
    load = lambda: ModelDeployment.model_validate(ctx.store.get("deployment", "default", "d1"))  # noqa: E731
    assert load().config_version == 1
    deployments.reconcile(load(), ctx.serve.statuses())  # its first generation: from version 1, one replica
    assert [s.num_replicas for s in ctx.serve.started] == [1]
    deployments.create_deployment("default", {"name": "d2", "model": "mini", "num_cpus": 0.25})  # 1 + 1 <= 2
    with pytest.raises(QuotaExceeded):
        deployments.create_deployment("default", {"name": "d3", "model": "mini", "num_cpus": 0.25})


def test_a_swap_pending_or_failed_counts_what_still_serves(tmp_path):
    """max_replicas 8. Deployment a serves 8 replicas; it is swapped to 1 replica that never starts. While the swap is
    pending and after it fails, a's old generation still runs 8: a deployment of 7 more is refused throughout, and the
    failed swap's record goes back to the version that serves."""
    ctx = context(tmp_path)
    deployments = DeploymentService(ctx, verification=VerificationService(ctx))
    ctx.save(ModelEntity(name="mini", base_model="b", artifact=Artifact(uri=str(artifact(tmp_path))), embedding_dim=8))
    deployments.create_deployment("default", {"name": "aa", "model": "mini", "num_cpus": 0.25, "num_replicas": 8})
    load = lambda: ModelDeployment.model_validate(ctx.store.get("deployment", "default", "aa"))  # noqa: E731
    deployments.reconcile(load(), ctx.serve.statuses())
    deployments.reconcile(load(), ctx.serve.statuses())
    assert (load().status, load().serving_config_version) == ("READY", 1)
    deployments.update_deployment("default", "aa", {"num_replicas": 1})
    deployments.reconcile(load(), ctx.serve.statuses())  # the new generation starts ...
    ctx.serve.apps[load().pending_app] = ("DEPLOY_FAILED", "no node fits")  # ... and never runs
    with pytest.raises(QuotaExceeded, match="runs up to 8 replicas"):
        deployments.create_deployment("default", {"name": "bb", "model": "mini", "num_cpus": 0.25, "num_replicas": 7})
    deployments.reconcile(load(), ctx.serve.statuses())
    failed = load()
    assert failed.status == "READY" and failed.pending_app is None and failed.config_version == 1, failed
    with pytest.raises(QuotaExceeded, match="runs up to 8 replicas"):
        deployments.create_deployment("default", {"name": "bb", "model": "mini", "num_cpus": 0.25, "num_replicas": 7})


def test_a_config_made_again_under_an_old_name_never_reads_the_old_ones_versions(tmp_path):
    """A config edited to v3 and deleted; one made again under its name lists only its own versions, and a
    deployment of it at v1 runs its settings, not the old config's (the history keeps both, told apart)."""
    ctx = context(tmp_path)
    deployments = DeploymentService(ctx, verification=VerificationService(ctx))
    ctx.save(ModelEntity(name="mini", base_model="b", artifact=Artifact(uri=str(artifact(tmp_path))), embedding_dim=8))
    deployments.create_deployment_config("default", {"name": "shared", "model": "mini", "num_cpus": 0.25})
    for n in (2, 3):
        deployments.update_deployment_config("default", "shared", {"num_replicas": n})
    deployments.delete_deployment_config("default", "shared")
    time.sleep(0.01)  # another creation time
    deployments.create_deployment_config("default", {"name": "shared", "model": "mini", "num_cpus": 0.5})
    listed = deployments.get_deployment_config("default", "shared")["versions"]
    assert [(v["version"], v["num_cpus"]) for v in listed] == [(1, 0.5)], listed
    deployments.create_deployment("default", {"name": "web", "config": "shared"})
    dep = ModelDeployment.model_validate(ctx.store.get("deployment", "default", "web"))
    assert ctx.config_of(dep).num_cpus == 0.5 and ctx.config_of(dep).num_replicas == 1


def test_deployments_alone_ready_after_probe_and_verification_then_deleted(tmp_path):
    ctx = context(tmp_path)
    deployments = DeploymentService(ctx, verification=VerificationService(ctx))
    ctx.save(ModelEntity(name="mini", base_model="b", artifact=Artifact(uri=str(artifact(tmp_path))), embedding_dim=8))
    dep = deployments.create_deployment("default", {"name": "web", "model": "mini"})
    with pytest.raises(Conflict, match="deployment 'web' already exists"):
        deployments.create_deployment("default", {"name": "web", "model": "mini"})
    load = lambda: ModelDeployment.model_validate(ctx.store.get("deployment", "default", "web"))  # noqa: E731
    deployments.reconcile(load(), ctx.serve.statuses())  # starts generation 1
    assert load().pending_app == "rayembed.default.web.g1" and "rayembed.default.web.g1" in ctx.serve.apps
    deployments.reconcile(load(), ctx.serve.statuses())  # running, probed, no evaluation to verify: READY
    ready = load()
    assert ready.status == "READY" and ready.app == "rayembed.default.web.g1"
    assert ctx.store.get("provider", "default", "web")["app"] == "rayembed.default.web.g1"
    deployments.delete_deployment("default", "web")
    deployments.reconcile(load(), ctx.serve.statuses())  # deletes the app
    deployments.reconcile(load(), ctx.serve.statuses())  # then the entity, its own config and its provider
    assert ctx.store.get("deployment", "default", "web") is None and ctx.store.get("provider", "default", "web") is None
    assert ctx.store.get("deployment_config", "default", "web") is None and dep["owns_config"]


def test_a_reconcile_and_a_request_on_one_entity_never_overwrite_each_other(tmp_path):
    """The reconciler read the dataset, a request changed it meanwhile: the reconciler's write loses, the request's
    change stays (before, the one lock ordered them; now the store's compare-and-set does)."""
    ctx = context(tmp_path)
    DatasetService(ctx).create_dataset("default", {"name": "docs"})
    read = Dataset.model_validate(ctx.store.get("dataset", "default", "docs"))
    DatasetService(ctx).begin_upload("default", "docs", "training.jsonl", 5)
    assert ctx.replace(read, read.model_copy(update={"description": "stale"})) is None
    assert "training.jsonl" in ctx.store.get("dataset", "default", "docs")["uploading"]
