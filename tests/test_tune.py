"""Learning-rate sweep: the extension rule, an absurd lr that must not win, a failing trial that does not sink it
(one sweep shows both)."""

import json

import pytest
import yaml

from train.config import ConfigError
from train.job import OutputConflict
from tune.config import Search, load_sweep
from tune.sweep import Trial, best, next_extension, run_sweep


def sweep_file(tmp_path, model, train_file, search, **job):
    raw = {"job": {"model": str(model), "name": "sw", "dataset": {"training": str(train_file), "validation_fraction": 0.25},
                   "training": {"max_seq_length": 48}, "schedule": {"max_steps": 4},
                   "batch": {"global_batch_size": 8}, "loss": {"negatives_per_query": 1, "in_batch_negatives": True,
                                                             "temperature": 0.05},
                   "output": {"dir": str(tmp_path / "unused"), "log_every_steps": 2}, **job},
           "search": search, "output": {"dir": str(tmp_path / "sweep")}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_extension_rule():
    s = Search(learning_rates=[5e-6, 1e-5, 2e-5], max_learning_rate=1e-4, min_learning_rate=1e-6)
    top = [Trial(5e-6, "ok", 0.80), Trial(1e-5, "ok", 0.82), Trial(2e-5, "ok", 0.85)]
    assert next_extension(top, s) == pytest.approx(5e-5)
    bottom = [Trial(5e-6, "ok", 0.86), Trial(1e-5, "ok", 0.82), Trial(2e-5, "ok", 0.80)]
    assert next_extension(bottom, s) == pytest.approx(2e-6)
    middle = [Trial(5e-6, "ok", 0.80), Trial(1e-5, "ok", 0.90), Trial(2e-5, "ok", 0.80)]
    assert next_extension(middle, s) is None
    capped = Search(learning_rates=[5e-6, 2e-5], max_learning_rate=3e-5)
    assert next_extension([Trial(5e-6, "ok", 0.1), Trial(2e-5, "ok", 0.9)], capped) is None
    diverged = [Trial(5e-6, "ok", 0.1), Trial(2e-5, "ok", 0.9), Trial(4e-5, "failed", error="nan")]
    assert next_extension(diverged, s) is None  # never step past a learning rate that failed


def test_best_ignores_failed_and_non_finite_trials():
    trials = [Trial(1e-5, "ok", 0.7), Trial(2e-5, "failed", error="boom"), Trial(5e-5, "ok", None)]
    assert best(trials).lr == 1e-5
    assert best([Trial(1e-5, "failed")]) is None


def test_sweep_config_errors_name_keys(tmp_path, tiny_bert, train_file):
    path = sweep_file(tmp_path, tiny_bert, train_file, {"learning_rates": [-1.0], "typo": 1})
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    assert "search.typo: unknown key" in str(err.value) and "search.learning_rates.0: Input should be greater than 0" in str(err.value)


def test_absurd_learning_rate_does_not_win_a_failing_trial_does_not_sink_the_sweep(ray_session, train_file, tmp_path):
    """One sweep of the packaged MiniLM: lr 0.5 runs and wrecks the model; 5.0 passes the sweep's check (> 0) but the
    job refuses it inside the trial (a real trial failure); the winner, at the bottom end, gets one extension below."""
    path = sweep_file(tmp_path, "all-MiniLM-L6-v2", train_file, {"learning_rates": [3e-5, 0.5, 5.0], "max_extensions": 1,
                                                                 "max_learning_rate": 1e-2, "min_learning_rate": 1e-6})
    summary = run_sweep(load_sweep(path))
    trials = summary["trials"]
    rows = {t["lr"]: t for t in trials}
    failed = [t for t in trials if t["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["lr"] == 5.0 and "learning_rate" in failed[0]["error"]
    assert rows[3e-5]["status"] == rows[0.5]["status"] == "ok"
    assert rows[0.5]["ndcg"] < rows[3e-5]["ndcg"] - 0.5  # 0.06 against 0.85: lr 0.5 wrecks the model, and still runs
    ext = [t for t in trials if t["extension"]]  # one step past the winning end (3e-5 / 2.5), never towards 5.0
    assert len(ext) == 1 and ext[0]["status"] == "ok" and ext[0]["lr"] == pytest.approx(3e-5 / 2.5)
    assert summary["best"]["lr"] in (3e-5, ext[0]["lr"]) and summary["best"]["ndcg"] > 0.8  # a sane lr, not 0.5
    winner = yaml.safe_load((tmp_path / "sweep" / "best_job.yaml").read_text())
    assert winner["optimizer"]["learning_rate"] == pytest.approx(summary["best"]["lr"])
    out = tmp_path / "sweep"
    assert {"results.json", "results.md", "sweep.png", "best_job.yaml"} <= {p.name for p in out.iterdir()}
    table = (out / "results.md").read_text()
    assert f"| {summary['best']['lr']:.3g} (best) | ok |" in table and "| 5 | failed: ConfigError" in table
    assert json.loads((out / "results.json").read_text())["best"]["lr"] == summary["best"]["lr"]
    best_job = yaml.safe_load((out / "best_job.yaml").read_text())
    assert best_job["optimizer"]["learning_rate"] == summary["best"]["lr"]
    with pytest.raises(OutputConflict, match="holds a finished sweep"):  # a rerun must not reuse old trials
        run_sweep(load_sweep(path))
