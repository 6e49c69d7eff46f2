"""One optimizer step of the training job: micro-batches -> contrastive loss -> backward -> clip ->
AdamW -> schedule (with `loss.cached`, one loss over the whole step's batch by gradient caching).
train/loop.py and bench/gpu_train.py both call `train_step`, so the benchmark's figure is the job's.
No host synchronisation inside a step: the loss stays a device tensor until the loop logs it; on CUDA
AdamW is fused and the encoder may be compiled (`training.compile`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rayembed.artifact import TextTokenizer
from train.config import JobConfig
from train.evaluate import autocast
from train.losses import matryoshka_loss, text_keys


@dataclass
class MicroBatch:
    q_ids: torch.Tensor  # [b, Sq]
    q_mask: torch.Tensor  # [b, Sq]
    d_ids: torch.Tensor  # [b * (1 + N), Sd]
    d_mask: torch.Tensor  # [b * (1 + N), Sd]
    size: int  # queries
    tokens: int  # real (unpadded) tokens
    d_keys: torch.Tensor  # [b, 1 + N] text keys of the documents (the loss masks a query's own positive met again)

    def to(self, device: torch.device) -> "MicroBatch":
        if device.type != "cuda":
            return self
        move = lambda t: t.pin_memory().to(device, non_blocking=True)  # noqa: E731
        return MicroBatch(move(self.q_ids), move(self.q_mask), move(self.d_ids), move(self.d_mask), self.size,
                          self.tokens, move(self.d_keys))


def tokenize(tokenizer: TextTokenizer, examples, prefixes: tuple[str, str], negatives: int) -> MicroBatch:
    """Queries and their [positive + N hard negatives] documents, each padded to its own longest text."""
    q_ids, q_mask = tokenizer([prefixes[0] + e.query for e in examples])
    docs = [t for e in examples for t in (e.pos_doc, *e.neg_doc[:negatives])]
    d_ids, d_mask = tokenizer([prefixes[1] + t for t in docs])
    return MicroBatch(torch.from_numpy(q_ids), torch.from_numpy(q_mask), torch.from_numpy(d_ids),
                      torch.from_numpy(d_mask), len(examples), int(q_mask.sum() + d_mask.sum()),
                      text_keys(docs).reshape(len(examples), 1 + negatives))


def encode_bucketed(model, ids: torch.Tensor, mask: torch.Tensor, rows: int) -> torch.Tensor:
    """[n, H] embeddings computed `rows` texts at a time, longest first, each group cut to its own longest
    text: the values of one padded forward (padding is masked out of attention and pooling) for less
    compute when lengths vary. Lengths are read on the host: for CPU tensors (GPUs take one wide forward)."""
    lengths = mask.sum(1)  # [n]
    order = torch.argsort(lengths, descending=True, stable=True)  # [n]
    parts = [model(ids[group, : int(lengths[group[0]])], mask[group, : int(lengths[group[0]])])
             for group in order.split(rows)]  # each [g, H]
    return torch.cat(parts)[torch.argsort(order)]  # [n, H], back in input order


def embed_micro_batch(model, mb: MicroBatch, cfg: JobConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled float32 embeddings of a micro-batch's queries [b, H] and documents [b, 1+N, H]."""
    n_neg = cfg.loss.negatives_per_query
    rows = cfg.batch.bucket_rows(device.type)
    with autocast(device, cfg.precision):
        if rows is not None and mb.q_ids.device.type == "cpu":
            q = encode_bucketed(model, mb.q_ids, mb.q_mask, rows).float()  # [b, H]
            d = encode_bucketed(model, mb.d_ids, mb.d_mask, rows).float().reshape(mb.size, 1 + n_neg, -1)  # [b, 1+N, H]
        elif mb.q_ids.shape[1] == mb.d_ids.shape[1]:  # one forward for both: larger GEMMs, one weight cast
            both = model(torch.cat([mb.q_ids, mb.d_ids]), torch.cat([mb.q_mask, mb.d_mask])).float()  # [b + b(1+N), H]
            q, d = both[: mb.size], both[mb.size:].reshape(mb.size, 1 + n_neg, -1)  # [b, H], [b, 1+N, H]
        else:
            q = model(mb.q_ids, mb.q_mask).float()  # [b, H]
            d = model(mb.d_ids, mb.d_mask).float().reshape(mb.size, 1 + n_neg, -1)  # [b, 1+N, H]
    return q, d


