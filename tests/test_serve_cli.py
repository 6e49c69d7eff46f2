"""`python -m serve --model-dir DIR` joins a running Ray (RAY_ADDRESS), serves, and leaves cleanly on SIGTERM. Starting
its own Ray behind HAProxy: tests/test_install.py, from a serving node's install."""

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
from tests.conftest import ROOT
from rayembed.artifact import TextTokenizer


def test_standalone_cli_serves_one_model_with_its_keys_and_stops(ray_session, minilm_onnx, tmp_path):
    """`python -m serve --api-keys-file`: the gateway's routes and the provider's own route both need a key."""
    from ray import serve

    from serve.auth import new_key

    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    env.pop("RAYEMBED_API_KEYS", None)
    log = tmp_path / "serve.log"
    keys = tmp_path / "keys"
    key = new_key()[1]
    keys.write_text(f"# the team's key\n{key}\n")
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--model-dir", str(minilm_onnx), "--name", "minilm",
                             "--port", str(port), "--num-cpus", "0.5", "--api-keys-file", str(keys)], cwd=ROOT, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while "Ctrl-C stops" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        assert "replicas: 1 x 0.5 CPU, ONNX Runtime on CPU with 1 thread(s) each" in log.read_text()  # as given
        body = json.dumps({"model": "minilm", "input": ["a fast HTTP server"]}).encode()
        provider = f"http://127.0.0.1:{port}/v2/workspaces/default/inference/gateway/provider/minilm/-/v1/embeddings"
        for url, auth in [(f"http://127.0.0.1:{port}/v1/embeddings", None), (provider, None),
                          (f"http://127.0.0.1:{port}/v1/models", None), (provider, f"Bearer {key}x")]:
            headers = {"Content-Type": "application/json", **({"Authorization": auth} if auth else {})}
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(urllib.request.Request(url, data=None if url.endswith("models") else body,
                                                              headers=headers), timeout=60)
            assert err.value.code == 401, url
        assert key not in log.read_text()
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        assert urllib.request.urlopen(urllib.request.Request(provider, data=body, headers=headers), timeout=60).status == 200
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/embeddings", data=body, headers=headers)
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


def test_the_standalone_gateway_fails_closed(minilm_onnx, tmp_path):
    """No keys: refused unless --open, and --open only on a loopback bind; a malformed key file is named."""
    env = {k: v for k, v in os.environ.items() if k != "RAYEMBED_API_KEYS"}
    bad = tmp_path / "keys"
    bad.write_text("sk-not-a-rayembed-key\n")
    for extra, message in [([], "needs API keys"), (["--open", "--host", "0.0.0.0"], "only on a loopback --host"),
                           (["--api-keys-file", str(bad)], "entry 1 is not an API key")]:
        out = subprocess.run([sys.executable, "-m", "serve", "--model-dir", str(minilm_onnx), *extra], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and message in out.stderr, (extra, out.stderr[-2000:])


def test_precision_int8_without_the_int8_graph_says_how_to_write_it(minilm_onnx):
    out = subprocess.run([sys.executable, "-m", "serve", "--model-dir", str(minilm_onnx), "--precision", "int8", "--open"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "python -m train.quantize --model-dir" in out.stderr, out.stderr[-2000:]
