"""Connecting to Ray: the one function in rayembed that calls `ray.init`."""

from __future__ import annotations

import os

import ray


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), else start a local one.

    A local Ray gets the dashboard on 127.0.0.1 so training progress is visible.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)
