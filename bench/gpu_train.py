"""Training-step throughput of the full-size nemotron architecture (random weights): tokens/s and MFU,
and the largest micro batch that fits a memory limit.

    python -m bench.gpu_train                        # full size, bf16 autocast, seq 512, on the GPU
    python -m bench.gpu_train --compile false        # eager, for comparison
    python -m bench.gpu_train --max-batch --limit-gib 80   # largest micro batch: full/LoRA x seq x checkpointing
    python -m bench.gpu_train --size tiny --steps 2  # a CPU smoke run (the tests do this)

One step is the job's own `train.step.train_step` (the function train/loop.py calls): bi-encoder
forward on queries and documents, the contrastive loss, backward, clipping, fused AdamW on CUDA, with
`training.compile` as the job would set it; compile time is reported apart (`compile_seconds`). Model
FLOPs per token = 6 * non-embedding params + 12 * layers * hidden * seq (bidirectional attention,
forward + backward); MFU = achieved / the device's dense bf16 peak. Also prints forward-only tokens/s.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from train.config import validate_config
from train.evaluate import autocast
from train.model import BiEncoder
from train.step import MicroBatch, compile_encoder, make_optimizer, train_step, uncompile_encoder

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}
SIZES = {
    "full": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072),
    "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=16384),
}


def build(size: str, lora: bool = False, checkpointing: bool = False) -> BiEncoder:
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(**SIZES[size], rope_theta=500000.0, tie_word_embeddings=True, is_causal=False,
                      rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    backbone = LlamaModel(cfg)
    if checkpointing:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        from peft import LoraConfig, get_peft_model

        from train.model import LLAMA_LORA_TARGETS

        backbone = get_peft_model(backbone, LoraConfig(r=16, lora_alpha=32, target_modules=LLAMA_LORA_TARGETS, bias="none"))
    return BiEncoder(backbone)


def job_config(args, seq: int, batch: int, lora: bool, checkpointing: bool):
    """The job config the step reads (loss, precision, optimizer, compile); paths are never opened."""
    return validate_config({
        "model": "bench", "dataset": {"training": "unused.jsonl"}, "output": {"dir": "unused"},
        "training": {"max_seq_length": seq, "gradient_checkpointing": checkpointing, "compile": args.compile,
                     "finetuning_type": "lora_merged" if lora else "all_weights"},
        "batch": {"global_batch_size": batch}, "loss": {"negatives_per_query": args.negatives},
        "optimizer": {"learning_rate": 5e-6, "weight_decay": 0.01}, "precision": "bf16-mixed"})


def random_batch(batch: int, negatives: int, seq: int, vocab: int) -> MicroBatch:
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randint(0, vocab, (batch, seq), generator=gen)
    d = torch.randint(0, vocab, (batch * (1 + negatives), seq), generator=gen)
    keys = torch.arange(batch * (1 + negatives)).reshape(batch, 1 + negatives)  # every document distinct
    return MicroBatch(q, torch.ones_like(q), d, torch.ones_like(d), batch, (q.numel() + d.numel()), keys)


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _compile_arg(value: str):
    return value if value == "auto" else value == "true"


def throughput(args, device) -> dict:
    model = build(args.size, args.lora, args.gradient_checkpointing).to(device)
    params = sum(p.numel() for p in model.parameters())
    base = model.backbone.get_base_model() if args.lora else model.backbone
    non_embed = params - base.embed_tokens.weight.numel()
    cfg_model = base.config
    B, N, S = args.batch, args.negatives, args.seq
    cfg = job_config(args, S, B, args.lora, args.gradient_checkpointing)
    compiled = compile_encoder(model, cfg, device)
    optimizer = make_optimizer(model, cfg, device)
    dims = [cfg_model.hidden_size]
    batch = random_batch(B, N, S, cfg_model.vocab_size)
    tokens = batch.tokens

    t = time.perf_counter()
    train_step(model, optimizer, None, [batch], cfg, device, dims).item()
    first_step_s = time.perf_counter() - t
    for _ in range(args.warmup):
        train_step(model, optimizer, None, [batch], cfg, device, dims)
    sync(device)
    t = time.perf_counter()
    for _ in range(args.steps):
        loss = train_step(model, optimizer, None, [batch], cfg, device, dims)
    loss.item()
    sync(device)
    step_s = (time.perf_counter() - t) / args.steps
    flops_per_token = 6 * non_embed + 12 * cfg_model.num_hidden_layers * cfg_model.hidden_size * S
    achieved = flops_per_token * tokens / step_s / 1e12
    peak = peak_tflops(device)
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    uncompile_encoder(model)
    model.eval()
    ids, mask = batch.d_ids.to(device), batch.d_mask.to(device)
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
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "size": args.size,
            "lora": args.lora, "compiled": compiled, "gradient_checkpointing": args.gradient_checkpointing,
            "params": params, "seq": S, "sequences_per_step": B * (2 + N), "step_seconds": step_s,
            "compile_seconds": first_step_s if compiled else None, "first_step_seconds": first_step_s,
            "train_tokens_per_s": tokens / step_s, "model_tflops": achieved,
            "mfu": achieved / peak if peak and not args.lora else None,
            "forward_tokens_per_s": ids.numel() / fwd_s, "peak_memory_gib": peak_mem}


def fits(model, optimizer, cfg, device, batch_size: int, negatives: int, seq: int, vocab: int, hidden: int) -> bool:
    try:
        train_step(model, optimizer, None, [random_batch(batch_size, negatives, seq, vocab)], cfg, device, [hidden]).item()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def max_batches(args, device) -> list[dict]:
    """Largest micro batch (queries, each with 1 positive + N negatives) whose step fits `--limit-gib`."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.limit_gib * 2**30 / total), torch.cuda.current_device())
    rows = []
    for lora in (False, True):
        for checkpointing in (False, True):
            model = build(args.size, lora, checkpointing).to(device)
            base = model.backbone.get_base_model() if lora else model.backbone
            for seq in args.seqs:
                cfg = job_config(args, seq, 1, lora, checkpointing)
                optimizer = make_optimizer(model, cfg, device)
                probe = lambda b: fits(model, optimizer, cfg, device, b, args.negatives, seq,  # noqa: E731
                                       base.config.vocab_size, base.config.hidden_size)
                low, high = 0, 1
                while high <= args.max_cap and probe(high):
                    low, high = high, high * 2
                while high - low > 1:
                    mid = (low + high) // 2
                    low, high = (mid, high) if probe(mid) else (low, mid)
                rows.append({"mode": "lora_merged" if lora else "all_weights", "gradient_checkpointing": checkpointing,
                             "seq": seq, "max_micro_batch": low, "limit_gib": args.limit_gib})
                print(json.dumps(rows[-1]), flush=True)
                del optimizer
            del model, base
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--batch", type=int, default=16, help="queries per step (each with 1 positive + negatives)")
    p.add_argument("--negatives", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--lora", action="store_true", help="LoRA (rank 16) on the attention and MLP projections")
    p.add_argument("--compile", type=_compile_arg, default="auto", help="auto (CUDA only) | true | false, as training.compile")
    p.add_argument("--max-batch", action="store_true", help="search the largest micro batch instead (CUDA)")
    p.add_argument("--limit-gib", type=float, default=80.0, help="memory limit of the search (an 80 GB card)")
    p.add_argument("--seqs", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--max-cap", type=int, default=2048, help="stop the search at this micro batch")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.max_batch:
        return {"max_batch": max_batches(args, device)}
    result = throughput(args, device)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
