"""A customization job end to end, as the driver runs it.

Pre-flight (config, model, every data line, eval folder) before any Ray work -> Ray Train fit ->
merged model -> ONNX export with parity gate -> eval.json / eval.png / config.yaml.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rayembed import storage
from train.config import ConfigError, JobConfig, dump_config
from train.data import DataError, ExampleReader, load_beir, prepare_splits, warn_on_size
from train.model import ModelError, ModelInfo, inspect_model, resolve_prefixes
from train.staging import job_scratch, stage_inputs

log = logging.getLogger(__name__)


class OutputConflict(RuntimeError):
    """output.dir holds another job's results; nothing was touched."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "fix your config, data, model or output dir": printed without a traceback (exit 2)."""
    from batch.corpus import CorpusError  # mining's: a corpus, a field or a filter that keeps nothing

    return ConfigError, DataError, ModelError, OutputConflict, CorpusError


@dataclass(frozen=True)
class Preflight:
    info: ModelInfo
    prefixes: tuple[str, str]
    n_train: int
    n_val: int
    parity_texts: list[str]
    warnings: list[str]


def preflight(cfg: JobConfig) -> Preflight:
    """Everything that can be checked without Ray: fails fast, naming key, file, line and field. Inputs given as
    storage URIs are staged into this node's scratch first."""
    cfg = stage_inputs(cfg)
    info = inspect_model(cfg.model)
    problems = []
    for dim in cfg.loss.matryoshka_dims or []:
        if dim > info.hidden_size:
            problems.append(f"loss.matryoshka_dims: {dim} exceeds the model's embedding size {info.hidden_size}")
    if cfg.training.max_seq_length > info.max_positions:
        problems.append(f"training.max_seq_length: {cfg.training.max_seq_length} exceeds the model's "
                        f"{info.max_positions} positions")
    if cfg.loss.negatives_per_query == 0 and not cfg.loss.in_batch_negatives:
        problems.append("loss.negatives_per_query: 0 hard negatives needs loss.in_batch_negatives: true")
    if problems:
        raise ConfigError(problems)
    train_idx, val_idx = prepare_splits(cfg.dataset, cfg.loss.negatives_per_query, cfg.training.seed)
    for folder in (cfg.dataset.evaluation, cfg.dataset.regression):
        if folder:
            load_beir(folder)
    warnings = [w for w in [warn_on_size(len(train_idx))] if w]
    prefixes = resolve_prefixes(cfg.prefixes, info)
    reader = ExampleReader(val_idx, 0 if cfg.dataset.mining else cfg.loss.negatives_per_query)
    sample = [reader[i] for i in range(min(16, len(reader)))]
    parity = [prefixes[0] + e.query for e in sample] + [prefixes[1] + e.pos_doc for e in sample]
    return Preflight(info, prefixes, len(train_idx), len(val_idx), parity, warnings)


def claim_output(cfg: JobConfig, dest: str) -> str:
    """Refuse to overwrite a finished job or a different job's checkpoints at `dest` (output.dir: a folder or a
    storage URI); resume a crashed identical one."""
    resolved = dump_config(cfg)
    if storage.is_file(storage.join(dest, "eval.json")):
        raise OutputConflict(f"output.dir {dest} holds a finished job (eval.json); choose a new output.dir or remove it")
    saved = storage.join(dest, "config.yaml")
    if storage.is_file(saved) and storage.read_text(saved) != resolved:
        raise OutputConflict(f"output.dir {dest} holds checkpoints of a job with a different config ({saved}); "
                             "choose a new output.dir, or rerun with the same config to resume it")
    storage.write_text(saved, resolved)
    return resolved