def embedding_loss(q: torch.Tensor, d: torch.Tensor, keys: torch.Tensor, cfg: JobConfig, dims: list[int]) -> torch.Tensor:
    """The job's contrastive loss of queries [B, H] against their documents [B, 1+N, H] (positive first),
    whose text keys are `keys` [B, 1+N]."""
    neg = d[:, 1:] if cfg.loss.negatives_per_query else None
    return matryoshka_loss(q, d[:, 0], neg, dims, cfg.loss.temperature, cfg.loss.in_batch_negatives,
                           cfg.loss.matryoshka_weights, keys[:, 0], keys[:, 1:])


def micro_batch_loss(model, mb: MicroBatch, cfg: JobConfig, device: torch.device, dims: list[int]) -> torch.Tensor:
    return embedding_loss(*embed_micro_batch(model, mb, cfg, device), mb.d_keys, cfg, dims)


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def cached_backward(model, micro_batches: list[MicroBatch], cfg: JobConfig, device: torch.device,
                    dims: list[int]) -> torch.Tensor:
    """GradCache (Gao et al., 2021): the loss of the whole step's batch, every query against every document
    of the step, with the activation memory of one micro-batch. 1) embed each micro-batch without a graph;
    2) the loss over all embeddings, backward to the embeddings only; 3) each micro-batch again with its
    graph, backpropagating the cached embedding gradients into the weights. Each re-forward restores the
    random state of its first pass, so dropout masks match and the gradients are those of one big forward.
    Costs one more forward per micro-batch. Returns the loss (on device, detached)."""
    moved = [mb.to(device) for mb in micro_batches]
    states, qs, ds = [], [], []
    with torch.no_grad():
        for mb in moved:
            states.append(_rng_state(device))
            q, d = embed_micro_batch(model, mb, cfg, device)
            qs.append(q)
            ds.append(d)
    after = _rng_state(device)
    q_all = torch.cat(qs).requires_grad_()  # [B, H]
    d_all = torch.cat(ds).requires_grad_()  # [B, 1+N, H]
    loss = embedding_loss(q_all, d_all, torch.cat([mb.d_keys for mb in moved]), cfg, dims)
    loss.backward()
    sizes = [mb.size for mb in moved]
    for mb, state, gq, gd in zip(moved, states, q_all.grad.split(sizes), d_all.grad.split(sizes)):
        _set_rng_state(state, device)
        q, d = embed_micro_batch(model, mb, cfg, device)
        torch.autograd.backward([q, d], [gq, gd])
    _set_rng_state(after, device)
    return loss.detach()


def make_optimizer(model: torch.nn.Module, cfg: JobConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; fused into one kernel per step on CUDA."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optimizer.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.optimizer.learning_rate,
                             fused=device.type == "cuda")


def compile_wanted(cfg: JobConfig, device: torch.device) -> bool:
    setting = cfg.training.compile
    return device.type == "cuda" if setting == "auto" else bool(setting)


def compile_encoder(model, cfg: JobConfig, device: torch.device) -> bool:
    """Compile the backbone in place (parameter names unchanged, so checkpoints and merging still work)."""
    if not compile_wanted(cfg, device):
        return False
    model.backbone.compile(dynamic=None)  # fixed shapes first; automatic dynamic shapes after a recompile
    return True


def uncompile_encoder(model) -> None:
    """Back to eager for evaluation and export (new shapes there would only trigger recompiles)."""
    if getattr(model.backbone, "_compiled_call_impl", None) is not None:
        model.backbone._compiled_call_impl = None


def train_step(model, optimizer, scheduler, micro_batches: list[MicroBatch], cfg: JobConfig, device: torch.device,
               dims: list[int]) -> torch.Tensor:
    """One optimizer step over the micro-batches (gradient accumulation, or one cached loss over all of them
    with `loss.cached`); returns the mean loss on device."""
    optimizer.zero_grad(set_to_none=True)
    if cfg.loss.cached and len(micro_batches) > 1:
        loss_sum = cached_backward(model, micro_batches, cfg, device, dims)
    else:  # gradient accumulation: each micro-batch its own loss (in-batch negatives from its own queries)
        total = sum(mb.size for mb in micro_batches)
        loss_sum = torch.zeros((), device=device)
        for mb in micro_batches:
            mb = mb.to(device)
            loss = micro_batch_loss(model, mb, cfg, device, dims)
            (loss * (mb.size / total)).backward()
            loss_sum += loss.detach() * (mb.size / total)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, cfg.optimizer.max_grad_norm, foreach=device.type == "cuda")
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss_sum
