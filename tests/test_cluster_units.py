"""Control-plane parts without a cluster: the SQLite store and its migrations, names, progress lines,
the GPU memory estimate and its warning."""

from __future__ import annotations

import json
import sqlite3

import pytest

from cluster.services.base import check_name
from cluster.job_files import check_gpu_memory
from cluster.store import SCHEMA_VERSION, SQLiteStore, StoreError, open_store
from rayembed.progress import progress_line
from rayembed.errors import InvalidName, InvalidRequest
from train.config import validate_config


def test_store_roundtrip_survives_reopen_and_migrates_an_old_schema(tmp_path):
    path = tmp_path / "state.db"
    store = SQLiteStore(path)
    assert store.schema_version() == SCHEMA_VERSION
    store.put("model", "default", "a", {"name": "a", "n": 1})
    store.put("model", "other", "b", {"name": "b"})
    store.add_version("deployment_config", "default", "c", 1, {"v": 1})
    store.add_version("deployment_config", "default", "c", 2, {"v": 2})
    store.close()
    store = open_store(f"sqlite:///{path}")
    assert store.get("model", "default", "a") == {"name": "a", "n": 1}
    assert [m["name"] for m in store.list("model", "default")] == ["a"] and len(store.list("model")) == 2
    assert [v["v"] for v in store.versions("deployment_config", "default", "c")] == [1, 2]
    assert store.delete("model", "default", "a") and not store.delete("model", "default", "a")
    store.close()

    old = tmp_path / "v1.db"  # a database written by schema version 1 gains the history table
    db = sqlite3.connect(old)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.execute("CREATE TABLE objects (kind TEXT NOT NULL, workspace TEXT NOT NULL, name TEXT NOT NULL, body TEXT NOT NULL, "
               "updated_at REAL NOT NULL, PRIMARY KEY (kind, workspace, name))")
    db.execute("INSERT INTO objects VALUES ('workspace', '', 'kept', ?, 0)", (json.dumps({"name": "kept"}),))
    stamped = {"name": "m", "updated_at": 1796232146.941}  # schema 3: the column becomes the body's own stamp
    db.execute("INSERT INTO objects VALUES ('model', 'default', 'm', ?, 2461012.5)", (json.dumps(stamped),))
    db.commit()
    db.close()
    migrated = SQLiteStore(old)
    assert migrated.schema_version() == 3 and migrated.get("workspace", "", "kept") == {"name": "kept"}
    assert not migrated.put("model", "default", "m", {**stamped, "n": 1}, expect=2461012.5)  # the old clock: no match
    assert migrated.put("model", "default", "m", {**stamped, "n": 1}, expect=1796232146.941)
    migrated.add_version("deployment_config", "default", "x", 1, {})
    migrated.close()

    db = sqlite3.connect(old)
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema version 99, newer than this rayembed's 3"):
        SQLiteStore(old)
    with pytest.raises(StoreError, match=r"cannot open the database postgresql\+psycopg://rayembed:\*\*\*@127.0.0.1:9/x"):
        open_store("postgresql://rayembed:secret@127.0.0.1:9/x")  # nothing listens there; the password is not shown


@pytest.mark.parametrize("name,ok", [("default", True), ("a1", True), ("my-model-2", True), ("a", False),
                                     ("Upper", False), ("-lead", False), ("under_score", False), ("x" * 63, True),
                                     ("x" * 64, False), ("../etc", False), ("caf\u00e9", False), (None, False)])
def test_names(name, ok):
    if ok:
        assert check_name(name, "model") == name
    else:
        with pytest.raises(InvalidName, match="is required: the model name" if name is None else "use 2-63 characters"):
            check_name(name, "model")


