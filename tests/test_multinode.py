"""A cluster of Ray nodes that share no writable folder, on this machine: a head (the API, Serve's proxy), two
"trainer" nodes (a custom resource that stands for the GPU), and a "server" node with a logical GPU. Storage is an
S3 endpoint (moto), state is a real PostgreSQL server. Each node has its own scratch and cache folders, and a
client that only speaks HTTP runs the whole story: upload a dataset and a base model, train (the trainer node
holding the worker and the control plane dies mid-job: the worker resumes on the other trainer node from its
checkpoint in storage, the control plane restarts on another node with every entity), deploy to the server node,
embed. The base model is the tests' tiny BERT: what is under test is where files and processes go, not the model.
"""

from __future__ import annotations

import json
import os
import shutil
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from cluster.client import ApiError, Client
from cluster.local import kill_processes
from rayembed.runtime import free_port, serve_ingress_env
from rayembed import storage
from tests.conftest import SAMPLE
from tests.manifests import crd_errors, serve_config

pytestmark = pytest.mark.timeout(2400)
BUCKET = "s3://rayembed-test/multinode"
TINY_BASE = f"{BUCKET}/base-models/tiny-bert"


class Nodes:
    """`ray start` nodes with their own temp, scratch and cache folders; killed by their own processes only."""

    def __init__(self, root: Path, env: dict):
        self.root, self.env, self.temp = root, env, {}
        self.ray = str(Path(sys.executable).parent / "ray")
        self.address = None

    def folder(self, name: str, kind: str) -> Path:
        return self.root / name / kind

    def start(self, name: str, *args: str) -> None:
        temp = Path("/tmp") / f"rayembed-mn-{os.getpid()}-{name}"  # short: Ray's socket paths have a length limit
        self.temp[name] = temp
        env = {**self.env, "RAY_AUTH_MODE": "token", "RAYEMBED_SCRATCH": str(self.folder(name, "scratch")),
               "RAYEMBED_CACHE": str(self.folder(name, "cache"))}
        ports = ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                 "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
                 "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port())]
        if self.address is None:
            gcs = free_port()
            cmd = [self.ray, "start", "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
                   "--dashboard-port", str(free_port()), "--ray-client-server-port", str(free_port()), *ports]
        else:
            cmd = [self.ray, "start", "--address", self.address, *ports]
        proc = subprocess.run([*cmd, "--temp-dir", str(temp), "--disable-usage-stats", *args], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        if self.address is None:
            self.address = (temp / "ray_current_cluster").read_text().split()[0] if (temp / "ray_current_cluster").is_file() \
                else f"127.0.0.1:{gcs}"

    def kill(self, name: str) -> None:
        kill_processes(self.temp[name], self.address if name == "head" else None)

    def stop(self) -> None:
        for name in reversed(list(self.temp)):
            self.kill(name)
            shutil.rmtree(self.temp[name], ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_env, postgres_url):
    root = tmp_path_factory.mktemp("multinode")
    # Ray picks its auth mode itself; the replica ports an xdist worker was given (tests/conftest.py) stay
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("RAY_") or k.startswith(("RAY_SERVE_DIRECT_INGRESS_", "RAY_LOG_MONITOR_"))}
    subprocess.run([str(Path(sys.executable).parent / "ray"), "get-auth-token", "--generate"], env=base,
                   capture_output=True, timeout=120)
    env = {**base, **s3_env, **serve_ingress_env("haproxy")}
    nodes = Nodes(root, env)
    port = free_port()
    up_env = {**env, "RAYEMBED_HOME": str(root / "head" / "home"), "RAYEMBED_PORT": str(port),
              "RAYEMBED_STORAGE": BUCKET, "RAYEMBED_DATABASE_URL": postgres_url, "RAYEMBED_PROXY_LOCATION": "HeadOnly",
              "RAYEMBED_CONTROL_PLANE_RESOURCES": json.dumps({"controlplane": 0.01}),
              "RAYEMBED_BASE_MODELS": TINY_BASE,  # the operator allows the tiny BERT, published in storage
              # the head has no CPUs: job drivers reserve its custom resource instead, which keeps them there
              "RAYEMBED_DRIVER_CPUS": "0", "RAYEMBED_DRIVER_RESOURCES": json.dumps({"driver": 1})}
    try:
        nodes.start("head", "--num-cpus", "0", "--resources", json.dumps({"driver": 4}))
        nodes.start("trainer-a", "--num-cpus", "2", "--resources", json.dumps({"trainer": 1, "controlplane": 1, "trainer-a": 1}))
        up_env["RAY_ADDRESS"] = nodes.address
        rayembed = lambda *a: subprocess.run([str(Path(sys.executable).parent / "rayembed"), *a], env=up_env,
                                             cwd=root, capture_output=True, text=True, timeout=600)
        proc = rayembed("up", "--open")  # from a folder that is not the checkout: jobs must still import every package
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert f"storage {BUCKET}" in proc.stdout and "postgresql+psycopg://postgres:***@" in proc.stdout
        nodes.start("server", "--num-cpus", "2", "--num-gpus", "1", "--resources", json.dumps({"controlplane": 1, "server": 1}))
        yield nodes, Client(base_url=f"http://127.0.0.1:{port}"), up_env, rayembed
        proc = rayembed("down")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finally:
        nodes.stop()


