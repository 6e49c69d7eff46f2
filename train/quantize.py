"""An int8 graph for CPU replicas: ONNX Runtime's dynamic quantization of an artifact, kept only when it
passes two gates against the artifact's own fp32 graph, and reported side by side.

    python -m train.quantize --model-dir DIR [--eval BEIR_DIR] [--max-ndcg-drop 0.005] [--min-cosine 0.97]

1. Weights of MatMul/Gemm to int8 per output channel (activations quantized per batch at run time;
   per-tensor weights lose far more: worst cosine 0.91 on MiniLM against 0.98), from `model.onnx` with
   ONNX Runtime's LayerNorm/GELU fusions for BERT-family encoders (not from model.opt.onnx, whose fused
   Attention op dynamic quantization does not reach), else from `model.onnx`.
2. Parity: the minimum cosine between int8 and fp32 embeddings of the parity texts (and of every
   evaluation query and document) must reach `--min-cosine`.
3. Quality (with `--eval`): nDCG@10 of both graphs on the BEIR folder; the int8 graph may lose at most
   `--max-ndcg-drop`.

Passing both writes `model.int8.onnx` and records the figures under `int8` in manifest.json; replicas
load it only when asked (`precision: int8`), since it trades a measured sliver of quality for speed.
Failing either leaves the artifact as it was and exits 1 with the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from rayembed.artifact import GRAPH, GRAPH_INT8, GRAPH_OPTIMIZED, read_manifest, write_manifest

log = logging.getLogger("rayembed.quantize")
MIN_COSINE = 0.97  # per text; MiniLM's int8 graph: mean 0.994, worst 0.978 (the one-letter text 'x')
MAX_NDCG_DROP = 0.005


class QuantizeError(RuntimeError):
    """The int8 graph failed a gate; nothing was written."""


def _quantize(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.disable(logging.WARNING)  # it warns about pre-processing for every model; the gates judge the result
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gemm"])
    finally:
        logging.disable(logging.NOTSET)


def _fused_or_none(fuse, src: Path, dst: Path) -> dict | None:
    try:
        return fuse(src, dst)
    except Exception as exc:  # noqa: BLE001 - then the plain graph is quantized, and the gates judge it as ever
        log.warning("ONNX Runtime's transformer optimizer does not apply (%s); quantizing model.onnx", exc)
        return None


def _embeddings(model_dir: Path, graph: str, texts: list[str], rset, threads: int) -> dict[str, np.ndarray]:
    """One graph's embeddings of the parity texts and, with an evaluation set, of its queries and documents."""
    from rayembed.engine import TextEmbedder

    # A fixed batch plan: int8 activations are scaled per call, so both graphs see the same calls on every run.
    embed = TextEmbedder(model_dir, graph=graph, threads=threads, call_tokens=32)
    out = {"parity": embed(texts, "passage")}  # [N, H]
    if rset is not None:
        out["queries"] = embed(list(rset.queries.values()), "query")  # [Q, H]
        out["corpus"] = embed(list(rset.corpus.values()), "passage")  # [D, H]
    return out


def _ndcg(emb: dict[str, np.ndarray], rset) -> float:
    import torch

    from train.evaluate import rank
    from train.metrics import retrieval_metrics

    rankings = rank(torch.from_numpy(emb["queries"]), torch.from_numpy(emb["corpus"]), list(rset.queries), list(rset.corpus))
    return float(retrieval_metrics(rankings, rset.qrels)["ndcg@10"])