def test_progress_record_reaches_the_control_plane_through_storage(tmp_path, monkeypatch):
    """The loop's record goes to storage beside the job's output (at most every 2 s, always at the last step); the
    control plane reads that small file, never the job's whole log. The log keeps a line a person reads."""
    from cluster.job_files import progress_uri, read_job_progress
    from rayembed import progress

    out = str(tmp_path / "job" / "output")
    assert read_job_progress(out) is None  # nothing written yet
    write = progress.ProgressWriter(progress_uri(out))
    write(progress.progress_record(3, 10, 0.5, 4.0, 8))
    write(progress.progress_record(4, 10, 0.25, 8.0, 8))  # 2 s have not passed: not written
    assert read_job_progress(out).step == 3
    monkeypatch.setattr(progress, "WRITE_EVERY_S", 0.0)
    write(progress.progress_record(4, 10, 0.25, 8.0, 8))
    p = read_job_progress(out)
    assert (p.step, p.total_steps, p.loss, p.examples_per_s, p.percent) == (4, 10, 0.25, 8.0, 40.0)
    assert p.eta_seconds == pytest.approx(6.0)  # 6 steps x 8 examples / 8 per s
    monkeypatch.setattr(progress, "WRITE_EVERY_S", 3600.0)
    write(progress.progress_record(10, 10, 0.125, 8.0, 8))  # the last step is always written
    assert (read_job_progress(out).step, read_job_progress(out).percent) == (10, 100.0)
    assert progress_line(4, 10, 0.25, 8.0, 8).startswith("rayembed-progress step 4/10 (40%) | loss 0.2500 | 8.00 examples/s | ETA 6s")
    progress.ProgressWriter(str(tmp_path / "a-file" / "progress.json"))  # no folder yet: created on the first write
    (tmp_path / "blocked").write_text("a file where a folder should be")
    progress.ProgressWriter(str(tmp_path / "blocked" / "progress.json"))(progress.progress_record(1, 2, 0.5, 1.0, 1))


def test_gpu_memory_estimate_warns_when_the_gpu_is_smaller(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 128256, "hidden_size": 2048,
                                                       "intermediate_size": 8192, "num_hidden_layers": 16}))
    cfg = validate_config({"model": str(tmp_path), "dataset": {"training": "x"}, "output": {"dir": "y"},
                           "batch": {"global_batch_size": 16}})
    warnings, est = check_gpu_memory(cfg, 80.0)
    assert warnings == [] and 60 < est["total_gib"] < 75  # measured 64.5 GiB on an H200 (docs/benchmarks.md)
    warnings, _ = check_gpu_memory(cfg, 40.0)
    assert "needs about" in warnings[0] and "gradient_checkpointing" in warnings[0]
    lora = cfg.model_copy(update={"training": cfg.training.model_copy(update={
        "finetuning_type": "lora_merged", "gradient_checkpointing": True})})
    assert check_gpu_memory(lora, 40.0)[0] == [] and check_gpu_memory(cfg, None) == ([], None)


def test_deployment_config_checks_autoscaling_like_the_provider_does():
    from pydantic import ValidationError

    from cluster.entities import ModelDeploymentConfig

    cfg = ModelDeploymentConfig.model_validate({"name": "ab", "model": "m", "autoscaling": {"max_replicas": 3}})
    assert cfg.autoscaling.min_replicas == 1 and cfg.autoscaling.max_replicas == 3
    with pytest.raises(ValidationError, match=r"min_replicas \(3\) > max_replicas \(1\)"):
        ModelDeploymentConfig.model_validate({"name": "ab", "model": "m", "autoscaling": {"min_replicas": 3, "max_replicas": 1}})


def test_client_reports_a_server_that_resets_the_connection_as_unreachable():
    """`rayembed down` can leave a port that accepts and then resets: an ApiError, not a raw socket error."""
    import socket
    import struct
    import threading

    from cluster.client import ApiError, Http

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def reset_every_connection():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.recv(1024)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
            conn.close()

    threading.Thread(target=reset_every_connection, daemon=True).start()
    try:
        with pytest.raises(ApiError, match="cannot reach .*is `rayembed up` running"):
            Http(f"http://127.0.0.1:{srv.getsockname()[1]}", 5).request("GET", "/v2/workspaces", retries=1)
    finally:
        srv.close()


