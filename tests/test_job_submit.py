"""`ray job submit` against a separate `ray start --head` cluster with token auth (slow: starts a cluster).

Run with: python -m pytest -m slow tests/test_job_submit.py
The cluster is torn down by killing its own processes (never `ray stop`, which kills every Ray on the machine).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster.local import free_port, kill_processes
from tests.conftest import ROOT


def kill_cluster(temp_dir: Path, gcs_port: int) -> None:
    """SIGKILL this cluster's own processes (cluster.local.kill_processes); forget its address file."""
    kill_processes(temp_dir)
    # a killed head leaves its address behind; a later ray.init() would try to join it and hang
    for address_file in (temp_dir / "ray_current_cluster", Path("/tmp/ray/ray_current_cluster")):
        if address_file.is_file() and f":{gcs_port}" in address_file.read_text():
            address_file.unlink()


@pytest.mark.slow
def test_training_job_under_ray_job_submit(tmp_path, tiny_bert, train_file):
    temp_dir = Path("/tmp") / f"rayembed-submit-{os.getpid()}"  # short: Ray's socket paths have a length limit
    dash, gcs = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    bin_dir = Path(sys.executable).parent
    cfg = {"model": str(tiny_bert), "name": "submitted", "dataset": {"training": str(train_file)},
           "training": {"max_seq_length": 32}, "schedule": {"max_steps": 2}, "batch": {"global_batch_size": 8},
           "output": {"dir": str(tmp_path / "out")}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    start = [str(bin_dir / "ray"), "start", "--head", "--num-cpus", "2", "--temp-dir", str(temp_dir),
             "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
             "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
             "--metrics-export-port", str(free_port()), "--ray-client-server-port", str(free_port()),
             "--runtime-env-agent-port", str(free_port())]
    try:
        subprocess.run(start, check=True, env=env, capture_output=True, timeout=180)
        submit = [str(bin_dir / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(ROOT),
                  "--", sys.executable, "-m", "train", "--config", str(tmp_path / "job.yaml")]
        for _ in range(20):  # the dashboard agent may need a few seconds after `ray start`
            proc = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900)
            if "No available agent" not in proc.stdout + proc.stderr:
                break
            time.sleep(5)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        assert "succeeded" in proc.stdout
        report = json.loads((tmp_path / "out" / "eval.json").read_text())
        assert report["training"]["steps"] == 2 and (tmp_path / "out" / "onnx" / "model.onnx").is_file()
        # without the token the same submission is refused
        denied = subprocess.run(submit, env={**os.environ, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True, timeout=120)
        assert denied.returncode != 0 and "authentication" in (denied.stdout + denied.stderr).lower()
    finally:
        kill_cluster(temp_dir, gcs)
