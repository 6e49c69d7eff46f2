"""A serving node's install, `rayembed[serve,cpu]`, has no torch and serves an artifact end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from cluster.runtime import free_port
from tests.conftest import ROOT


@pytest.mark.timeout(1200)
def test_serving_install_without_torch_serves_an_artifact(minilm_onnx, tmp_path):
    venv = tmp_path / "serve-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    install = subprocess.run([py, "-m", "pip", "install", "-q", f"{ROOT}[serve,cpu]"], capture_output=True,
                             text=True, timeout=900)
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