def fake_artifact(tmp_path):
    """A folder with the artifact's required files (empty JSON): enough for the control plane to register it."""
    from rayembed.artifact import REQUIRED_FILES

    onnx = tmp_path / "onnx"
    onnx.mkdir()
    for name in REQUIRED_FILES:
        (onnx / name).write_text("{}")
    return onnx


def test_a_generation_deployed_before_the_cluster_went_down_is_deployed_again(tmp_path, monkeypatch):
    """CI saw a deployment stuck PENDING for 15 min after `down` + `up`: its pending application had been
    deployed into the old cluster. A new control plane over the same store must deploy it again."""
    from cluster import controlplane, serve_apps as deployments
    from cluster.entities import Artifact, ModelEntity

    monkeypatch.setattr(controlplane, "TICK_S", 3600.0)  # reconcile only when the test says so
    serve_apps: dict[str, tuple[str, str]] = {}  # what Serve runs: app -> (status, message)
    started: list[str] = []

    def start(settings):
        started.append(settings.name)
        serve_apps[settings.name] = ("DEPLOYING", "")

    monkeypatch.setattr(deployments, "start", start)
    monkeypatch.setattr(deployments, "statuses", lambda: dict(serve_apps))
    monkeypatch.setattr(deployments, "probe", lambda app, dim: None)
    monkeypatch.setattr(deployments, "delete", lambda app: serve_apps.pop(app, None))
    onnx = fake_artifact(tmp_path)
    home = tmp_path / "home"

    cp = controlplane.ControlPlane(str(home), "http://127.0.0.1:9", "http://127.0.0.1:9")
    cp.ctx.save(ModelEntity(name="mini", base_model="b", artifact=Artifact(uri=str(onnx)), embedding_dim=8))
    cp.create_deployment("default", {"name": "keep", "model": "mini"})
    cp.reconcile()
    assert started == ["rayembed.default.keep.g1"]
    cp.reconcile()  # deployed by this incarnation, not running yet: wait, do not deploy twice
    assert started == ["rayembed.default.keep.g1"]
    cp._stop.set()

    serve_apps.clear()  # the cluster went down before g1 ran; a new cluster, a new control plane
    cp = controlplane.ControlPlane(str(home), "http://127.0.0.1:9", "http://127.0.0.1:9")
    cp.reconcile()
    assert started[-1] == "rayembed.default.keep.g2"
    dep = cp.store.get("deployment", "default", "keep")
    assert dep["status"] == "PENDING" and "rayembed.default.keep.g1 is gone" in dep["status_history"][-1]["reason"]
    serve_apps["rayembed.default.keep.g2"] = ("RUNNING", "")
    cp.reconcile()
    dep = cp.store.get("deployment", "default", "keep")
    assert dep["status"] == "READY" and dep["app"] == "rayembed.default.keep.g2"
    assert cp.store.get("provider", "default", "keep")["app"] == "rayembed.default.keep.g2"
    cp._stop.set()


def test_a_full_or_read_only_store_is_a_clear_503_and_keeps_what_it_had(tmp_path):
    from cluster.store import StoreWriteError
    from rayembed.errors import status_of

    path = tmp_path / "state.db"
    store = SQLiteStore(path)
    store.put("workspace", "", "keep", {"name": "keep"})
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full
    with pytest.raises(StoreWriteError, match="database or disk is full; check that the file") as err:
        store.put("workspace", "", "big", {"blob": "x" * 200_000})
    assert status_of(err.value)[:2] == (503, "service_unavailable_error") and str(path) in err.value.message
    assert store.get("workspace", "", "keep") == {"name": "keep"} and store.get("workspace", "", "big") is None
    store.close()

    store = SQLiteStore(path)
    store._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    with pytest.raises(StoreWriteError, match="readonly database"):  # (as root, chmod would not stop a write)
        store.delete("workspace", "", "keep")
    assert store.get("workspace", "", "keep") == {"name": "keep"}