def working_config(cfg: JobConfig) -> tuple[JobConfig, Path]:
    """The config the job runs with and the local folder it writes: a URI output.dir is worked on in this node's
    scratch, its checkpoints kept in storage. Inputs stay as given: each process stages what it reads on its node."""
    if not storage.is_uri(cfg.output.dir):
        out = Path(cfg.output.dir)
        out.mkdir(parents=True, exist_ok=True)
        return cfg, out
    out = job_scratch(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    return cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": str(out), "storage_path": cfg.storage_path})}), out


def publish_outputs(out: Path, dest: str, names: list[str]) -> None:
    """The finished folders (sealed, so readers on any node can verify them) and files at `dest`; eval.json last,
    since it marks the job finished."""
    for name in ("model", "onnx"):
        storage.publish(str(out / name), storage.join(dest, name), log=print)
    if storage.is_uri(dest):
        for name in [n for n in names if n != "eval.json"] + ["eval.json"]:
            if (out / name).is_file():
                storage.write_bytes(storage.join(dest, name), (out / name).read_bytes())


def quantize_for_job(cfg: JobConfig, onnx_dir: Path) -> dict:
    """`output.export_int8`: the int8 graph beside the exported one, judged on the job's evaluation set."""
    from train.quantize import QuantizeError, quantize_artifact

    print("int8: quantizing the exported graph and checking it against the fp32 graph", flush=True)
    try:
        report = quantize_artifact(onnx_dir, eval_dir=cfg.dataset.evaluation, threads=cfg.resources.torch_threads or min(os.cpu_count() or 1, 8))
    except QuantizeError as exc:
        log.warning("%s", exc)
        return {"written": False, "reason": str(exc)}
    drop = report.get("ndcg@10_drop")
    print(f"int8: wrote {onnx_dir / report['file']} (min cosine {report['min_cosine']:.4f}"
          + (f", nDCG@10 drop {drop:+.4f})" if drop is not None else "; no dataset.evaluation, so no nDCG gate)"),
          flush=True)
    return {"written": True, **report}


def run_job(cfg: JobConfig, verbose: bool = True, exits_with_job: bool = False) -> dict:
    """The whole job: preflight, (mining,) Ray Train, the merged model, ONNX export, the report. `exits_with_job`: this
    process ends when the job does (`python -m train`), so Ray frees the run's resources with it (train/trainer.py)."""
    from rayembed.runtime import ensure_ray
    from train.export import export_onnx
    from train.report import summary, write_report
    from train.trainer import build_trainer

    job_start = time.time()
    cfg = cfg.with_absolute_paths()
    dest = cfg.output.dir
    pre = preflight(cfg)
    resolved = claim_output(cfg, dest)
    cfg, out = working_config(cfg)
    (out / "config.yaml").write_text(resolved)  # beside the export too (the output.dir's own copy is written)
    log.info("model %s (%s, %d-d); %d training / %d validation examples", pre.info.path, pre.info.family,
             pre.info.hidden_size, pre.n_train, pre.n_val)
    preflight_done = time.time()
    ensure_ray()
    ray_ready = time.time()
    mining = None
    if cfg.dataset.mining:
        from batch.mine import summary as mining_summary
        from train.mining import mine_for_job

        mined_cfg, mining = mine_for_job(stage_inputs(cfg), pre.info.path, pre.prefixes, pre.parity_texts)
        print(mining_summary(mining), flush=True)
        (out / "mining.json").write_text(json.dumps(mining, indent=1, ensure_ascii=False))
        training = mined_cfg.dataset.training
        if storage.is_uri(dest):  # the Train worker may run on another node: it reads the mined file from storage
            training = storage.join(dest, "mined.jsonl")
            storage.write_bytes(training, Path(mined_cfg.dataset.training).read_bytes())
        cfg = cfg.model_copy(update={"dataset": cfg.dataset.model_copy(update={"training": training, "mining": None})})
        pre = preflight(cfg)  # the mined file: every line again, now with its negatives
    mined = time.time()
    result = build_trainer(cfg, quiet=not verbose, placement_group_cleaner=not exits_with_job).fit()
    final = result.metrics
    model_dir = out / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    with result.checkpoint.as_directory() as ckpt:
        shutil.copytree(Path(ckpt) / "model", model_dir)
    train_done = time.time()
    manifest = export_onnx(model_dir, out / "onnx", max_seq_length=cfg.training.max_seq_length,
                           prefixes=pre.prefixes, matryoshka_dims=cfg.loss.matryoshka_dims,
                           parity_texts=pre.parity_texts, opset=cfg.output.onnx_opset, fp16=cfg.output.export_fp16,
                           source={"kind": "customization_job", "job": cfg.name, "base_model": cfg.model,
                                   "finetuning_type": cfg.training.finetuning_type,
                                   "learning_rate": cfg.optimizer.learning_rate})
    int8 = quantize_for_job(cfg, out / "onnx") if cfg.output.export_int8 else None
    shutil.copy2(out / "config.yaml", out / "onnx" / "config.yaml")
    timing = {"job_seconds": round(time.time() - job_start, 1), "export_seconds": round(time.time() - train_done, 1),
              "first_step_seconds": round(final["first_step_at"] - job_start, 1),
              "preflight_seconds": round(preflight_done - job_start, 1), "ray_init_seconds": round(ray_ready - preflight_done, 1),
              "mining_seconds": round(mined - ray_ready, 1),
              "worker_setup_seconds": round(final["worker_setup_seconds"], 1)}
    extra = {"mining": {k: v for k, v in mining.items() if not k.startswith("examples")}} if mining else {}
    report = write_report(out, final, {**extra, "timing": timing, "warnings": pre.warnings,
                                       "onnx": {"path": storage.join(dest, "onnx"), "parity_min_cosine": manifest.parity.min_cosine,
                                                **({"int8": int8} if int8 else {})}})
    shutil.copy2(out / "eval.json", out / "onnx" / "eval.json")
    publish_outputs(out, dest, ["mining.json", "eval.png", "eval.json"])
    print(summary(report))
    print(f"timing: {json.dumps(timing)}")
    print(f"artifacts: {dest}/model (merged HF), {dest}/onnx (ONNX + manifest), {dest}/eval.json, {dest}/eval.png")
    return report
