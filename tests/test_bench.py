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