def test_rayembed_runs_from_a_plain_shell(tmp_path):
    """A fresh shell has no RAY_AUTH_MODE: `rayembed` must set it before Ray is first imported (a module-level
    `import ray` on the CLI's import path made every verb fail with "Ray was imported before its auth mode")."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAYEMBED_HOME"] = str(tmp_path / "home")
    proc = subprocess.run([str(Path(sys.executable).parent / "rayembed"), "down"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "nothing is running" in proc.stdout, proc.stdout + proc.stderr
    probe = subprocess.run([sys.executable, "-c", "import sys, cluster.cli, cluster.local, cluster.client; "
                            "print('ray' in sys.modules)"], env=env, capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "False", probe.stderr


def test_a_deployment_asking_for_the_int8_graph_needs_it_in_the_artifact(tmp_path, monkeypatch):
    """precision: int8 is refused (400, naming the command that writes it, nothing stored) when the model's
    artifact has no model.int8.onnx, and reaches the replica's settings when it has one."""
    from cluster import controlplane, serve_apps as deployments
    from cluster.entities import Artifact, ModelEntity
    from rayembed.artifact import GRAPH_INT8

    monkeypatch.setattr(controlplane, "TICK_S", 3600.0)
    started = []
    monkeypatch.setattr(deployments, "start", started.append)
    monkeypatch.setattr(deployments, "statuses", dict)
    onnx = fake_artifact(tmp_path)
    cp = controlplane.ControlPlane(str(tmp_path / "home"), "http://127.0.0.1:9", "http://127.0.0.1:9")
    try:
        cp.ctx.save(ModelEntity(name="mini", base_model="b", artifact=Artifact(uri=str(onnx)), embedding_dim=8))
        with pytest.raises(InvalidRequest, match="precision int8 needs model.int8.onnx .*python -m train.quantize"):
            cp.create_deployment("default", {"name": "q8", "model": "mini", "precision": "int8"})
        assert cp.store.get("deployment", "default", "q8") is None
        assert cp.store.get("deployment_config", "default", "q8") is None
        (onnx / GRAPH_INT8).write_text("{}")
        cp.create_deployment("default", {"name": "q8", "model": "mini", "precision": "int8"})
        cp.reconcile()
        assert [s.precision for s in started] == ["int8"]
    finally:
        cp._stop.set()


def test_a_submission_ray_refuses_leaves_no_ghost_job_and_answers_503(ray_session, tmp_path, tiny_bert, train_file):
    """Ray's job API not answering (its agent not up yet, the dashboard restarting): the job is marked failed with the
    reason, its output model's name is free for the retry, and the caller gets a 503 (Retry-After from the edge);
    a base model whose export job is refused is not registered at all."""
    from cluster.controlplane import ControlPlane
    from rayembed.errors import NotFound, Unavailable, status_of
    from rayembed.runtime import free_port
    from tests.conftest import SAMPLE

    cp = ControlPlane(str(tmp_path / "home"), f"http://127.0.0.1:{free_port()}", "http://127.0.0.1:1")
    cp._stop.set()  # no reconcile loop: this test drives the calls itself
    config = {"model": str(tiny_bert), "name": "tiny", "schedule": {"max_steps": 2},
              "dataset": {"training": str(train_file), "evaluation": str(SAMPLE / "eval")}}
    for attempt in range(2):  # the retry passes the name check (no 409) and meets the same refusal
        with pytest.raises(Unavailable, match="Ray did not accept the submission") as refused:
            cp.create_job("default", {"output_model": "tuned", "config": config}, operator=True)
        assert status_of(refused.value)[0] == 503
    jobs = cp.list_jobs("default")
    assert [j["status"] for j in jobs] == ["failed", "failed"]
    assert all("Ray did not accept the submission" in j["error"] for j in jobs)
    with pytest.raises(Unavailable, match="Ray did not accept the export job"):
        cp.create_model("default", {"name": "base", "base_model": "all-MiniLM-L6-v2"})
    with pytest.raises(NotFound):
        cp.get_model("default", "base")