def quantize_artifact(model_dir: str | Path, *, eval_dir: str | Path | None = None, min_cosine: float = MIN_COSINE,
                      max_ndcg_drop: float = MAX_NDCG_DROP, threads: int = 2) -> dict:
    """Write `model.int8.onnx` into the artifact when it passes the gates; returns the report.
    Raises QuantizeError (the artifact untouched) when it does not."""
    from train.data import load_beir
    from train.export import DEFAULT_PARITY_TEXTS, _sha256, transformer_fusions

    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    # the gates compare against the graph replicas serve by default
    source = GRAPH_OPTIMIZED if manifest.optimized and (model_dir / GRAPH_OPTIMIZED).is_file() else GRAPH
    staging = model_dir / f".{GRAPH_INT8}.tmp"  # judged under this name; renamed over any older one when it passes
    fused_src = model_dir / f".{GRAPH_INT8}.src.tmp"
    rset = load_beir(eval_dir) if eval_dir else None
    start = time.perf_counter()
    try:
        # Quantized from the plain graph with only LayerNorm/GELU fused: dynamic quantization turns MatMul weights into
        # int8 but leaves a fused Attention op (model.opt.onnx's Q, K and V projections) in fp32.
        if manifest.family == "hf_encoder" and _fused_or_none(transformer_fusions, model_dir / GRAPH, fused_src):
            _quantize(fused_src, staging)
            quantized = f"{GRAPH} with ONNX Runtime's LayerNorm/GELU fusions"
        else:
            _quantize(model_dir / GRAPH, staging)
            quantized = GRAPH
        ref, got = (_embeddings(model_dir, g, list(DEFAULT_PARITY_TEXTS), rset, threads) for g in (source, staging.name))
        # parity over every text both graphs embedded: the parity texts, and the evaluation queries and documents
        a, b = np.concatenate(list(ref.values())), np.concatenate(list(got.values()))  # [T, H]
        cos = float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())
        report = {"file": GRAPH_INT8, "from": source, "quantized": quantized, "min_cosine": round(cos, 6), "min_cosine_threshold": min_cosine,
                  "parity_texts": len(a)}
        if not cos >= min_cosine:
            raise QuantizeError(f"int8 parity gate failed: min cosine {cos:.4f} < {min_cosine} against {source} "
                                f"on {len(a)} texts; nothing was written")
        if rset is not None:
            fp32, int8 = _ndcg(ref, rset), _ndcg(got, rset)
            report.update({"eval": str(eval_dir), "ndcg@10": {source: round(fp32, 4), GRAPH_INT8: round(int8, 4)},
                           "ndcg@10_drop": round(fp32 - int8, 4), "max_ndcg_drop": max_ndcg_drop})
            if not fp32 - int8 <= max_ndcg_drop:
                raise QuantizeError(f"int8 quality gate failed: nDCG@10 {int8:.4f} vs {fp32:.4f} for {source} "
                                    f"(drop {fp32 - int8:.4f} > {max_ndcg_drop}); nothing was written")
        report["seconds"] = round(time.perf_counter() - start, 1)
        staging.chmod(0o644)
        staging.rename(model_dir / GRAPH_INT8)
    finally:
        staging.unlink(missing_ok=True)
        fused_src.unlink(missing_ok=True)
    files = {**manifest.files, GRAPH_INT8: _sha256(model_dir / GRAPH_INT8)}
    write_manifest(model_dir, manifest.model_copy(update={"int8": report, "files": files}))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.quantize", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="an artifact folder (manifest.json, model.onnx)")
    parser.add_argument("--eval", help="a BEIR folder (corpus.jsonl, queries.jsonl, qrels/) for the quality gate")
    parser.add_argument("--min-cosine", type=float, default=MIN_COSINE)
    parser.add_argument("--max-ndcg-drop", type=float, default=MAX_NDCG_DROP)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    from rayembed.cli import setup_logging

    setup_logging()
    try:
        report = quantize_artifact(args.model_dir, eval_dir=args.eval, min_cosine=args.min_cosine,
                                   max_ndcg_drop=args.max_ndcg_drop, threads=args.threads)
    except QuantizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    if not args.eval:
        print("note: no --eval given, so only the parity gate ran; pass a BEIR folder to check retrieval quality")
    print(f"wrote {Path(args.model_dir) / GRAPH_INT8}; serve it with the provider setting precision: int8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
