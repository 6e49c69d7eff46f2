"""`build_trainer(cfg)`: the one TorchTrainer that training and every Tune trial use."""

from __future__ import annotations

import os

import ray
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from train.config import JobConfig
from train.loop import train_loop_per_worker


# Ray Train's controller collects a worker's report when it polls the worker, every 2 s by default, and the worker's
# next report waits until the last one is collected. Polled every 0.5 s instead, a checkpoint or a final result
# waits at most that long (docs/benchmarks.md §2). Read by the controller from the environment of the process that
# calls `fit()` (a job's driver, a Tune trial); a value already set wins.
TRAIN_POLL_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


class JobTrainer(TorchTrainer):
    """Ray Train 2.60 starts, with every run, processes our runs do not need:
    - a DatasetManager actor (~2.5 s of CPU to start) to hand out Ray Data shards: our loop reads its own files and
      passes no `datasets`, so none is started;
    - a detached PlacementGroupCleaner actor (~3 s of CPU) that frees the run's placement group if the controller
      dies while the driver lives on. A driver that exits with its run (`python -m train`: the job's driver, under
      `ray job submit` or the control plane) needs none: Ray frees a job's placement groups when the job ends, and
      the job ends with it. Long-lived drivers (Tune trials, notebooks, the tests' own) keep it."""

    def __init__(self, *args, placement_group_cleaner: bool = True, **kwargs):
        self._placement_group_cleaner = placement_group_cleaner
        super().__init__(*args, **kwargs)

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        try:
            from ray.train.v2._internal.callbacks import DatasetsCallback
            from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
        except ImportError:  # another Ray: keep its defaults
            return callbacks
        unneeded = ((() if self.datasets else (DatasetsCallback,))
                    + (() if self._placement_group_cleaner else (PlacementGroupCleanerCallback,)))
        return [c for c in callbacks if not isinstance(c, unneeded)]


def cluster_has_gpu() -> bool:
    return ray.cluster_resources().get("GPU", 0) >= 1


def build_trainer(cfg: JobConfig, callbacks: list | None = None, quiet: bool = False,
                  placement_group_cleaner: bool = True) -> JobTrainer:
    """`quiet`: Ray Train's own console lines (worker group start, every checkpoint) only when they warn.
    `placement_group_cleaner`: False only for a driver that exits with the run (JobTrainer)."""
    use_gpu = cluster_has_gpu() if cfg.resources.use_gpu == "auto" else cfg.resources.use_gpu
    for key, value in TRAIN_POLL_ENV.items():
        os.environ.setdefault(key, value)
    # a pinned GPU model (the control plane passes RAYEMBED_ACCELERATOR_TYPE on): the worker, not the driver, asks
    accelerator = os.environ.get("RAYEMBED_ACCELERATOR_TYPE") if use_gpu else None
    return JobTrainer(
        train_loop_per_worker,
        placement_group_cleaner=placement_group_cleaner,
        train_loop_config=cfg.model_dump(mode="json"),
        # one worker and no collectives: gloo sets the process group up on any node, so a GPU node whose CUDA is
        # broken reaches the loop's own device check (a clear message) instead of failing inside NCCL's setup
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu, accelerator_type=accelerator or None,
                                     resources_per_worker={"CPU": cfg.resources.cpus_per_worker, **({"GPU": 1} if use_gpu else {}),
                                                           **cfg.resources.worker_resources}),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=cfg.storage_path,
            failure_config=FailureConfig(max_failures=cfg.resources.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.output.keep_checkpoints),
            callbacks=callbacks,
            logging_config=LoggingConfig(log_level="WARNING" if quiet else "INFO"),
        ),
    )