def test_a_slow_probe_holds_up_no_other_deployment(tmp_path, monkeypatch):
    """Deployments are reconciled in their own tasks: while one deployment's readiness probe hangs, another one
    becomes READY, and the hung one is not probed twice at once."""
    import threading
    import time

    from cluster import controlplane, serve_apps as deployments
    from cluster.entities import Artifact, ModelEntity

    monkeypatch.setattr(controlplane, "TICK_S", 3600.0)  # reconcile only when the test says so
    serve_apps: dict[str, tuple[str, str]] = {}
    release, probes = threading.Event(), []

    def probe(app, dim):
        probes.append(app)
        if ".slow." in app:
            release.wait(30)
        return None

    monkeypatch.setattr(deployments, "start", lambda settings: serve_apps.__setitem__(settings.name, ("RUNNING", "")))
    monkeypatch.setattr(deployments, "statuses", lambda: dict(serve_apps))
    monkeypatch.setattr(deployments, "probe", probe)
    onnx = fake_artifact(tmp_path)
    cp = controlplane.ControlPlane(str(tmp_path / "home"), "http://127.0.0.1:9", "http://127.0.0.1:9")
    try:
        cp.ctx.save(ModelEntity(name="mini", base_model="b", artifact=Artifact(uri=str(onnx)), embedding_dim=8))
        for name in ("slow", "fast"):
            cp.create_deployment("default", {"name": name, "model": "mini"})
        cp.reconcile()  # both generations started
        started = time.monotonic()
        for _ in range(3):  # the slow probe is still hanging through every pass
            cp.reconcile(wait=False)
            time.sleep(0.3)
        deadline = time.monotonic() + 10
        while cp.store.get("deployment", "default", "fast")["status"] != "READY":
            assert time.monotonic() < deadline, "the fast deployment waited for the slow probe"
            time.sleep(0.05)
        assert time.monotonic() - started < 5
        assert cp.store.get("deployment", "default", "slow")["status"] == "PENDING"
        assert probes.count("rayembed.default.slow.g1") == 1  # not probed again while its probe runs
        release.set()
        deadline = time.monotonic() + 10
        while cp.store.get("deployment", "default", "slow")["status"] != "READY":
            cp.reconcile()
            assert time.monotonic() < deadline
    finally:
        release.set()
        cp._stop.set()


@pytest.mark.parametrize("entity,answer", [
    ("Workspace", "WorkspaceOut"), ("ModelEntity", "ModelOut"), ("Dataset", "DatasetOut"),
    ("CustomizationJob", "JobOut"), ("ModelDeploymentConfig", "DeploymentConfigOut"),
    ("ModelDeployment", "DeploymentOut"), ("ModelProvider", "ProviderOut"), ("StatusChange", "StatusChangeOut")])
def test_every_stored_field_is_in_its_answer_and_times_go_out_as_iso_8601(entity, answer):
    """An answer model drops what it does not declare: a field added to an entity must be added to its answer."""
    from cluster import entities, schemas

    stored, out = getattr(entities, entity), getattr(schemas, answer)
    assert set(stored.model_fields) == set(out.model_fields)
    times = [f for f in stored.model_fields if f.endswith(("_at", "_since")) or f == "at"]
    sample = {"name": "x", "base_model": "b", "spec": {}, "output_model": "m", "output_dir": "/o", "model": "m",
              "config": "c", "deployment": "d", "app": "a", "uri": "/u", "status": "ready", "workspace": "default"}
    required = {k: v for k, v in sample.items() if k in stored.model_fields and stored.model_fields[k].is_required()}
    if entity == "CustomizationJob":
        required["status"] = "running"
    if entity == "ModelDeployment":
        required["status"] = "READY"
    body = stored.model_validate({**required, **{t: 1796232146.941 for t in times}}).model_dump(mode="json")
    shown = out.model_validate(body).model_dump(mode="json")
    assert times and all(shown[t] == "2026-12-02T17:22:26.941000Z" for t in times), shown


