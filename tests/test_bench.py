"""The GPU training benchmark runs end to end at a tiny size on CPU (full size needs a GPU)."""

import pytest

from bench.gpu_train import main as gpu_train


def test_gpu_train_bench_tiny_on_cpu():
    result = gpu_train(["--size", "tiny", "--steps", "2", "--warmup", "1", "--batch", "2", "--seq", "32"])
    assert result["sequences_per_step"] == 6 and result["train_tokens_per_s"] > 0
    assert result["forward_tokens_per_s"] > result["train_tokens_per_s"]


@pytest.mark.gpu
def test_gpu_train_bench_full_size():
    result = gpu_train(["--size", "full", "--steps", "5"])
    assert result["mfu"] is None or 0 < result["mfu"] < 1


def test_soak_runs_briefly_and_accounts_for_every_request(tmp_path, minilm_onnx):
    """bench/soak.py end to end at a tiny duration: a real server, the open-loop client, memory samples."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT
    from cluster.runtime import free_port

    proc = subprocess.run([sys.executable, "-m", "bench.soak", "--model-dir", str(minilm_onnx), "--work", str(tmp_path),
                           "--duration", "12", "--warmup", "4", "--saturation-seconds", "3", "--load", "0.3",
                           "--port", str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=600)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    samples = [json.loads(line) for line in (tmp_path / "soak.jsonl").read_text().splitlines()]
    assert result["errors"] == 0 and result["requests"] > 10 and result["saturation_rps"] > result["rate_rps"] > 0, proc.stdout[-2000:]
    assert len(samples) >= 2 and any(k.startswith("ray::ServeReplica") for k in samples[-1]["rss_mib"])
    assert result["memory"]["total_after_warmup_mib"] > 100 and (tmp_path / "soak.png").stat().st_size > 10_000
    assert proc.returncode == (0 if result["goal_met"] else 1)
