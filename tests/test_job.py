"""The real customization job on a local Ray: tiny nemotron-style Llama and tiny BERT, full and LoRA,
a worker killed mid-run, and failures that happen before any Ray work."""

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from ray.train import UserCallback

from train.config import ConfigError, validate_config
from tests.conftest import SAMPLE
from train.data import DataError, load_beir
from train.job import OutputConflict, run_job
from train.loop import METRICS_REPORT_EVERY_S, metrics_report_due
from train.trainer import TRAIN_POLL_ENV, build_trainer
from train.model import BiEncoder, inspect_model, load_backbone
from train.pooling import normalize
from rayembed.artifact import TextTokenizer


def job(model_dir, train_file, out, **sections):
    raw = {"model": str(model_dir), "name": f"t-{Path(out).name}",
           "dataset": {"training": str(train_file), "validation_fraction": 0.2},
           "training": {"max_seq_length": 48}, "batch": {"global_batch_size": 8, "micro_batch_size": 4},
           "optimizer": {"learning_rate": 1e-3}, "loss": {"negatives_per_query": 2},
           "output": {"dir": str(out), "checkpoint_every_steps": 3, "log_every_steps": 2}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return validate_config(raw)


def assert_artifact(out: Path, hidden: int, outcome: str, max_move: float | None = None):
    """The job's files, its report (the verdict the run reaches, `outcome`, where the run is decisive; or that nDCG@10
    moved by at most `max_move`, where the run is small enough that noise straddles the verdict's band), and a served
    graph equal to the merged PyTorch model."""
    assert {"checkpoints", "model", "onnx", "eval.json", "eval.png", "config.yaml"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "eval.json").read_text())
    assert report["verdict"]["outcome"] == outcome, report["verdict"]
    if max_move is not None:
        assert abs(report["verdict"]["delta_ndcg@10"]) <= max_move, report["verdict"]
    assert report["verdict"]["delta_ndcg@10"] == pytest.approx(report["tuned"]["ndcg@10"] - report["base"]["ndcg@10"])
    ci = report["verdict"]["interval"]  # the interval's delta is the mean of the per-query deltas: the same figure
    assert ci["delta"] == pytest.approx(report["verdict"]["delta_ndcg@10"]) and ci["low"] <= ci["delta"] <= ci["high"]
    assert ci["better"] + ci["worse"] + ci["unchanged"] == ci["queries"] == len(report["per_query"]["ids"])
    for side in ("base", "tuned"):
        assert set(report[side]) == {"ndcg@10", "recall@1", "recall@5", "recall@10", "recall@100", "mrr@10"}
    manifest = json.loads((out / "onnx" / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "customization_job" and manifest["parity"]["min_cosine"] >= 0.9999
    # the served graph equals the merged PyTorch model on real text
    info = inspect_model(str(out / "model"))
    model = BiEncoder(load_backbone(info)).eval()
    tok = TextTokenizer(out / "onnx", manifest["max_seq_length"])
    texts = ["query: serial terminal emulator", "passage: Moose is an extension of the Perl 5 object system."]
    ids, mask = tok(texts)
    got = ort.InferenceSession(str(out / "onnx" / "model.onnx")).run(None, {"input_ids": ids, "attention_mask": mask})[0]
    with torch.no_grad():
        ref = normalize(model(torch.from_numpy(ids), torch.from_numpy(mask))).numpy()
    assert got.shape == (2, hidden)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    return report, manifest


def changed_weights(base_dir: Path, tuned_dir: Path) -> float:
    base = load_backbone(inspect_model(str(base_dir))).state_dict()
    tuned = load_backbone(inspect_model(str(tuned_dir))).state_dict()
    return max((base[k] - tuned[k]).abs().max().item() for k in base)


def test_full_sft_on_nemotron_layout_with_matryoshka(ray_session, tiny_nemotron, train_file, tmp_path, capsys):
    # micro-batches of 4 under a global batch of 8, one cached (GradCache) loss over each step's 8 queries
    # scored on the sample's 100 BEIR queries: the validation split's 13 queries cannot settle a verdict
    cfg = job(tiny_nemotron, train_file, tmp_path / "full", schedule={"epochs": 1},
              dataset={"evaluation": str(SAMPLE / "eval")},
              loss={"matryoshka_dims": [16, 32, 64], "in_batch_negatives": True, "cached": True})
    report = run_job(cfg)
    # 7 steps of a random tiny model: measured +0.025 (95% CI -0.021 to +0.073, 100 queries), which the point
    # verdict this replaced called improved; the evidence does not settle it
    rep, manifest = assert_artifact(tmp_path / "full", 64, "inconclusive")
    assert rep["verdict"]["interval"]["low"] < 0 < rep["verdict"]["interval"]["high"]
    assert rep["verdict"]["interval"]["queries_to_settle"] > 100 and "would settle" in rep["verdict"]["note"]
    # the report card: every size the model serves x float32 / int8 / binary, for base and tuned, and its chart
    card = rep["card"]
    assert card["sizes"] == [16, 32, 64] and len(card["rows"]) == 9
    assert {(r["dims"], r["precision"]) for r in card["rows"]} == {(d, p) for d in (16, 32, 64) for p in ("float32", "int8", "binary")}
    full = next(r for r in card["rows"] if (r["dims"], r["precision"]) == (64, "float32"))
    assert full["tuned"]["ndcg@10"] == pytest.approx(rep["tuned"]["ndcg@10"], abs=1e-6)  # the same encoding, sliced
    assert full["base"]["ndcg@10"] == pytest.approx(rep["base"]["ndcg@10"], abs=1e-6)
    assert (tmp_path / "full" / "card.png").read_bytes()[:4] == b"\x89PNG"
    assert "report card" in capsys.readouterr().out
    assert manifest["prefixes"] == {"query": "query: ", "passage": "passage: "}
    assert manifest["matryoshka_dims"] == [16, 32, 64]
    assert rep["training"]["steps"] == 7 and rep["training"]["train_examples"] == 51
    assert changed_weights(tiny_nemotron, tmp_path / "full" / "model") > 1e-4
    saved = validate_config(__import__("yaml").safe_load((tmp_path / "full" / "config.yaml").read_text()))
    assert saved.loss.matryoshka_dims == [16, 32, 64] and Path(saved.dataset.training).is_absolute()
    assert saved.loss.cached and saved.batch.micro == 4
    timing = report["timing"]
    assert 0 <= timing["preflight_seconds"] <= timing["first_step_seconds"] < timing["job_seconds"]


@pytest.mark.timeout(1200)
def test_the_readme_minilm_job_on_the_shipped_sample_gives_its_verdict_with_an_interval(ray_session, tmp_path, monkeypatch):
    """The README's job (examples/minilm-debian.yaml: all-MiniLM-L6-v2, the 600-line sample, 1 epoch) on the sample's
    100 BEIR queries: measured 0.9242 -> 0.9413 (+0.017); the margin asserted is 0.010."""
    from train.config import load_config
    from tests.conftest import ROOT

    monkeypatch.chdir(ROOT)  # the example's data paths are relative to the checkout, as in the README
    run_job(load_config(ROOT / "examples" / "minilm-debian.yaml", [f"output.dir={tmp_path / 'demo'}"]))
    report = json.loads((tmp_path / "demo" / "eval.json").read_text())
    assert (report["queries"], report["documents"]) == (100, 600)
    assert report["tuned"]["ndcg@10"] >= report["base"]["ndcg@10"] + 0.010, (report["base"], report["tuned"])
    # the verdict with its interval (paired bootstrap, 10k resamples, seed 0): measured +0.017 (95% CI -0.003 to
    # +0.039, 100 queries), 8 queries better, 4 worse, 88 unchanged. The point verdict called this improved; 100
    # queries do not settle it (about 159 would, at this spread)
    v = report["verdict"]
    ci = v["interval"]
    assert (ci["resamples"], ci["seed"], ci["queries"]) == (10_000, 0, 100)
    assert -0.008 <= ci["low"] < 0 and 0.03 <= ci["high"] <= 0.045, ci
    assert (ci["better"], ci["worse"], ci["unchanged"]) == (8, 4, 88), ci
    assert v["outcome"] == "inconclusive" and 120 <= ci["queries_to_settle"] <= 200, v


def test_a_job_at_learning_rate_0_is_inconclusive_with_an_interval_of_exactly_0(ray_session, tiny_bert, train_file, tmp_path,
                                                                                 capsys):
    """The weights do not move, so each query ranks as it did: every per-query delta is 0, and so is the interval;
    the point verdict this replaced would have called any float noise past its band a result. The job names the
    shipped regression set too: its own figure, with its own interval (also exactly 0), in eval.json and the console."""
    run_job(job(tiny_bert, train_file, tmp_path / "lr0", schedule={"max_steps": 2}, optimizer={"learning_rate": 0.0},
                dataset={"regression": "general"}))
    report = json.loads((tmp_path / "lr0" / "eval.json").read_text())
    check = report["verdict"]["regression"]
    assert (check["dataset"], check["queries"], check["documents"]) == ("general", 200, 1000)
    assert check["outcome"] == "inconclusive" and check["base"] == check["tuned"]
    rci = check["interval"]
    assert (rci["delta"], rci["low"], rci["high"], rci["queries"], rci["unchanged"]) == (0.0, 0.0, 0.0, 200, 200)
    assert len(report["regression"]["per_query"]["ids"]) == 200  # each query's scores kept, as for the evaluation set
    assert "regression set general: nDCG@10" in capsys.readouterr().out
    assert changed_weights(tiny_bert, tmp_path / "lr0" / "model") == 0.0
    v = report["verdict"]
    assert v["outcome"] == "inconclusive" and v["warning"] is None
    ci = v["interval"]
    assert (ci["delta"], ci["low"], ci["high"]) == (0.0, 0.0, 0.0)
    assert ci["unchanged"] == ci["queries"] == report["queries"] and ci["better"] == ci["worse"] == 0
    assert "the two rank every query alike" in v["note"]


class ReportLog(UserCallback):
    """Appends each report Ray Train's controller receives to a file (callbacks run in the controller's process)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def after_report(self, run_context, metrics, checkpoint):
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": metrics[0].get("step"), "checkpoint": checkpoint is not None}) + "\n")


def test_a_fast_loop_logs_every_step_without_waiting_for_ray_train(ray_session, tiny_bert, train_file, tmp_path):
    """Each report waits until Ray Train's controller has collected the previous one, so a loop of short steps that
    reported at every logged step trained at the controller's pace (4.4x slower at 10 steps per log, docs/benchmarks.md
    §2). Metrics alone now reach Ray Train at most every METRICS_REPORT_EVERY_S (the progress line is still printed
    at every logged step: test_job_console_shows_progress_and_not_other_libraries_noise), while every checkpoint and
    the final result do."""
    cfg = job(tiny_bert, train_file, tmp_path / "fast", schedule={"max_steps": 60},
              output={"log_every_steps": 1, "checkpoint_every_steps": 20})
    log = tmp_path / "reports.jsonl"
    result = build_trainer(cfg, callbacks=[ReportLog(log)], quiet=True).fit()
    reports = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in reports if r["checkpoint"]] == [20, 40, 60]  # 60: the final result
    metrics_only = [r["step"] for r in reports if not r["checkpoint"]]
    assert metrics_only and metrics_only[0] == 1, reports  # the first logged step is reported at once
    train_seconds = result.metrics["train_seconds"]
    assert len(metrics_only) <= train_seconds / METRICS_REPORT_EVERY_S + 1, (train_seconds, metrics_only)
    # Ray Train's own helpers, not one process more: no DatasetManager for a run given no Ray Data datasets
    # (train/trainer.py: JobTrainer), in this or any earlier run on this cluster; a driver that outlives its runs
    # (this one) keeps the PlacementGroupCleaner (a `python -m train` driver starts none: tests/test_platform.py)
    from ray._private.state import actors

    started = {a["ActorClassName"] for a in actors().values()}
    assert "TrainController" in started and "DatasetManager" not in started, started
    assert "PlacementGroupCleaner" in started, started


def test_metrics_reports_are_paced_and_the_controller_polls_often(monkeypatch, tiny_bert, train_file, tmp_path):
    assert metrics_report_due(float("-inf"), 0.0) and metrics_report_due(10.0, 10.0 + METRICS_REPORT_EVERY_S)
    assert not metrics_report_due(10.0, 10.0 + METRICS_REPORT_EVERY_S / 2)
    cfg = job(tiny_bert, train_file, tmp_path / "poll", resources={"use_gpu": False})
    (key, value), = TRAIN_POLL_ENV.items()
    monkeypatch.setenv(key, "3")  # a value already set wins
    build_trainer(cfg)
    assert os.environ[key] == "3"
    monkeypatch.delenv(key)
    build_trainer(cfg)
    assert os.environ[key] == value == "0.5"


def read_state(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # still being copied into storage
        return None


def test_killed_worker_resumes_from_last_checkpoint(ray_session, tiny_bert, train_file, tmp_path):
    """A Train worker SIGKILLed after a registered checkpoint: the run resumes from it and ends with the whole
    artifact, the int8 graph included (one run for both claims: each run costs the suite ~30 CPU-seconds)."""
    out = tmp_path / "killed"
    cfg = job(tiny_bert, train_file, out, schedule={"max_steps": 60}, training={"finetuning_type": "all_weights"},
              output={"checkpoint_every_steps": 5, "log_every_steps": 50, "export_int8": True})
    result = {}
    runner = threading.Thread(target=lambda: result.update(report=run_job(cfg)))
    runner.start()
    killed = None
    deadline = time.time() + 300
    while killed is None and runner.is_alive() and time.time() < deadline:
        # kill only once the controller has registered a checkpoint (its snapshot lists it): a checkpoint
        # still on its way from the worker to the controller is lost with the worker, by design
        for snapshot in out.glob("checkpoints/*/checkpoint_manager_snapshot.json"):
            registered = [r for r in (read_state(snapshot) or {}).get("checkpoint_results", [])
                          if r["metrics"].get("total_steps") and r["metrics"]["step"] < r["metrics"]["total_steps"]]
            state = read_state(snapshot.parent / registered[-1]["checkpoint_dir_name"] / "train_state.json") if registered else None
            if state:
                os.kill(state["pid"], signal.SIGKILL)
                killed = state["step"]
        time.sleep(0.05)
    runner.join(timeout=600)
    assert killed is not None, "the job finished before a checkpoint could be observed"
    report = result["report"]
    assert report["training"]["steps"] == 60
    assert report["training"]["resumed_from_step"] is not None and report["training"]["resumed_from_step"] >= killed
    report, manifest = assert_artifact(out, 32, "worse")  # 60 steps at lr 1e-3 on 51 examples overfit
    # full fine-tuning of a BERT encoder, and output.export_int8 (LoRA: the console test below)
    assert report["onnx"]["int8"]["written"] is True and report["onnx"]["int8"]["min_cosine"] >= 0.97, report["onnx"]
    assert manifest["int8"]["file"] == "model.int8.onnx" and (out / "onnx" / "model.int8.onnx").is_file()
    assert "ndcg@10_drop" not in manifest["int8"]  # no dataset.evaluation: the parity gate only
    assert manifest["prefixes"] == {"query": "", "passage": ""}
    assert manifest["source"]["finetuning_type"] == "all_weights"
    assert changed_weights(tiny_bert, out / "model") > 1e-5


def test_bad_data_fails_before_ray_work_and_names_line_and_field(tiny_bert, train_file, tmp_path):
    lines = train_file.read_text().splitlines()
    lines[9] = json.dumps({"query": "q", "pos_doc": "p", "neg_doc": "oops"})
    train_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{train_file}:10: field 'neg_doc' must be a list"):
        run_job(job(tiny_bert, train_file, tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()

    lines[9] = lines[8]  # a duplicated example, and an evaluation set whose qrels name a missing document
    train_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{train_file}:10: the line repeats line 9 exactly"):
        run_job(job(tiny_bert, train_file, tmp_path / "bad"))
    del lines[9]
    train_file.write_text("\n".join(lines) + "\n")
    evaluation = tmp_path / "eval"
    shutil.copytree(SAMPLE / "eval", evaluation)
    with (evaluation / "qrels" / "test.tsv").open("a") as fh:
        fh.write(f"{next(iter(load_beir(SAMPLE / 'eval').qrels))}\tno-such-doc\t1\n")
    with pytest.raises(DataError, match="corpus-id 'no-such-doc' is not in"):
        run_job(job(tiny_bert, train_file, tmp_path / "bad", dataset={"evaluation": str(evaluation)}))
    assert not (tmp_path / "bad").exists()


def test_matryoshka_larger_than_model_refused(tiny_bert, train_file, tmp_path):
    with pytest.raises(ConfigError, match="loss.matryoshka_dims: 64 exceeds the model's embedding size 32"):
        run_job(job(tiny_bert, train_file, tmp_path / "m", loss={"matryoshka_dims": [16, 64]}))


def test_finished_output_is_never_overwritten(tiny_bert, train_file, tmp_path):
    out = tmp_path / "done"
    out.mkdir()
    (out / "eval.json").write_text("{}")
    with pytest.raises(OutputConflict, match="holds a finished job"):
        run_job(job(tiny_bert, train_file, out))
    assert (out / "eval.json").read_text() == "{}"


def test_job_console_shows_progress_and_not_other_libraries_noise(tiny_nemotron, train_file, tmp_path):
    import subprocess
    import sys

    import yaml

    from tests.conftest import ROOT

    # LoRA merged on the nemotron layout (on a BERT encoder: tests/test_platform.py's jobs), run as a person runs a
    # job: `python -m train`, which starts its own Ray
    cfg = job(tiny_nemotron, train_file, tmp_path / "out", schedule={"max_steps": 4},
              training={"finetuning_type": "lora_merged", "lora": {"rank": 4, "alpha": 8}}).model_dump(mode="json")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "train", "--config", str(tmp_path / "job.yaml")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    assert console.count("step 2/4 (50%) | loss") == 1 and console.count("step 4/4 (100%) | loss") == 1
    for noise in ("LOAD REPORT", "TrainingReport(", "onnxscript", "failed in shape inference", "Loading weights",
                  "Fused ", "torchvision", "FutureWarning", "Requesting resources", "Started training worker group",
                  "Checkpoint successfully created", "PreemptionWatcher"):  # the last four: Ray Train's own chatter
        assert noise not in console, f"{noise!r} in the job's console:\n{console[-3000:]}"
    assert "ndcg@10" in console and f"{tmp_path / 'out'}/onnx" in console
    # the artifact is readable by a serving process of another user
    onnx_dir = tmp_path / "out" / "onnx"
    assert onnx_dir.stat().st_mode & 0o777 == 0o755
    assert {f.stat().st_mode & 0o777 for f in onnx_dir.iterdir()} == {0o644}
    # 4 LoRA steps move the ranking by little (+0.003 and -0.005 in past runs; a 0.005 band is too narrow to assert on
    # a random tiny model, so the bound is the claim)
    report, manifest = assert_artifact(tmp_path / "out", 64, "inconclusive", max_move=0.03)
    assert "int8" not in report["onnx"] and not (onnx_dir / "model.int8.onnx").exists()
    assert manifest["prefixes"] == {"query": "query: ", "passage": "passage: "}
    assert manifest["source"]["finetuning_type"] == "lora_merged"
    weights = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert weights["is_causal"] is False and "auto_map" not in weights
    files = {p.name for p in (tmp_path / "out" / "model").iterdir()}
    assert "adapter_config.json" not in files, "the adapter must be merged, not saved beside the weights"
    assert changed_weights(tiny_nemotron, tmp_path / "out" / "model") > 1e-5