def test_a_tenant_names_its_regression_set_by_dataset_or_by_the_shipped_name(tmp_path, monkeypatch):
    """`regression_dataset: OTHER` becomes OTHER's evaluation folder (a place the server chose), `regression: general`
    stays a name that each node resolves to its packaged copy; neither is a path the tenant wrote."""
    from cluster import controlplane
    from cluster.tenancy import Confinement
    from rayembed.errors import InvalidRequest
    from train.config import JobConfig, validate_config

    monkeypatch.setattr(controlplane, "TICK_S", 3600.0)
    cp = controlplane.ControlPlane(str(tmp_path / "home"), "http://127.0.0.1:9", "http://127.0.0.1:9")
    cp.create_dataset("default", {"name": "web"})
    cp.create_dataset("default", {"name": "bare"})
    stored = {"uri": "x", "bytes": 1, "sha256": "0" * 64, "records": 1}
    for path in ("evaluation/corpus.jsonl", "evaluation/queries.jsonl", "evaluation/qrels/test.tsv"):
        cp.add_dataset_file("default", "web", path, {**stored, "uri": f"{tmp_path}/{path}"})
    web = cp.get_dataset("default", "web")["uri"]
    spec = cp.datasets.resolve_spec("default", {"dataset": {"training": "t.jsonl", "regression_dataset": "web"}}, "config")
    assert spec["dataset"] == {"training": "t.jsonl", "regression": f"{web}/evaluation"}
    with pytest.raises(InvalidRequest, match="dataset 'bare' has no evaluation files to use as a regression set"):
        cp.datasets.resolve_spec("default", {"dataset": {"training": "t.jsonl", "regression_dataset": "bare"}}, "config")
    with pytest.raises(InvalidRequest, match="either regression .* or regression_dataset, not both"):
        cp.datasets.resolve_spec("default", {"dataset": {"training": "t.jsonl", "regression": "general",
                                                 "regression_dataset": "web"}}, "config")
    raw = {"model": "all-MiniLM-L6-v2", "dataset": {"training": str(tmp_path / "data" / "t.jsonl"), "regression": "general"}}
    confinement = Confinement([str(tmp_path / "data")])  # a grant holding the training file
    confinement.job(JobConfig, raw, "config")  # a shipped set's name reads nothing the tenant chose
    named = validate_config({**raw, "output": {"dir": str(tmp_path / "out")}}).with_absolute_paths()
    assert named.dataset.regression == "general"  # not turned into a path on the server
    with pytest.raises(InvalidRequest, match="config.dataset.regression: .* is outside the locations"):
        confinement.job(JobConfig, {**raw, "dataset": {**raw["dataset"], "regression": "/etc"}}, "config")
    cp._stop.set()


def test_upload_slots_are_limited_per_replica_per_key_and_per_workspace():
    """Two keys of one workspace share its 2 slots (a tenant's second key does not take the rest of the replica's 4)."""
    from cluster import uploads
    from rayembed.errors import QuotaExceeded

    with uploads.Slot("k1", "ws-a"), uploads.Slot("k2", "ws-a"):
        with pytest.raises(QuotaExceeded, match="workspace 'ws-a' has 2 uploads running"):
            with uploads.Slot("k3", "ws-a"):
                pass
        with uploads.Slot("k3", "ws-b"), uploads.Slot("k4", "ws-c"):
            with pytest.raises(QuotaExceeded, match="4 uploads are running on this API replica"):
                with uploads.Slot("k5", "ws-d"):
                    pass
    with uploads.Slot("k1", "ws-a"), uploads.Slot("k1", "ws-b"):
        with pytest.raises(QuotaExceeded, match="this key has 2 uploads running"):
            with uploads.Slot("k1", "ws-c"):
                pass
    assert uploads._running == {}  # every slot given back, refused ones too
