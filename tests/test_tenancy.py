"""Tenant isolation, tried the way a tenant with a key for workspace team-a would: real HTTP through the API
ingress's app to a real ControlPlane over a real SQLite file, the platform started the careless way (its home
inside the folder it runs in, no data root given). Each case asserts the 4xx and that nothing was created,
written or read: no job or model row, no file outside team-a's folder, team-b's files unchanged."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from serve.auth import ALL
from tests.api_server import ApiServer, plane  # noqa: F401 - plane: a fixture
from tests.conftest import SAMPLE

WS = "/v2/workspaces"


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


class FakeJobs:
    """Ray's job client, recording what the control plane submits (no Ray here)."""

    def __init__(self):
        self.submitted = []

    def submit_job(self, **kw):
        self.submitted.append(kw)
        return kw["submission_id"]


@pytest.fixture()
def tenants(plane, monkeypatch, tmp_path):
    """The API with two workspaces, a key for each and b holding a dataset and a model with weights on disk."""
    from cluster.entities import Artifact, ModelEntity

    monkeypatch.chdir(tmp_path)  # `up` ran in the folder that holds its home: that is no data root any more
    fake = FakeJobs()
    plane.ctx.ray_jobs._client = fake  # Ray's job client inside the real adapter (cluster.ray_jobs.RayJobs)
    plane.ctx.ray_jobs.has_gpu = lambda: False
    srv = ApiServer(plane, monkeypatch)
    for ws in ("team-a", "team-b"):
        plane.create_workspace({"name": ws})
    keys = {ws: plane.create_key([ws], ws)["key"] for ws in ("team-a", "team-b")}
    srv.sync()
    b_root = Path(plane.ctx.workspace_root("team-b"))
    plane.create_dataset("team-b", {"name": "secret"})
    ds = plane.get_dataset("team-b", "secret")
    train = Path(ds["uri"]) / "training.jsonl"
    train.parent.mkdir(parents=True)
    train.write_text((SAMPLE / "train.jsonl").read_text())
    weights = b_root / "models" / "b-model-x" / "model"
    weights.mkdir(parents=True)
    (weights / "config.json").write_text("{}")
    plane.ctx.save(ModelEntity(workspace="team-b", name="b-model", base_model="all-MiniLM-L6-v2",
                            artifact=Artifact(uri=str(b_root / "models" / "b-model-x" / "onnx"), hf_uri=str(weights))))
    try:
        yield srv, keys, b_root, train, fake
    finally:
        srv.stop()


def _nothing_happened(plane, srv_b_before: dict, b_root: Path, fake: FakeJobs) -> None:
    assert plane.store.list("job") == [] and fake.submitted == []
    assert [m["name"] for m in plane.store.list("model")] == ["b-model"]
    assert snapshot(b_root) == srv_b_before
    assert not (Path(plane.ctx.workspace_root("team-a")) / "jobs").exists()


def job(**over) -> dict:
    cfg = {"model": "all-MiniLM-L6-v2", "dataset": {"name": "mine"}, "schedule": {"max_steps": 2}}
    cfg.update(over)
    return cfg


