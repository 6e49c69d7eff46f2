"""`train_loop_per_worker`: the Ray Train worker's whole job, read top to bottom in sections.

setup -> resume -> optimise (report metrics, checkpoint) -> validate -> merge -> evaluate base vs tuned
-> final checkpoint holding the merged model (the driver exports it).
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
from safetensors.torch import load_file, save_file

from rayembed.regression import name_of as regression_name
from train.config import JobConfig, validate_config
from train.data import ExampleReader, prepare_splits, retrieval_set_from_examples
from train.evaluate import card_sizes, embed_set, paired_evaluation, paired_scores, per_query_scores
from train.metrics import mean_metrics
from train.step import compile_encoder, make_optimizer, micro_batch_loss, tokenize, train_step, uncompile_encoder
from train.model import build_bi_encoder, inspect_model, merge_lora, quiet_libraries, resolve_prefixes, save_hf_directory
from train.staging import stage_inputs
from rayembed.artifact import TextTokenizer
from rayembed.history import MetricsHistory
from rayembed.progress import ProgressWriter, progress_line, progress_record

STATE_FILE = "train_state.json"
EVAL_NEGATIVES = 64  # every stored negative joins the validation corpus
# Metrics alone go to Ray Train at most this often: each report waits until the controller has collected the last
# one (it polls every 0.5 s, train/trainer.py), so reporting every few fast steps held a loop of 40 ms steps to one
# report per poll (docs/benchmarks.md §2). The progress line is printed at every `log_every_steps` regardless;
# checkpoints and the final result are always reported.
METRICS_REPORT_EVERY_S = 5.0


def plan_steps(cfg: JobConfig, n_train: int) -> tuple[int, int]:
    """-> (steps_per_epoch, total_steps)."""
    per_epoch = math.ceil(n_train / cfg.batch.global_batch_size)
    total = cfg.schedule.max_steps or per_epoch * (cfg.schedule.epochs or 1)
    return per_epoch, total


def linear_schedule(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def batch_rows(step: int, per_epoch: int, n: int, size: int, seed: int) -> np.ndarray:
    """Rows of the training index for a step: a seeded permutation per epoch, so a resume continues exactly."""
    epoch, pos = divmod(step, per_epoch)
    order = np.random.default_rng(seed + epoch).permutation(n)
    return order[pos * size: (pos + 1) * size]


def save_state(directory: Path, model, optimizer, scheduler, step: int, extra: dict) -> None:
    trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(directory / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    state = {"step": step, "scheduler": scheduler.state_dict(), "pid": os.getpid(), "host": socket.gethostname(), **extra}
    (directory / STATE_FILE).write_text(json.dumps(state))


def metrics_report_due(last_report_s: float, now_s: float) -> bool:
    """Whether a report without a checkpoint goes to Ray Train now (times from time.monotonic())."""
    return now_s - last_report_s >= METRICS_REPORT_EVERY_S


def restore_state(checkpoint, model, optimizer, scheduler, device) -> dict:
    with checkpoint.as_directory() as d:
        d = Path(d)
        state = json.loads((d / STATE_FILE).read_text())
        if state.get("final"):
            return state
        weights = load_file(str(d / "trainable.safetensors"), device=str(device))
        missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in weights]
        if missing:
            raise RuntimeError(f"checkpoint does not match the model: {len(missing)} trainable tensors missing, e.g. {missing[0]}")
        model.load_state_dict(weights, strict=False)
        optimizer.load_state_dict(torch.load(d / "optimizer.pt", map_location=device, weights_only=True))
        scheduler.load_state_dict(state["scheduler"])
    return state


def _report(metrics: dict, directory: Path | None = None) -> None:
    checkpoint = ray.train.Checkpoint.from_directory(str(directory)) if directory else None
    ray.train.report(metrics, checkpoint=checkpoint)


def check_cuda(gpu_ids: list) -> None:
    """A worker Ray gave a GPU must be able to use it: say so at once rather than train on the CPU or hang."""
    if gpu_ids and not torch.cuda.is_available():
        raise RuntimeError(f"this training worker holds Ray GPU {gpu_ids} but no CUDA device is usable here "
                           f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}, CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}): install a CUDA build of torch on the GPU "
                           "nodes and check the driver with nvidia-smi, or run on the CPU with resources.use_gpu: false")


def train_loop_per_worker(config: dict) -> None:
    # ---- setup: re-validate the config (Tune may have injected values), model, data ----
    worker_start = time.time()
    quiet_libraries()
    given = validate_config(config)
    cfg = stage_inputs(given)  # this worker's node may share no disk with the driver's
    check_cuda(ray.get_gpu_ids())
    device = ray.train.torch.get_device()
    if device.type != "cuda":
        torch.set_num_threads(cfg.resources.torch_threads or len(os.sched_getaffinity(0)))
    torch.manual_seed(cfg.training.seed)
    info = inspect_model(cfg.model)
    prefixes = resolve_prefixes(cfg.prefixes, info)
    dims = cfg.loss.matryoshka_dims or [info.hidden_size]
    tokenizer = TextTokenizer(info.path, cfg.training.max_seq_length)
    train_idx, val_idx = prepare_splits(cfg.dataset, cfg.loss.negatives_per_query, cfg.training.seed)
    reader = ExampleReader(train_idx, cfg.loss.negatives_per_query)
    model = build_bi_encoder(info, cfg.training.finetuning_type, cfg.training.lora_settings,
                             cfg.training.gradient_checkpointing).to(device)
    model.train()

    optimizer = make_optimizer(model, cfg, device)
    per_epoch, total = plan_steps(cfg, len(train_idx))
    warmup = cfg.optimizer.warmup_steps if cfg.optimizer.warmup_steps is not None else int(0.1 * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(warmup, total))

    # ---- resume from the last checkpoint after a worker failure ----
    start_step, resumed_from = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        state = restore_state(checkpoint, model, optimizer, scheduler, device)
        if state.get("final"):  # it had finished: the restored final checkpoint is the run's result
            _report({**state["metrics"], "resumed_from_step": state["step"]})
            return
        start_step = resumed_from = state["step"]

    # ---- optimise ----
    G, micro, n_neg = cfg.batch.global_batch_size, cfg.batch.micro, cfg.loss.negatives_per_query
    compiled = compile_encoder(model, cfg, device)
    compile_seconds = None
    window_start, window_examples, window_tokens = time.perf_counter(), 0, 0
    loss_value, train_start = float("nan"), time.time()
    last_report = -math.inf  # time.monotonic() of the last report to Ray Train
    progress = ProgressWriter()
    history = MetricsHistory.for_run(given.output.dir, resumed_from)  # the job's metrics route plots it
    for step in range(start_step, total):
        rows = batch_rows(step, per_epoch, len(train_idx), G, cfg.training.seed)
        batches = [tokenize(tokenizer, [reader[int(i)] for i in chunk], prefixes, n_neg)
                   for chunk in np.array_split(rows, math.ceil(len(rows) / micro))]
        loss = train_step(model, optimizer, scheduler, batches, cfg, device, dims)
        window_examples += len(rows)
        window_tokens += sum(b.tokens for b in batches)
        done = step + 1
        if compiled and compile_seconds is None:  # the first step compiles: timed apart, not in examples/s
            loss.item()
            compile_seconds = time.perf_counter() - window_start
            window_start, window_examples, window_tokens = time.perf_counter(), 0, 0
        if done % cfg.output.log_every_steps == 0 or done == total or done % cfg.output.checkpoint_every_steps == 0:
            loss_value = loss.item()  # the only host sync of the loop, once per log
            elapsed = max(time.perf_counter() - window_start, 1e-9)
            metrics = {"step": done, "total_steps": total, "epoch": step / per_epoch, "loss": loss_value,
                       "lr": scheduler.get_last_lr()[0], "examples_per_s": window_examples / elapsed,
                       "tokens_per_s": window_tokens / elapsed, "first_step_at": train_start,
                       "resumed_from_step": resumed_from, "compile_seconds": compile_seconds}
            # one line in the job's log: the control plane follows the job through it
            # written, not print()ed: Ray Train patches print to tee into its logger, which shows each line twice
            sys.stdout.write(progress_line(done, total, loss_value, metrics["examples_per_s"], G) + "\n")
            sys.stdout.flush()
            progress(progress_record(done, total, loss_value, metrics["examples_per_s"], G))  # the control plane's copy
            history.record(done, total, loss_value, metrics["lr"], metrics["examples_per_s"])
            if done % cfg.output.checkpoint_every_steps == 0 and done < total:
                with tempfile.TemporaryDirectory() as tmp:
                    save_state(Path(tmp), model, optimizer, scheduler, done, {"resumed_from_step": resumed_from})
                    _report(metrics, Path(tmp))
                last_report = time.monotonic()
            elif metrics_report_due(last_report, time.monotonic()):
                _report(metrics)
                last_report = time.monotonic()
            window_start, window_examples, window_tokens = time.perf_counter(), 0, 0
    uncompile_encoder(model)

    train_seconds = time.time() - train_start
    trained_examples = sum(len(batch_rows(s, per_epoch, len(train_idx), G, cfg.training.seed)) for s in range(start_step, total))

    # ---- validate, merge, evaluate base vs tuned ----
    val_reader = ExampleReader(val_idx, cfg.loss.negatives_per_query)
    val_loss = validation_loss(model, tokenizer, val_reader, prefixes, cfg, device, dims)
    model = merge_lora(model).eval()
    val_set = retrieval_set_from_examples(ExampleReader(val_idx, EVAL_NEGATIVES))
    val_emb = embed_set(model, tokenizer, val_set, prefixes, device, cfg.precision)
    val_metrics = mean_metrics(per_query_scores(*val_emb, val_set))
    history.validate(total, total, {"val_loss": val_loss, **val_metrics})
    eval_set, eval_name, tuned_emb = val_set, "validation split", val_emb
    if cfg.dataset.evaluation:
        from train.data import load_beir

        eval_set, eval_name = load_beir(cfg.dataset.evaluation), given.dataset.evaluation  # named as given, not staged
        tuned_emb = embed_set(model, tokenizer, eval_set, prefixes, device, cfg.precision)
    regression = None
    if cfg.dataset.regression:
        from train.data import load_beir

        regression = load_beir(cfg.dataset.regression)
        regression_emb = {"tuned": embed_set(model, tokenizer, regression, prefixes, device, cfg.precision)}
    base_model = build_bi_encoder(info, "all_weights").to(device).eval()
    base_emb = embed_set(base_model, tokenizer, eval_set, prefixes, device, cfg.precision)
    if regression is not None:
        regression_emb["base"] = embed_set(base_model, tokenizer, regression, prefixes, device, cfg.precision)
    del base_model

    final = {"step": total, "total_steps": total, "loss": loss_value, "val_loss": val_loss, "compile_seconds": compile_seconds,
             "val_ndcg@10": val_metrics["ndcg@10"], "val_recall@10": val_metrics["recall@10"],
             "first_step_at": train_start, "worker_setup_seconds": train_start - worker_start, "train_seconds": train_seconds,
             "train_examples_per_s": trained_examples / max(train_seconds, 1e-9), "resumed_from_step": resumed_from,
             "eval": {"dataset": eval_name, "queries": len(eval_set.queries), "documents": len(eval_set.corpus),
                      **paired_evaluation(eval_set, {"base": base_emb, "tuned": tuned_emb},
                                          card_sizes(info.hidden_size, info.matryoshka_dims, cfg.loss.matryoshka_dims)),
                      "validation": val_metrics},
             "train_examples": len(train_idx), "validation_examples": len(val_idx), "device": str(device)}
    if regression is not None:  # its own paired scores, no card: the verdict only asks whether it dropped
        final["eval"]["regression"] = {"dataset": regression_name(given.dataset.regression),
                                       "queries": len(regression.queries), "documents": len(regression.corpus),
                                       **paired_scores(regression, regression_emb)}
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_directory(model.backbone, info, Path(tmp) / "model")
        (Path(tmp) / STATE_FILE).write_text(json.dumps({"final": True, "step": total, "metrics": final}))
        _report(final, Path(tmp))


@torch.no_grad()
def validation_loss(model, tokenizer, reader: ExampleReader, prefixes, cfg: JobConfig, device, dims) -> float:
    model.eval()
    size, total, count = cfg.batch.micro, 0.0, 0
    for start in range(0, len(reader), size):
        examples = [reader[i] for i in range(start, min(start + size, len(reader)))]
        mb = tokenize(tokenizer, examples, prefixes, cfg.loss.negatives_per_query).to(device)
        loss = micro_batch_loss(model, mb, cfg, device, dims)
        total, count = total + loss.item() * len(examples), count + len(examples)
    model.train()
    return total / max(1, count)
