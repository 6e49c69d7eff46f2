"""`python -m serve --model-dir DIR` joins a running Ray (RAY_ADDRESS), serves, and leaves cleanly on SIGTERM. Starting
its own Ray behind HAProxy: tests/test_install.py, from a serving node's install."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import onnxruntime as ort

from rayembed.runtime import free_port
from tests.conftest import ROOT
from rayembed.artifact import TextTokenizer


def test_standalone_cli_serves_one_model_and_stops(ray_session, minilm_onnx, tmp_path):
    from ray import serve

    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--model-dir", str(minilm_onnx), "--name", "minilm",
                             "--port", str(port), "--num-cpus", "0.5"], cwd=ROOT, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while "Ctrl-C stops" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        assert "replicas: 1 x 0.5 CPU, ONNX Runtime on CPU with 1 thread(s) each" in log.read_text()  # as given
        body = json.dumps({"model": "minilm", "input": ["a fast HTTP server"]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/embeddings", data=body,
                                     headers={"Content-Type": "application/json"})
        got = np.array(json.loads(urllib.request.urlopen(req, timeout=60).read())["data"][0]["embedding"])
        manifest = json.loads((minilm_onnx / "manifest.json").read_text())
        ids, mask = TextTokenizer(minilm_onnx, manifest["max_seq_length"])(["a fast HTTP server"])
        want = ort.InferenceSession(str(minilm_onnx / "model.onnx")).run(None, {"input_ids": ids, "attention_mask": mask})[0][0]
        np.testing.assert_allclose(got, want, atol=1e-5)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
    assert code == 0, log.read_text()[-3000:]
    left = [a for a in serve.status().applications if a.startswith("rayembed-gateway")]
    assert not left, left  # it took its apps (the gateway, the model's) down, left the cluster up
    serve.shutdown()


def test_precision_int8_without_the_int8_graph_says_how_to_write_it(minilm_onnx):
    out = subprocess.run([sys.executable, "-m", "serve", "--model-dir", str(minilm_onnx), "--precision", "int8"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "python -m train.quantize --model-dir" in out.stderr, out.stderr[-2000:]