def test_a_tenant_names_entities_never_places(plane, tenants):
    srv, keys, b_root, train, fake = tenants
    a = keys["team-a"]
    before = snapshot(b_root)
    url = f"{WS}/team-a/customization/jobs"
    attacks = [  # (body, the field the 400 names)
        ({"config": job(dataset={"training": str(train)})}, "config.dataset.training"),  # b's file by path
        ({"config": job(dataset={"training": f"file://{b_root}/../{b_root.name}/x"})}, "config.dataset.training"),
        ({"config": job(dataset={"training": "s3://bucket/ws/%2e%2e/team-b/training.jsonl"})}, "config.dataset.training"),
        ({"config": job(dataset={"training": "s3://bucket/t.jsonl?endpoint_override=evil:9000&scheme=http"})},
         "config.dataset.training"),
        ({"config": job(dataset={"name": "mine", "mining": {"negatives": 1, "corpus": str(train)}})},
         "config.dataset.mining.corpus"),
        ({"config": job(dataset={"name": "mine", "mining": {"negatives": 1, "cache_dir": str(b_root)}})},
         "config.dataset.mining.cache_dir"),
        ({"config": job(output={"dir": str(b_root / "jobs")})}, "config.output.dir"),
        ({"config": job(output={"storage_path": "s3://other-bucket/ckpt"})}, "config.output.storage_path"),
        ({"sweep": {"job": job(output={"storage_path": str(b_root / "ckpt")})}}, "sweep.job.output.storage_path"),
        ({"sweep": {"job": job(), "output": {"dir": "/anywhere"}}}, "sweep.output.dir"),
        ({"config": job(model=str(b_root / "models" / "b-model-x" / "model"))}, "config.model"),  # b's weights
        ({"config": job(model="b-model")}, "config.model"),  # b's model by name: not a model of team-a
        ({"config": job(model="some-org/any-hub-model")}, "config.model"),  # would be downloaded on the cluster
        ({"sweep": {"job": job(model="/etc")}}, "sweep.job.model"),
        ({"config": job(dataset={"name": "mine", "regression": str(train.parent)})}, "config.dataset.regression"),
    ]
    for body, field in attacks:
        status, answer, _ = srv.request("POST", url, key=a, body={"output_model": "stolen", **body})
        assert status == 400, (body, answer)
        assert answer["error"]["param"] == field, (body, answer)
        assert "b-model" not in answer["error"]["message"].replace(str(body), "") or field == "config.model"
    for body in ({"name": "stolen", "artifact": str(b_root / "models" / "b-model-x" / "onnx")},  # b's graph, resealed
                 {"name": "stolen", "base_model": str(b_root / "models" / "b-model-x" / "model")},
                 {"name": "stolen", "base_model": "some-org/any-hub-model"}):
        status, answer, _ = srv.request("POST", f"{WS}/team-a/models", key=a, body=body)
        assert status == 400 and answer["error"]["param"] in ("artifact", "base_model"), answer
    for method, path, body in [("POST", f"{WS}/team-b/customization/jobs", {"output_model": "x", "config": job()}),
                               ("POST", f"{WS}/team-b/models", {"name": "x", "base_model": "all-MiniLM-L6-v2"}),
                               ("GET", f"{WS}/team-b/datasets/secret", None),
                               ("DELETE", f"{WS}/team-b/models/b-model", None)]:
        assert srv.request(method, path, key=a, body=body)[0] == 404
    _nothing_happened(plane, before, b_root, fake)
    for url in (f"{WS}/team-b/datasets/secret/files/training.jsonl",  # the old route (308 to the upload ingress)
                "/v2/uploads/workspaces/team-b/datasets/secret/files/training.jsonl"):
        status, answer, _ = srv.request("PUT", url, key=a, raw=b"{}\n")
        assert status == 404, (url, answer)
    assert snapshot(b_root) == before


