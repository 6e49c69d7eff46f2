"""The GPU training benchmark runs end to end at a tiny size on CPU (full size needs a GPU)."""

import pytest

from bench.gpu_train import main as gpu_train


def test_gpu_train_bench_tiny_on_cpu():
    result = gpu_train(["--size", "tiny", "--steps", "2", "--warmup", "1", "--batch", "2", "--seq", "32"])
    assert result["sequences_per_step"] == 6  # batch 2, each with its query, positive and a negative
    tokens_per_step = result["sequences_per_step"] * result["seq"]
    assert result["train_tokens_per_s"] == pytest.approx(tokens_per_step / result["step_seconds"], rel=1e-6)
    assert result["forward_tokens_per_s"] > result["train_tokens_per_s"]


@pytest.mark.gpu
def test_gpu_train_bench_full_size():
    from bench.gpu_train import PEAK_BF16_TFLOPS

    result = gpu_train(["--size", "full", "--steps", "5"])
    assert result["device"] != "cpu" and 1.0e9 < result["params"] < 1.5e9  # the full architecture, on a GPU
    assert any(k in result["device"] for k in PEAK_BF16_TFLOPS), f"add {result['device']}'s bf16 peak to PEAK_BF16_TFLOPS"
    assert 0.3 <= result["mfu"] < 1, result  # docs/benchmarks.md §3: 52.5 % compiled on an H200


def test_soak_runs_briefly_and_accounts_for_every_request(tmp_path, minilm_onnx):
    """bench/soak.py end to end at a tiny duration: a real server, the open-loop client, memory samples."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT
    from rayembed.runtime import free_port

    proc = subprocess.run([sys.executable, "-m", "bench.soak", "--model-dir", str(minilm_onnx), "--work", str(tmp_path),
                           "--duration", "11", "--warmup", "2", "--saturation-seconds", "2", "--load", "0.3",
                           "--port", str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=600)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    samples = [json.loads(line) for line in (tmp_path / "soak.jsonl").read_text().splitlines()]
    assert result["errors"] == 0 and result["requests"] > 10 and result["saturation_rps"] > result["rate_rps"] > 0, proc.stdout[-2000:]
    assert len(samples) >= 2 and any(k.startswith("ray::ServeReplica") for k in samples[-1]["rss_mib"])
    assert result["memory"]["total_after_warmup_mib"] > 100 and (tmp_path / "soak.png").stat().st_size > 10_000
    # the goal (docs/benchmarks.md: no errors, memory growth under 5 % after warm-up), judged here from the numbers
    met = result["errors"] == 0 and result["memory"]["total_growth_pct"] < 5.0
    assert result["goal_met"] is met and proc.returncode == (0 if met else 1), result


def test_hops_times_each_call_over_one_connection_and_drops_the_first_fifth():
    """bench.hops' HTTP measure: one keep-alive connection, the status, the median of the last 80 % of calls."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from bench.hops import http_median, median_ms

    assert median_ms([9.0] * 20 + [0.001] * 40 + [0.002] * 40) == 1.5  # the first fifth (warm-up) is left out
    seen = []

    class Slow(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            seen.append((self.client_address, self.rfile.read(int(self.headers["Content-Length"]))))
            time.sleep(0.005)
            self.send_response(201)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        p50, status = http_median(server.server_address[1], "POST", "/x", b'{"a": 1}', 10)
    finally:
        server.shutdown()
    assert status == 201 and 5 <= p50 < 500
    assert len(seen) == 10 and {body for _, body in seen} == {b'{"a": 1}'}
    assert len({addr for addr, _ in seen}) == 1  # one connection, kept alive
