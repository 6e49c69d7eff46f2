"""The learning-rate sweep: Ray Tune trials, each the very same `build_trainer(cfg)` as a training job.

Grid around the conservative default, extended one step past an end that wins; trials scored by
validation nDCG@10; a failed trial is reported and the sweep goes on.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import ray
from ray import tune

from rayembed import storage
from train.config import JobConfig, dump_config
from tune.config import SweepConfig, trial_job

METRIC = "val_ndcg@10"


@dataclass
class Trial:
    lr: float
    status: str  # "ok" | "failed"
    ndcg: float | None = None
    recall: float | None = None
    loss: float | None = None
    val_loss: float | None = None
    seconds: float | None = None
    error: str | None = None
    extension: bool = False


def error_text(err: BaseException) -> str:
    """The innermost cause of a trial's failure, on one line (Ray wraps it in task and Tune errors)."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        inner = getattr(err, "cause", None) or err.__cause__
        if not isinstance(inner, BaseException):
            break
        err = inner
    return f"{type(err).__name__}: " + " ".join(str(err).split())[:400]


def run_trial(config: dict, sweep: dict) -> None:
    """A Tune function trainable: build and fit the job's TorchTrainer at this learning rate."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from train.trainer import build_trainer

    cfg = trial_job(SweepConfig.model_validate(sweep), config["learning_rate"])
    build_trainer(cfg, callbacks=[TuneReportCallback()]).fit()


def max_concurrent_trials(job: JobConfig) -> int:
    """Trials that fit the cluster at once: one per GPU, else per `threads` CPUs (never oversubscribe)."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if job.resources.use_gpu is True or (job.resources.use_gpu == "auto" and gpus):
        return max(1, gpus)
    threads = job.resources.torch_threads or os.cpu_count() or 1
    per_trial = max(job.resources.cpus_per_worker, threads)
    return max(1, int(resources.get("CPU", 1) // per_trial))


def run_points(sweep: SweepConfig, space, num_samples: int, label: str) -> list[Trial]:
    tune_storage = storage.join(sweep.output.dir, "tune")
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(run_trial, sweep=sweep.model_dump(mode="json")),
                            {"CPU": 0.1}),  # the trial only drives its Train run; the worker holds the CPUs,
        param_space={"learning_rate": space},
        tune_config=tune.TuneConfig(num_samples=num_samples, max_concurrent_trials=max_concurrent_trials(sweep.job)),
        run_config=tune.RunConfig(name=f"{sweep.job.name}-{label}", storage_path=tune_storage, verbose=0),
    )
    trials = []
    for result in tuner.fit():
        lr = result.config["learning_rate"]
        m = result.metrics or {}
        if result.error is not None or METRIC not in m:
            error = error_text(result.error) if result.error else "no validation metric reported"
            trials.append(Trial(lr, "failed", error=error))
            continue
        ndcg = m[METRIC]
        trials.append(Trial(lr, "ok", ndcg=ndcg if math.isfinite(ndcg) else None, recall=m.get("val_recall@10"),
                            loss=m.get("loss"), val_loss=m.get("val_loss"), seconds=m.get("time_total_s")))
    return trials


def best(trials: list[Trial]) -> Trial | None:
    scored = [t for t in trials if t.status == "ok" and t.ndcg is not None]
    return max(scored, key=lambda t: (t.ndcg, -t.lr)) if scored else None


def next_extension(trials: list[Trial], search) -> float | None:
    """One step past the end of the successful range that holds the winner, within the bounds; else None.

    Never steps onto or past a learning rate whose trial failed.
    """
    winner = best(trials)
    tried = sorted({t.lr for t in trials if t.status == "ok" and t.ndcg is not None})
    if winner is None or len(tried) < 2 or winner.lr not in (tried[0], tried[-1]):
        return None
    up = winner.lr == tried[-1]
    lr = winner.lr * search.extension_factor if up else winner.lr / search.extension_factor
    if not search.min_learning_rate <= lr <= search.max_learning_rate:
        return None
    failed = [t.lr for t in trials if t.status != "ok" or t.ndcg is None]
    if any((winner.lr < f <= lr) if up else (lr <= f < winner.lr) for f in failed):
        return None
    return lr


