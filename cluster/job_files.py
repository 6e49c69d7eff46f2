"""Customization jobs as Ray jobs: the spec -> a config file and an entrypoint (`python -m train` or
`python -m tune`), GPU requests and memory warnings, and the job's results read back on success."""

from __future__ import annotations

import json
import shlex
import sys
import uuid
from dataclasses import dataclass

import yaml

from cluster.entities import Evaluation, JobProgress
from rayembed import storage
from rayembed.config import ConfigError
from rayembed.progress import read_progress
from rayembed.errors import InvalidRequest


def new_job_id() -> str:
    return f"cust-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class PreparedJob:
    kind: str  # training | sweep
    spec: dict  # validated, resolved (output dir filled in)
    config_path: str
    entrypoint: str
    artifact_dir: str  # where the winning/trained job publishes onnx/, model/, eval.json (in the storage root)
    warnings: list[str]
    gpu_estimate: dict | None


def _invalid(exc: ConfigError, what: str) -> InvalidRequest:
    """Every problem in the message; the first one's key as the error's `param` (`config.resources.cpus_per_worker`)."""
    key = exc.problems[0].split(": ", 1)[0] if exc.problems else ""
    param = f"{what}.{key}" if key and key != "<root>" and " " not in key else what
    return InvalidRequest(f"invalid {what}: " + "; ".join(exc.problems), param)


def prepare(kind: str, spec: dict, job_dir: str, gpu_memory_gib: float | None) -> PreparedJob:
    """Validate the spec as the job itself will, fill in the output folder (`job_dir`: in the storage root, a
    URI or a local folder), write the config file there. A tenant's spec was checked before (cluster.tenancy)."""
    from train.config import validate_config

    spec = json.loads(json.dumps(spec))  # a private copy
    out = storage.join(job_dir, "output")
    if kind == "training":
        spec.setdefault("output", {})
        if not isinstance(spec["output"], dict):
            raise InvalidRequest("config.output must be a mapping", "config")
        spec["output"]["dir"] = out
        spec["output"].pop("storage_path", None)
        try:
            cfg = validate_config(spec)
        except ConfigError as exc:
            raise _invalid(exc, "config") from None
        cfg = cfg.with_absolute_paths()
        job_cfg, artifact_dir, module = cfg, out, "train"
        resolved = cfg.model_dump(mode="json")
    else:
        from tune.config import SweepConfig
        from rayembed.config import validate

        spec["output"] = {"dir": out}
        spec["promote_winner"] = True  # the winner becomes the output model entity
        if isinstance(spec.get("job"), dict):  # trials and the winner get their own folders under out/
            if not isinstance(spec["job"].get("output"), dict):
                spec["job"]["output"] = {}
            spec["job"]["output"]["dir"] = storage.join(out, "job")
        try:
            sweep = validate(SweepConfig, spec)
        except ConfigError as exc:
            raise _invalid(exc, "sweep") from None
        job_cfg, artifact_dir, module = sweep.job.with_absolute_paths(), storage.join(out, "winner"), "tune"
        resolved = sweep.model_copy(update={"job": job_cfg}).model_dump(mode="json")
    warnings, estimate = check_gpu_memory(job_cfg, gpu_memory_gib)
    config_path = storage.join(job_dir, "job.yaml" if kind == "training" else "sweep.yaml")
    storage.write_text(config_path, yaml.safe_dump(resolved, sort_keys=False))
    entrypoint = f"{shlex.quote(sys.executable)} -m {module} --config {shlex.quote(config_path)}"
    return PreparedJob(kind, resolved, config_path, entrypoint, artifact_dir, warnings, estimate)


def check_gpu_memory(cfg, gpu_memory_gib: float | None) -> tuple[list[str], dict | None]:
    """Estimate the job's GPU memory; warn when the cluster's GPUs are smaller (None: no GPU, no check)."""
    if gpu_memory_gib is None:
        return [], None
    from train.memory import estimate_gpu_memory

    estimate = estimate_gpu_memory(cfg)
    if estimate and estimate["total_gib"] > gpu_memory_gib:
        return [f"the job needs about {estimate['total_gib']} GiB of GPU memory "
                f"({cfg.training.finetuning_type}, micro batch {cfg.batch.micro}, sequence {cfg.training.max_seq_length}) "
                f"but the GPU has {gpu_memory_gib:.0f} GiB: lower batch.micro_batch_size, turn on "
                "training.gradient_checkpointing, or use finetuning_type: lora_merged"], estimate
    return [], estimate


def progress_uri(output_dir: str) -> str:
    """Where a job (and each trial of a sweep) writes its progress record: beside its output folder."""
    return storage.join(storage.parent(output_dir), "progress.json")


def read_job_progress(output_dir: str) -> JobProgress | None:
    p = read_progress(progress_uri(output_dir))
    return None if p is None else _progress(p)


def _progress(p: dict) -> JobProgress:
    total = p.get("total_steps") or None
    return JobProgress(step=p["step"], total_steps=total, loss=p.get("loss"), examples_per_s=p.get("examples_per_s"),
                       eta_seconds=p.get("eta_seconds"), percent=round(100.0 * p["step"] / total, 1) if total else 0.0)


def last_lines(log: str, n: int = 30) -> str:
    return "\n".join(log.rstrip().splitlines()[-n:])


def failure(log: str | None, message: str | None) -> str:
    """A failed Ray job's error: its log's last lines, and Ray's own message when the log lacks it (a driver on another
    node: its log may not have reached the dashboard yet when the job's status says FAILED)."""
    tail, message = last_lines(log or ""), (message or "").strip()
    if message and message not in tail:
        return f"{tail}\n{message}".strip()
    return tail or message


def read_results(kind: str, artifact_dir: str, output_dir: str) -> tuple[dict, Evaluation | None]:
    """-> (the job's result for the API, the evaluation of the output model), read from storage."""
    report = json.loads(storage.read_text(storage.join(artifact_dir, "eval.json")))
    result: dict = {"eval": report, "artifact_dir": artifact_dir}
    if kind == "sweep":
        trials = storage.join(output_dir, "results.json")
        if storage.is_file(trials):
            result["trials"] = json.loads(storage.read_text(trials))
    return result, Evaluation.from_report(report)
