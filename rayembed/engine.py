"""ONNX Runtime for one artifact: session, providers check, length-grouped batch plans, Matryoshka.

The reader side of the artifact contract, shared by serving replicas and batch embedding. No Ray
and no torch here, so the benchmark's in-process ceiling runs exactly this code; it needs the
`cpu` or `gpu` extra (ONNX Runtime).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from rayembed.artifact import GRAPH, GRAPH_FP16, GRAPH_INT8, GRAPH_OPTIMIZED, TextTokenizer, read_manifest

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def session_options(threads: int, spin: bool = False) -> ort.SessionOptions:
    """Sequential execution, `threads` intra-op threads; no spin-waiting by default.

    Spinning intra-op threads burn the core they wait on; on a CPU shared with the HTTP proxy and
    the gateway that halves throughput (../shared/bench/ANCHORS.md), so they sleep instead.
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


class OnnxEmbedder:
    """An ONNX Runtime session over one of the artifact's graphs that returns float32 embeddings.

    precision: auto (fp16 on CUDA when exported, the fused graph on CPU when written, else model.onnx),
    fp32 (model.onnx), fp16, optimized (the fused graph), int8 (only when asked: it trades quality).
    `graph` names a file in the folder instead (tools that judge a candidate graph).
    """

    def __init__(self, model_dir: str | Path, *, device: str = "auto", precision: str = "auto",
                 threads: int = 1, has_gpu: bool = False, spin: bool = False, graph: str | None = None):
        model_dir = Path(model_dir)
        self.manifest = read_manifest(model_dir)
        self.want_cuda = device == "cuda" or (device == "auto" and has_gpu)
        if self.want_cuda and CUDA not in ort.get_available_providers():
            raise RuntimeError(f"CUDA was asked for but this onnxruntime has only {ort.get_available_providers()}: "
                               "install the `gpu` extra (onnxruntime-gpu) instead of `cpu`")
        fp16 = model_dir / GRAPH_FP16
        use_fp16 = precision == "fp16" or (precision == "auto" and self.want_cuda and fp16.is_file())
        if use_fp16 and not fp16.is_file():
            raise FileNotFoundError(f"precision fp16 asked for but {fp16} is missing (export with export_fp16: true)")
        fused = model_dir / GRAPH_OPTIMIZED
        use_fused = precision == "optimized" or (precision == "auto" and not self.want_cuda and fused.is_file()
                                                 and self.manifest.optimized is not None)
        if use_fused and not fused.is_file():
            raise FileNotFoundError(f"precision optimized asked for but {fused} is missing (re-export the model)")
        int8 = model_dir / GRAPH_INT8
        if precision == "int8" and not int8.is_file():
            raise FileNotFoundError(f"precision int8 asked for but {int8} is missing: write it with "
                                    f"`python -m train.quantize --model-dir {model_dir} --eval BEIR_DIR`")
        self.path = (model_dir / graph if graph else int8 if precision == "int8" else fp16 if use_fp16
                     else fused if use_fused else model_dir / GRAPH)
        providers = [(CUDA, {"device_id": 0}), CPU] if self.want_cuda else [CPU]
        self.session = ort.InferenceSession(str(self.path), session_options(threads, spin), providers=providers)
        self.providers = self.session.get_providers()
        self.threads = threads
        self.check()

    def check(self) -> None:
        """Raise when CUDA was asked for and ONNX Runtime fell back to the CPU (a silent 10-50x slowdown)."""
        if self.want_cuda and self.providers[0] != CUDA:
            raise RuntimeError(f"CUDA was asked for but the session runs on {self.providers}")

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        out = self.session.run(["embeddings"], {"input_ids": input_ids, "attention_mask": attention_mask})[0]  # [B, H]
        return out.astype(np.float32, copy=False)

    def call_tokens(self, width: int = 16, rows: int = 16, repeats: int = 5) -> int:
        """This session's fixed cost of one call, in tokens' worth of its per-token cost: the `call_tokens` that
        `plan_batches` weighs padding against. Timed on this machine from calls of 1 and `rows` texts of `width`
        tokens (medians of `repeats`): t = overhead + tokens x per_token. Clamped to [1, 4096]. A model whose one-text
        call takes over 50 ms (a billion parameters on a CPU) is timed with 4 rows and one repeat, so a replica's
        start stays within a few of its calls."""
        def median_s(b: int, n: int) -> float:
            ids, mask = np.ones((b, width), np.int64), np.ones((b, width), np.int64)  # [b, width]; id 1 is in every vocabulary
            self.run(ids, mask)  # warm: first calls of a shape allocate
            times = []
            for _ in range(n):
                start = time.perf_counter()
                self.run(ids, mask)
                times.append(time.perf_counter() - start)
            return float(np.median(times))

        one = median_s(1, 1)
        if one > 0.05:
            rows, repeats = 4, 1
        else:
            one = median_s(1, repeats)
        many = median_s(rows, repeats)
        per_token = max(many - one, 1e-9) / ((rows - 1) * width)
        return int(min(max(round((one - width * per_token) / per_token), 1), 4096))


