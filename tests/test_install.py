"""Installs as nodes make them: a serving node's `rayembed[serve,cpu]` (no torch) serves an artifact end to end; the
built wheel runs every entry point outside the checkout; cluster.yaml is a valid cluster launcher config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from rayembed.runtime import free_port
from tests.conftest import ROOT


@pytest.mark.timeout(1200)
def test_serving_install_without_torch_serves_an_artifact(built_wheel, minilm_onnx, tmp_path):
    venv = tmp_path / "serve-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    # --no-compile: the bytecode of Ray's ~3,000 modules is not what this test is about (CPU the suite needs)
    # the wheel a user installs (built once per run), with the serving extras
    install = subprocess.run([py, "-m", "pip", "install", "-q", "--no-compile", f"{built_wheel}[serve,cpu]"],
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    present = subprocess.run([py, "-c", "import importlib.util as u; print([m for m in ('torch', 'transformers', "
                              "'peft', 'onnx', 'matplotlib', 'onnxruntime', 'ray') if u.find_spec(m)])"],
                             capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert present.stdout.strip() == "['onnxruntime', 'ray']", present.stderr

    port = free_port()
    log = tmp_path / "serve.log"
    # its own local Ray, so the replicas run in this venv's Python too; cwd away from the source tree
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([py, "-m", "serve", "--model-dir", str(minilm_onnx), "--name", "minilm", "--port", str(port),
                             "--num-cpus", "0.5"], cwd=tmp_path, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while "Ctrl-C stops" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        body = json.dumps({"model": "minilm", "input": ["a fast HTTP server", "an image converter"], "dimensions": 384}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/embeddings", data=body,
                                     headers={"Content-Type": "application/json"})
        data = json.loads(urllib.request.urlopen(req, timeout=60).read())["data"]
        assert [len(d["embedding"]) for d in data] == [384, 384]
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
    assert code == 0, log.read_text()[-3000:]


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
                "cluster.controlplane, cluster.datasets, rayembed.storage; print(batch.__file__, train.__file__)")
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
