"""`python -m serve --model-dir DIR` joins a running Ray (RAY_ADDRESS), or starts its own behind HAProxy; serves,
and leaves cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import onnxruntime as ort
import pytest

from rayembed.runtime import free_port
from tests.conftest import ROOT, haproxy_configs, listener_pids
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


def test_standalone_cli_starts_its_own_ray_behind_haproxy(minilm_onnx, tmp_path):
    """Without a cluster to join, `python -m serve` starts Ray with Serve's HAProxy ingress (no Python
    proxy hop), sizes its replica to the machine, answers through it, and takes everything down on SIGTERM."""
    port = free_port()
    env = {k: v for k, v in os.environ.items()  # the replica ports an xdist worker was given (tests/conftest.py) stay
           if not k.startswith(("RAY_ADDRESS", "RAY_SERVE_")) or k.startswith("RAY_SERVE_DIRECT_INGRESS_")}
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--model-dir", str(minilm_onnx), "--name", "minilm",
                             "--port", str(port)], cwd=ROOT, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
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
        body = json.dumps({"model": "minilm", "input": ["a fast HTTP server", "an image viewer"]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/embeddings", data=body,
                                     headers={"Content-Type": "application/json"})
        data = json.loads(urllib.request.urlopen(req, timeout=60).read())["data"]
        manifest = json.loads((minilm_onnx / "manifest.json").read_text())
        ids, mask = TextTokenizer(minilm_onnx, manifest["max_seq_length"])(["a fast HTTP server", "an image viewer"])
        want = ort.InferenceSession(str(minilm_onnx / "model.onnx")).run(None, {"input_ids": ids, "attention_mask": mask})[0]
        np.testing.assert_allclose(np.array([d["embedding"] for d in data]), want, atol=1e-5)
        # The provider route goes from HAProxy straight to the model's replicas (its own application), not the gateway.
        route = "/v2/workspaces/default/inference/gateway/provider/minilm/-"
        while not any(f"path_beg {route}" in cfg for cfg in haproxy_configs().values()):
            assert time.monotonic() < deadline, "HAProxy never got a backend for the provider route"
            time.sleep(0.5)
        req = urllib.request.Request(f"http://127.0.0.1:{port}{route}/v1/embeddings", data=body,
                                     headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=60).read())
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


def test_precision_int8_without_the_int8_graph_says_how_to_write_it(minilm_onnx):
    out = subprocess.run([sys.executable, "-m", "serve", "--model-dir", str(minilm_onnx), "--precision", "int8"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "python -m train.quantize --model-dir" in out.stderr, out.stderr[-2000:]
