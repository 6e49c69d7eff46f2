"""Installs as nodes make them: a serving node's `rayembed[serve,cpu]` (no torch) serves an artifact end to end behind
HAProxy, on a Ray it starts itself; the
built wheel runs every entry point outside the checkout; cluster.yaml is a valid cluster launcher config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from rayembed.artifact import TextTokenizer
from rayembed.runtime import free_port
from tests.conftest import ROOT, haproxy_configs, listener_pids


@pytest.mark.timeout(1200)
def test_serving_install_without_torch_serves_an_artifact_behind_haproxy(built_wheel, minilm_onnx, tmp_path):
    """A serving node's install (`rayembed[serve,cpu]` from the built wheel: no torch) runs `python -m serve` as a
    person does on a machine without a cluster: it starts its own Ray with Serve's HAProxy ingress (no Python proxy
    hop), sizes its replica to the machine, answers through HAProxy (the gateway route, the provider route straight
    to the model's replicas, our error envelope), and takes everything down on SIGTERM."""
    venv = tmp_path / "serve-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    # --no-compile: the bytecode of Ray's ~3,000 modules is not what this test is about (CPU the suite needs)
    install = subprocess.run([py, "-m", "pip", "install", "-q", "--no-compile", f"{built_wheel}[serve,cpu]"],
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    present = subprocess.run([py, "-c", "import importlib.util as u; print([m for m in ('torch', 'transformers', "
                              "'peft', 'onnx', 'matplotlib', 'onnxruntime', 'ray') if u.find_spec(m)])"],
                             capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert present.stdout.strip() == "['onnxruntime', 'ray']", present.stderr

    port = free_port()
    log = tmp_path / "serve.log"
    # its own local Ray ("local": never a `ray start` cluster another test runs meanwhile), so the replicas run in
    # this venv's Python too; cwd away from the source tree. The replica ports an xdist worker was given stay.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ADDRESS", "RAY_SERVE_")) or k.startswith("RAY_SERVE_DIRECT_INGRESS_")}
    env.update(RAY_ADDRESS="local", RAY_AUTH_MODE="disabled")
    proc = subprocess.Popen([py, "-m", "serve", "--model-dir", str(minilm_onnx), "--name", "minilm", "--port", str(port),
                             "--open"],
                            cwd=tmp_path, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "Ctrl-C stops" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        # its defaults on this machine (no GPU here): one replica holding every core, one ONNX Runtime thread each
        cores = len(os.sched_getaffinity(0))
        assert f"replicas: 1 x {cores} CPU, ONNX Runtime on CPU with {cores} thread(s) each" in log.read_text()
        # The gateway's port is HAProxy's frontend: every process listening on it is an HAProxy whose config binds
        # it. There may be more than one: a graceful reload (`-sf`) leaves the old process draining for a while.
        ours = {pid for pid, cfg in haproxy_configs().items() if f"bind 127.0.0.1:{port}" in cfg}
        listening = listener_pids(port)
        assert ours and listening and listening <= ours, (ours, listening)
        texts = ["a fast HTTP server", "an image converter"]
        manifest = json.loads((minilm_onnx / "manifest.json").read_text())
        ids, mask = TextTokenizer(minilm_onnx, manifest["max_seq_length"])(texts)
        want = ort.InferenceSession(str(minilm_onnx / "model.onnx")).run(None, {"input_ids": ids, "attention_mask": mask})[0]
        body = json.dumps({"model": "minilm", "input": texts, "dimensions": 384}).encode()
        data = post_json(f"http://127.0.0.1:{port}/v1/embeddings", body)["data"]
        np.testing.assert_allclose(np.array([d["embedding"] for d in data]), want, atol=1e-5)
        # The provider route goes from HAProxy straight to the model's replicas (its own application), not the gateway.
        route = "/v2/workspaces/default/inference/gateway/provider/minilm/-"
        while not any(f"path_beg {route}" in cfg for cfg in haproxy_configs().values()):
            assert time.monotonic() < deadline, "HAProxy never got a backend for the provider route"
            time.sleep(0.5)
        answer = post_json(f"http://127.0.0.1:{port}{route}/v1/embeddings", body)
        assert answer["model"] == "minilm"
        np.testing.assert_allclose(np.array([d["embedding"] for d in answer["data"]]), want, atol=1e-5)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/embeddings", method="GET")
        with pytest.raises(urllib.error.HTTPError) as err:  # our envelope, through HAProxy
            urllib.request.urlopen(req, timeout=60)
        assert err.value.code == 405 and json.loads(err.value.read())["error"]["code"] == "method_not_allowed"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
    assert code == 0, log.read_text()[-3000:]
    time.sleep(2)
    assert not [pid for pid, cfg in haproxy_configs().items() if f"bind 127.0.0.1:{port}" in cfg]


def post_json(url: str, body: bytes) -> dict:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


@pytest.mark.timeout(900)
def test_the_built_wheel_runs_every_entry_point_outside_the_checkout(built_wheel, tmp_path):
    """What a node image does: a non-editable install of the built wheel. Every package the entry points import
    comes from the wheel (the `batch` package was once left out of it: jobs failed with "No module named 'batch'")."""
    import sysconfig

    wheel = built_wheel
    venv = tmp_path / "wheel-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    install = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], capture_output=True, text=True,
                             timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    # the dependencies from this environment, after the venv's own site-packages (so the wheel's packages win);
    # a path in a .pth file does not run that folder's own .pth files, so the checkout's editable finder stays out
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True,
                          text=True, check=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run = lambda *args: subprocess.run(list(args), cwd=tmp_path, capture_output=True, text=True, timeout=300,
                                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    probe = run(py, "-c", "import batch.corpus, batch.__main__, train.job, train.loop, tune.sweep, serve.app, "
                "cluster.controlplane, cluster.uploads, cluster.tenancy, rayembed.locations, rayembed.storage; print(batch.__file__, train.__file__)")
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert all(p.startswith(site) for p in probe.stdout.split()), probe.stdout
    for module in ("train", "batch", "serve", "tune"):
        proc = run(py, "-m", module, "--help")
        assert proc.returncode == 0 and "usage:" in proc.stdout, (module, proc.stderr[-2000:])
    proc = run(str(venv / "bin" / "rayembed"), "--help")
    assert proc.returncode == 0 and "datasets" in proc.stdout, proc.stderr[-2000:]


def test_cluster_yaml_is_a_valid_cluster_launcher_config():
    """cluster.yaml against the Ray cluster launcher's own schema, shipped inside the ray package."""
    import jsonschema
    import ray
    import yaml

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    setup = " ".join(config["head_setup_commands"] + config["worker_setup_commands"])
    assert "[serve,train,cpu,postgres]" in setup and "[serve,train,gpu]" in setup and " -e " not in setup
    broken = {**config, "max_workers": "four"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