def where(up_env: dict, code: str) -> str:
    """Python run as a Ray driver on this cluster (as an operator would), its stdout."""
    script = "import ray\nray.init(namespace='rayembed', log_to_driver=False, logging_level='ERROR')\n" + code
    proc = subprocess.run([sys.executable, "-c", script], env={**up_env, "RAY_AUTH_MODE": "token"}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def control_plane_node(up_env: dict) -> str:
    return where(up_env, "from ray.util.state import list_actors\n"
                 "a = [a for a in list_actors(filters=[('name', '=', 'rayembed-control-plane'), ('state', '=', 'ALIVE')])]\n"
                 "print(a[0].node_id if a else '')")


def node_id(up_env: dict, name: str) -> str:
    """The Ray node id of one of our nodes, by the resource named after it."""
    return where(up_env, f"print(next(n['NodeID'] for n in ray.nodes() if n['Alive'] and {name!r} in n['Resources']))")


def test_a_client_that_shares_no_disk_runs_the_story_across_nodes(cluster, tiny_bert, tmp_path):
    nodes, c, up_env, rayembed = cluster
    base = TINY_BASE  # an allowed base model (RAYEMBED_BASE_MODELS), as tenants must name it
    storage.publish(str(tiny_bert), base)  # each node stages it from storage, as it stages the dataset
    lines = (SAMPLE / "train.jsonl").read_text().splitlines()[:200]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(lines) + "\n")
    ds = c.datasets.create("debian", training=str(train), evaluation=str(SAMPLE / "eval"))
    assert re.fullmatch(f"{BUCKET}/workspaces/default-[0-9a-f]{{12}}/datasets/debian-[0-9a-f]{{12}}", ds.uri), ds.uri
    assert ds.files["training.jsonl"].records == 200

    # a job asking for the cluster's one GPU gets it (the driver holds none) and stops at the device check
    gpu_job = c.customization.jobs.create("needs-cuda", config={
        "model": base, "dataset": {"name": "debian"}, "schedule": {"max_steps": 2},
        "training": {"max_seq_length": 32}, "resources": {"use_gpu": True, "max_failures": 0}})
    done = c.customization.jobs.wait(gpu_job.name, timeout_s=600)
    assert done.status == "failed" and "no CUDA device is usable" in done.error, (done.error, done.status_history)

    cp_before = control_plane_node(up_env)
    assert cp_before == node_id(up_env, "trainer-a")  # the only node with the resource it is pinned to when `up` ran
    nodes.start("trainer-b", "--num-cpus", "2", "--resources", json.dumps({"trainer": 1, "controlplane": 1, "trainer-b": 1}))
    where(up_env, "@ray.remote(num_cpus=2, resources={'trainer-b': 1})\nclass Hold:\n    def ping(self):\n        return 1\n"
          "h = Hold.options(name='hold', lifetime='detached').remote()\nray.get(h.ping.remote())")  # trainer-b busy
    # 100 short steps, a checkpoint every 10: the kill comes within a second of the first one registered, long
    # before the end, however fast the machine
    job = c.customization.jobs.create("debian-tuned", config={
        "model": base, "name": "mn", "dataset": {"name": "debian"},
        "training": {"max_seq_length": 48}, "schedule": {"max_steps": 100}, "batch": {"global_batch_size": 8},
        "optimizer": {"learning_rate": 1e-4}, "output": {"checkpoint_every_steps": 10, "log_every_steps": 10},
        "resources": {"use_gpu": False, "worker_resources": {"trainer": 1}}})
    registered = storage.join(job.output_dir, "checkpoints", "mn", "checkpoint_manager_snapshot.json")
    deadline, status = time.monotonic() + 600, None
    while not storage.is_file(registered):  # a checkpoint uploaded and registered; the worker runs on trainer-a
        assert time.monotonic() < deadline and (status is None or status.status in ("pending", "running")), status
        status = c.customization.jobs.get_status(job.name)
        time.sleep(0.2)
    nodes.kill("trainer-a")  # the node holding the control plane, and the training worker with it
    at_kill = status.progress if status else None
    shutil.rmtree(nodes.folder("trainer-a", "scratch"), ignore_errors=True)
    shutil.rmtree(nodes.folder("head", "scratch") / "inputs")  # the driver's copies: the worker must read its own
    where(up_env, "ray.kill(ray.get_actor('hold'))")  # trainer-b free for the worker's restart
    done = c.customization.jobs.wait(job.name, timeout_s=1200)
    assert done.status == "completed", done.error
    assert control_plane_node(up_env) in (node_id(up_env, "trainer-b"), node_id(up_env, "server"))  # state: PostgreSQL
    resumed = done.result["eval"]["training"]["resumed_from_step"]
    assert resumed is not None and resumed >= 10, (at_kill, c.customization.jobs.get_logs(job.name)[-6000:])
    assert [d.name for d in c.datasets.list()] == ["debian"] and c.customization.jobs.retrieve(gpu_job.name).status == "failed"

    model = c.models.retrieve("debian-tuned")
    assert model.artifact.uri == f"{job.output_dir}/onnx" and model.artifact.uri.startswith(BUCKET)
    assert model.artifact.sha256 == storage.read_seal(model.artifact.uri)["sha256"]
    nodes.kill("trainer-b")  # training is over: no trainer node remains (the control plane may move once more)
    shutil.rmtree(nodes.folder("trainer-b", "scratch"), ignore_errors=True)
    deadline, server = time.monotonic() + 300, node_id(up_env, "server")
    while control_plane_node(up_env) != server:  # once Ray sees trainer-b gone, the actor restarts on the server
        assert time.monotonic() < deadline, "the control plane did not come back on the server node"
        time.sleep(1)
    while True:  # the API answers again (its replica may have been on a node that died)
        try:
            assert [d.name for d in c.datasets.list()] == ["debian"]
            break
        except ApiError:
            assert time.monotonic() < deadline, "the API did not come back"
            time.sleep(1)

    # a random tiny model's verdict on 100 queries is noise (improved in one run, worse in the next): the promotion
    # gate is tests/test_platform.py's; this test is about where files and processes go
    c.deployments.create("debian-tuned", model="debian-tuned", num_cpus=1, allow_worse=True)
    c.deployments.wait_ready("debian-tuned", timeout_s=600)
    texts = ["a fast HTTP server", "an image converter for the command line"]
    got = c.inference.gateway.model.post("v1/embeddings", name="debian-tuned",
                                         body={"input": texts, "input_type": "query"})
    served = np.array([d["embedding"] for d in got["data"]], np.float32)

    from rayembed.cache import materialize
    from rayembed.engine import TextEmbedder

    local = materialize(model.artifact.uri, model.artifact.sha256, root=tmp_path / "client-cache")
    expected = TextEmbedder(str(local), device="cpu")(texts, "query")  # the artifact's own vectors, run here
    assert np.allclose(served, expected, atol=1e-4)
    assert (nodes.folder("server", "cache") / model.artifact.sha256 / "model.onnx").is_file()  # materialized there

    jobs = [{k: j[k] for k in ("spec", "output_dir", "result")} for j in c.customization.jobs.list()]
    everything = json.dumps([c.datasets.list(), jobs, c.models.list(), c.deployments.list(), c.providers.list()],
                            default=lambda answer: answer.model_dump(mode="json"))
    assert str(nodes.root) not in everything and "/tmp/" not in everything  # URIs and names, never a node's path
    assert done.output_dir.startswith(BUCKET) and done.result["eval"]["dataset"] == f"{ds.uri}/evaluation"
    assert all(f.uri.startswith(BUCKET) for f in c.datasets.retrieve("debian").files.values())

    # exported for a serving-only KubeRay cluster: a valid RayService, whose applications, started from its
    # serveConfigV2 on this cluster as KubeRay would start them, serve the same vectors from the same artifact
    out = tmp_path / "rayservice.yaml"
    proc = rayembed("deployments", "export", "debian-tuned", "--image", "registry.example/rayembed:0.1.0-gpu", "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = yaml.safe_load(out.read_text())
    assert crd_errors(manifest) == [] and manifest["metadata"]["name"] == "debian-tuned"
    provider = serve_config(manifest).applications[0].args["models"][0]["providers"][0]
    assert (provider["model_dir"], provider["model_sha256"]) == (model.artifact.uri, model.artifact.sha256)
    assert (provider["num_replicas"], provider["num_cpus"], provider["num_gpus"]) == (1, 1, 0)
    from serve.auth import new_key, records_of

    key = new_key()[1]  # what the replicas would hash from $RAYEMBED_API_KEYS (the `rayembed` Secret)
    where(up_env, f"import yaml\nfrom tests.manifests import run_applications, serve_config\n"
          f"config = serve_config(yaml.safe_load(open({str(out)!r}).read()))\n"
          f"config.applications[0].args['auth'] = {{'keys': {records_of(key)!r}}}\n"
          f"run_applications(config, name='exported', route_prefix='/exported')")
    body = json.dumps({"model": "debian-tuned", "input": texts, "input_type": "query"}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{up_env['RAYEMBED_PORT']}/exported/v1/embeddings", data=body,
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    got = json.loads(urllib.request.urlopen(req, timeout=120).read())
    assert np.allclose(np.array([d["embedding"] for d in got["data"]], np.float32), served, atol=1e-5)
    where(up_env, "from ray import serve\nserve.delete('exported')")