def plan_batches(lengths: list[int], max_texts: int, max_tokens: int, call_tokens: int = 32) -> list[list[int]]:
    """Split item indices into ONNX Runtime calls of <= max_texts texts whose padded size fits max_tokens, at the
    least cost, where a call costs `call_tokens` (its fixed overhead, in tokens' worth of compute) plus its padded
    tokens (count x its longest text).

    Calls hold runs of the length-sorted items, and the best cut of the sorted list is an exact dynamic program
    (O(n x max_texts)). Few long calls waste padding; many short ones pay the overhead each time: with texts of
    10 to 50 tokens, one call of 32 pads to 1,600 tokens for 1,000 real ones. A single text longer than
    max_tokens still gets a call of its own.
    """
    n = len(lengths)
    order = sorted(range(n), key=lengths.__getitem__)
    width = [lengths[i] for i in order]  # ascending: a run's last text is its widest
    best = [0] + [float("inf")] * n  # best[j]: least cost of the first j sorted items
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, max(j - max_texts, 0) - 1, -1):  # the last call holds sorted items i..j-1
            count = j - i
            if count > 1 and count * width[j - 1] > max_tokens:
                break
            cost = best[i] + call_tokens + count * width[j - 1]
            if cost <= best[j]:  # on a tie, the longer call
                best[j], cut[j] = cost, i
    plans: list[list[int]] = []
    j = n
    while j:
        plans.append(order[cut[j]:j])
        j = cut[j]
    return plans[::-1]


def matryoshka(embeddings: np.ndarray, dim: int | None) -> np.ndarray:
    """Keep the first `dim` components and re-normalize (the model was trained for these prefixes)."""
    if dim is None or dim == embeddings.shape[1]:
        return embeddings
    cut = embeddings[:, :dim]  # [B, dim]
    norms = np.linalg.norm(cut, axis=1, keepdims=True)  # [B, 1]
    return cut / np.maximum(norms, 1e-12)


class TextEmbedder:
    """Texts -> normalized float32 embeddings for batch work: the artifact's prefix, truncation at its
    max_seq_length, length-sorted ONNX Runtime calls of at most `max_texts` texts / `max_tokens` tokens."""

    def __init__(self, model_dir: str | Path, *, device: str = "auto", threads: int = 1, has_gpu: bool = False,
                 max_texts: int = 64, max_tokens: int = 16384, precision: str = "auto", graph: str | None = None,
                 call_tokens: int | None = None):
        """call_tokens: a call's fixed cost for `plan_batches`; None times it on this machine (`call_tokens()`)."""
        self.engine = OnnxEmbedder(model_dir, device=device, threads=threads, has_gpu=has_gpu, precision=precision,
                                   graph=graph)
        self.call_tokens = self.engine.call_tokens() if call_tokens is None else call_tokens
        self.manifest = self.engine.manifest
        self.tokenizer = TextTokenizer(model_dir, self.manifest.max_seq_length)
        self.max_texts, self.max_tokens = max_texts, max(max_tokens, self.manifest.max_seq_length)

    def prefix(self, input_type: str) -> str:
        if input_type not in ("query", "passage"):
            raise ValueError(f"input_type must be 'query' or 'passage', not {input_type!r}")
        return getattr(self.manifest.prefixes, input_type) or ""

    def __call__(self, texts: list[str], input_type: str) -> np.ndarray:
        prefix = self.prefix(input_type)
        ids = [e.ids for e in self.tokenizer.tokenizer.encode_batch([prefix + t for t in texts])]
        out = np.zeros((len(texts), self.manifest.embedding_dim), np.float32)  # [N, H]
        for plan in plan_batches([len(x) for x in ids], self.max_texts, self.max_tokens, self.call_tokens):
            input_ids, mask = self.tokenizer.pad([ids[i] for i in plan])  # [b, S]
            out[plan] = self.engine.run(input_ids, mask)
        return out