def run_sweep(sweep: SweepConfig) -> dict:
    from rayembed.runtime import ensure_ray
    from train.job import OutputConflict, preflight, run_job
    from train.staging import job_scratch, stage_inputs

    start = time.time()
    dest = sweep.output.dir if storage.is_uri(sweep.output.dir) else str(Path(sweep.output.dir).absolute())
    sweep = sweep.model_copy(update={"job": sweep.job.with_absolute_paths(),
                                     "output": sweep.output.model_copy(update={"dir": dest})})
    preflight(sweep.job)  # config, model and every data line once, before any trial starts
    if storage.is_file(storage.join(dest, "results.json")):
        raise OutputConflict(f"output.dir {dest} holds a finished sweep (results.json); choose a new one")
    local = job_scratch(dest) if storage.is_uri(dest) else Path(dest)  # the table and plot, then published
    local.mkdir(parents=True, exist_ok=True)
    ensure_ray()
    given_dataset = sweep.job.dataset
    if sweep.job.dataset.mining:  # mined once, before the trials; every trial trains on the same file
        from batch.mine import summary as mining_summary
        from train.mining import mine_for_job

        pre = preflight(sweep.job)
        mined_job, mining = mine_for_job(stage_inputs(sweep.job), pre.info.path, pre.prefixes, pre.parity_texts)
        print(mining_summary(mining), flush=True)
        training = mined_job.dataset.training
        if storage.is_uri(dest):  # trials may run on other nodes: they read the mined file from storage
            training = storage.join(dest, "mined.jsonl")
            storage.write_bytes(training, Path(mined_job.dataset.training).read_bytes())
        job = sweep.job  # its other inputs as given: each trial stages what it reads on its own node
        sweep = sweep.model_copy(update={"job": job.model_copy(update={"dataset": job.dataset.model_copy(
            update={"training": training, "mining": None})})})
    s = sweep.search
    if s.mode == "loguniform":
        trials = run_points(sweep, tune.loguniform(s.min_learning_rate, s.max_learning_rate), s.num_samples, "loguniform")
    else:
        trials = run_points(sweep, tune.grid_search(sorted(set(s.learning_rates))), 1, "grid")
        for i in range(s.max_extensions if s.extend else 0):
            lr = next_extension(trials, s)
            if lr is None:
                break
            extra = run_points(sweep, tune.grid_search([lr]), 1, f"extension{i + 1}")
            for t in extra:
                t.extension = True
            trials += extra
    winner = best(trials)
    summary = {"metric": METRIC, "trials": [asdict(t) for t in sorted(trials, key=lambda t: t.lr)],
               "best": asdict(winner) if winner else None, "seconds": round(time.time() - start, 1)}
    if winner:
        best_job = trial_job(sweep, winner.lr).model_copy(update={"output": sweep.job.output.model_copy(
            update={"dir": storage.join(dest, "winner")}), "dataset": given_dataset, "name": f"{sweep.job.name}-best"})
        (local / "best_job.yaml").write_text(dump_config(best_job))
    publish_outputs(local, dest, summary)  # before promotion: a failing winner job keeps the table
    if winner and sweep.promote_winner:
        summary["winner_report"] = run_job(best_job)
        publish_outputs(local, dest, summary)
    return summary


def publish_outputs(local: Path, dest: str, summary: dict) -> None:
    """The table, plot and best config written locally, and copied to a storage URI output.dir."""
    from tune.report import write_outputs

    write_outputs(local, summary)
    if storage.is_uri(dest):
        for name in ("best_job.yaml", "results.md", "sweep.png", "results.json"):
            if (local / name).is_file():
                storage.write_bytes(storage.join(dest, name), (local / name).read_bytes())