def test_what_a_tenant_may_name_still_runs(plane, tenants, tmp_path):
    """The same routes accept the entity names, and a read under the workspace's grant (the operator's)."""
    from cluster.entities import DatasetFile

    srv, keys, b_root, train, fake = tenants
    a = keys["team-a"]
    plane.set_quota("team-a", {"max_active_jobs": 10})  # the fake Ray never finishes a job
    plane.create_dataset("team-a", {"name": "mine"})
    ds = plane.get_dataset("team-a", "mine")
    own = Path(ds["uri"]) / "training.jsonl"
    own.parent.mkdir(parents=True)
    own.write_text((SAMPLE / "train.jsonl").read_text())
    plane.add_dataset_file("team-a", "mine", "training.jsonl",
                           DatasetFile(uri=str(own), bytes=own.stat().st_size, sha256="0" * 64, records=600).model_dump())
    status, answer, _ = srv.request("POST", f"{WS}/team-a/customization/jobs", key=a,
                                    body={"output_model": "tuned", "config": job(dataset={
                                        "name": "mine", "mining": {"negatives": 1}})})
    assert status == 201, answer
    spec = answer["spec"]
    assert spec["dataset"]["training"] == str(own) and spec["model"] == "all-MiniLM-L6-v2"
    a_root = plane.ctx.workspace_root("team-a")
    assert spec["output"]["dir"].startswith(a_root) and spec["dataset"]["mining"]["cache_dir"].startswith(a_root)
    assert len(fake.submitted) == 1
    status, answer, _ = srv.request("POST", f"{WS}/team-a/customization/jobs", key=a, body={  # the shipped set by name
        "output_model": "tuned-general", "config": job(dataset={"name": "mine", "regression": "general"})})
    assert status == 201 and answer["spec"]["dataset"]["regression"] == "general", answer
    status, answer, _ = srv.request("POST", f"{WS}/team-a/customization/jobs", key=a, body={  # b's dataset: unknown
        "output_model": "tuned-stolen", "config": job(dataset={"name": "mine", "regression_dataset": "secret"})})
    assert status == 404 and "secret" in answer["error"]["message"], answer
    shared = tmp_path / "team-a-data"
    shared.mkdir()
    (shared / "t.jsonl").write_text((SAMPLE / "train.jsonl").read_text())
    body = {"output_model": "tuned-2", "config": job(dataset={"training": str(shared / "t.jsonl")})}
    assert srv.request("POST", f"{WS}/team-a/customization/jobs", key=a, body=body)[0] == 400  # no grant yet
    plane.grant_data("team-a", str(shared))
    status, answer, _ = srv.request("POST", f"{WS}/team-a/customization/jobs", key=a, body=body)
    assert status == 201 and answer["spec"]["dataset"]["training"] == str(shared / "t.jsonl"), answer
    granted = answer["name"]
    status, answer, _ = srv.request("POST", f"{WS}/team-b/customization/jobs", key=keys["team-b"], body={
        "output_model": "stolen", "config": job(dataset={"training": str(shared / "t.jsonl")})})
    assert status == 400  # team-a's grant is team-a's
    with pytest.raises(Exception, match="overlaps the storage root"):
        plane.grant_data("team-a", str(Path(plane.ctx.storage)))
    # a job that read under a grant is resumed while the grant stands, and not once it is revoked
    resume = lambda: srv.request("POST", f"{WS}/team-a/customization/jobs/{granted}/resume", key=a)  # noqa: E731
    cancel = lambda: srv.request("POST", f"{WS}/team-a/customization/jobs/{granted}/cancel", key=a)  # noqa: E731
    assert cancel()[0] == 200 and resume()[0] == 200 and cancel()[0] == 200
    plane.revoke_grant("team-a", str(shared))
    status, answer, _ = resume()
    assert status == 400 and answer["error"]["param"] == "config.dataset.training", answer
    assert "outside the locations this workspace may read" in answer["error"]["message"]
    # what a job may not be named or reserve, and a sweep whose job is no config: 400s naming the key
    for body, field in [({"config": job(name="..")}, "config.name"),
                        ({"config": job(resources={"worker_resources": {"node:__internal_head__": 0.001}})},
                         "config.resources.worker_resources"),
                        ({"config": job(resources={"worker_resources": {"CPU": 64}})}, "config.resources.worker_resources"),
                        ({"sweep": {"job": "/tmp/evil.yaml"}}, "sweep.job")]:
        status, answer, _ = srv.request("POST", f"{WS}/team-a/customization/jobs", key=a,
                                        body={"output_model": "refused", **body})
        assert status == 400 and answer["error"]["param"] == field, (body, answer)


def test_quotas_refuse_with_429_naming_the_limit(plane, tenants):
    srv, keys, b_root, train, fake = tenants
    a = keys["team-a"]
    plane.create_dataset("team-a", {"name": "mine"})
    plane.set_quota("team-a", {"max_active_jobs": 0, "max_storage_gib": 0})
    status, answer, _ = srv.request("POST", f"{WS}/team-a/models", key=a,
                                    body={"name": "mm", "base_model": "all-MiniLM-L6-v2"})
    assert status == 429 and answer["error"]["code"] == "quota_exceeded" and "max_active_jobs 0" in answer["error"]["message"]
    status, answer, headers = srv.request("PUT", f"{WS}/team-a/datasets/mine/files/training.jsonl", key=a, raw=b"x" * 100)
    assert status == 308 and headers["Location"] == "/v2/uploads/workspaces/team-a/datasets/mine/files/training.jsonl"
    status, answer, _ = srv.request("PUT", headers["Location"], key=a, raw=b"x" * 100)
    assert status == 429 and "max_storage_gib 0" in answer["error"]["message"]
    assert plane.get_dataset("team-a", "mine")["files"] == {} and plane.store.list("model", "team-a") == []
    from rayembed.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="max_replicas"):
        plane.set_quota("team-a", {"max_replicas": -1})


