"""Training-step throughput of the full-size nemotron architecture (random weights): tokens/s and MFU.

    python -m bench.gpu_train                       # full size, bf16 autocast, seq 512, on the GPU
    python -m bench.gpu_train --size tiny --steps 2 # a CPU smoke run (the tests do this)

One step = the job's own step: bi-encoder forward on queries and documents, the contrastive loss,
backward, AdamW. Model FLOPs per token = 6 * non-embedding params + 12 * layers * hidden * seq
(bidirectional attention, forward + backward); MFU = achieved / the device's dense bf16 peak.
Also prints forward-only (inference) tokens/s.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from train.evaluate import autocast
from train.losses import contrastive_loss
from train.model import BiEncoder
from train.pooling import normalize

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}
SIZES = {
    "full": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072),
    "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=16384),
}


def build(size: str) -> BiEncoder:
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(**SIZES[size], rope_theta=500000.0, tie_word_embeddings=True, is_causal=False,
                      rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    return BiEncoder(LlamaModel(cfg))


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--batch", type=int, default=16, help="queries per step (each with 1 positive + negatives)")
    p.add_argument("--negatives", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gradient-checkpointing", action="store_true")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build(args.size).to(device)
    if args.gradient_checkpointing:
        model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = sum(p.numel() for p in model.parameters())
    non_embed = params - model.backbone.embed_tokens.weight.numel()
    cfg = model.backbone.config
    opt = torch.optim.AdamW(model.parameters(), lr=5e-6, weight_decay=0.01)
    B, N, S, V = args.batch, args.negatives, args.seq, cfg.vocab_size
    seqs = B * (2 + N)  # queries + positives + negatives
    tokens = seqs * S
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, V, (seqs, S), generator=gen).to(device)
    mask = torch.ones_like(ids)

    def step():
        with autocast(device, "bf16-mixed"):
            emb = model(ids, mask).float()  # [B*(2+N), H]
        q, d = emb[:B], emb[B:].reshape(B, 1 + N, -1)
        loss = contrastive_loss(normalize(q), normalize(d[:, 0]), normalize(d[:, 1:]), 0.02)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    step_s = (time.perf_counter() - t) / args.steps
    flops_per_token = 6 * non_embed + 12 * cfg.num_hidden_layers * cfg.hidden_size * S
    achieved = flops_per_token * tokens / step_s / 1e12
    peak = peak_tflops(device)

    model.eval()
    with torch.no_grad():
        for _ in range(args.warmup):
            with autocast(device, "bf16-mixed"):
                model(ids, mask)
        sync(device)
        t = time.perf_counter()
        for _ in range(args.steps):
            with autocast(device, "bf16-mixed"):
                model(ids, mask)
        sync(device)
        fwd_s = (time.perf_counter() - t) / args.steps
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "size": args.size,
              "params": params, "seq": S, "sequences_per_step": seqs, "step_seconds": step_s,
              "train_tokens_per_s": tokens / step_s, "model_tflops": achieved,
              "mfu": achieved / peak if peak else None, "forward_tokens_per_s": tokens / fwd_s,
              "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