def test_delete_then_create_again_never_reaches_the_old_files(plane, tenants, tmp_path):
    """A workspace and a model made again under an old name get folders of their own, and the delete removed the
    old files."""
    srv, keys, b_root, train, fake = tenants
    admin = plane.create_key([ALL], "admin")["key"]
    srv.sync()
    old_root = Path(plane.ctx.workspace_root("team-a"))
    old_root.mkdir(parents=True, exist_ok=True)
    (old_root / "left-behind").write_text("the previous tenant's")
    for k in plane.list_keys():
        if k["workspaces"] == ["team-a"]:
            plane.revoke_key(k["id"])
    assert srv.request("DELETE", f"{WS}/team-a", key=admin)[0] == 200
    assert not old_root.exists()
    assert srv.request("POST", WS, key=admin, body={"name": "team-a"})[0] == 201
    new_root = Path(plane.ctx.workspace_root("team-a"))
    assert new_root != old_root and not new_root.exists()
    onnx = Path(plane.get_model("team-b", "b-model")["artifact"]["uri"])
    assert srv.request("DELETE", f"{WS}/team-b/models/b-model", key=admin)[0] == 200
    assert not onnx.parent.exists()  # its own folder went with it


def test_each_deployment_quota_refuses_with_429(plane, tenants, tmp_path):
    """Replicas over the workspace (autoscaling counts its maximum), CPUs and GPUs of one deployment; a replica
    always reserves some CPU."""
    from cluster.entities import Artifact, ModelEntity

    srv, keys, b_root, train, fake = tenants
    a = keys["team-a"]
    plane.ctx.save(ModelEntity(workspace="team-a", name="tiny", base_model="all-MiniLM-L6-v2", status="ready",
                            artifact=Artifact(uri=str(tmp_path / "onnx")), embedding_dim=8))
    plane.set_quota("team-a", {"max_replicas": 3, "max_cpus_per_deployment": 2, "max_gpus_per_deployment": 0})
    url = f"{WS}/team-a/deployments"
    assert srv.request("POST", url, key=a, body={"name": "one", "model": "tiny", "num_replicas": 2, "num_cpus": 1})[0] == 201
    for body, limit in [({"name": "two", "model": "tiny", "num_replicas": 2, "num_cpus": 0.5}, "max_replicas 3"),
                        ({"name": "two", "model": "tiny", "autoscaling": {"min_replicas": 1, "max_replicas": 2},
                          "num_cpus": 0.5}, "max_replicas 3"),
                        ({"name": "two", "model": "tiny", "num_replicas": 1, "num_cpus": 3}, "max_cpus_per_deployment"),
                        ({"name": "two", "model": "tiny", "num_replicas": 1, "num_cpus": 1, "num_gpus": 1},
                         "max_gpus_per_deployment")]:
        status, answer, _ = srv.request("POST", url, key=a, body=body)
        assert status == 429 and limit in answer["error"]["message"], (body, answer)
    status, answer, _ = srv.request("PATCH", f"{url}/one", key=a, body={"num_replicas": 4, "num_cpus": 0.5})
    assert status == 429 and "max_replicas 3" in answer["error"]["message"]
    status, answer, _ = srv.request("POST", url, key=a, body={"name": "zero", "model": "tiny", "num_cpus": 0})
    assert status == 400 and "num_cpus" in answer["error"]["message"]
    assert [d["name"] for d in plane.store.list("deployment", "team-a")] == ["one"]
    assert plane.get_deployment_config("team-a", "one")["num_replicas"] == 2  # the refused change changed nothing
