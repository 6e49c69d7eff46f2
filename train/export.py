"""ONNX export with pooling and normalisation in the graph, gated by a parity check against PyTorch.

Also the export-only entry point for base models:
    python -m train.export --model all-MiniLM-L6-v2 --output out/minilm-base
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from train.model import BiEncoder, inspect_model, load_backbone, quiet_libraries
from train.pooling import normalize
from rayembed.artifact import (FORMAT_VERSION, GRAPH, GRAPH_FP16, GRAPH_OPTIMIZED, TOKENIZER_FILES, Manifest,
                               TextTokenizer, write_manifest)

log = logging.getLogger(__name__)
PARITY_MIN_COSINE = 0.9999
FP16_MIN_COSINE = 0.999
EXTERNAL_DATA_BYTES = 2 * 1024**3
# Real sentences of varied length for the parity gate when the caller brings none.
DEFAULT_PARITY_TEXTS = [
    "receive RSS feeds by email",
    "Moose is an extension of the Perl 5 object system. The main goal of Moose is to make Perl 5 Object "
    "Oriented programming easier, more consistent, and less tedious.",
    "lint tool for Ansible playbooks",
    "0 A.D. is a free, open-source, cross-platform real-time strategy game of ancient warfare. In short, it is "
    "a historically-based war/economy game that allows players to relive or rewrite the history of Western "
    "civilizations, focusing on the years between 500 B.C. and 500 A.D.",
    "APC UPS Power Management (daemon)",
    "x",
]


class ExportError(RuntimeError):
    """The exported graph is not faithful to the PyTorch model; nothing was written."""


class OnnxEmbedder(nn.Module):
    """input_ids, attention_mask (int64 [B, S]) -> embeddings (float32 [B, H], L2-normalised)."""

    def __init__(self, encoder: BiEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return normalize(self.encoder(input_ids, attention_mask).float())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_max_length(model_dir: str | Path, max_positions: int) -> int:
    """sentence-transformers' max_seq_length when the directory has one, else the position limit (≤ 8192)."""
    st = Path(model_dir) / "sentence_bert_config.json"
    if st.is_file():
        return int(json.loads(st.read_text()).get("max_seq_length", max_positions))
    return min(max_positions, 8192)


def onnx_session(path: Path, providers: list[str] | None = None):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])


def parity(model: nn.Module, onnx_path: Path, tokenizer: TextTokenizer, texts: list[str], batch_size: int = 16) -> float:
    """Minimum cosine between ONNX Runtime and PyTorch embeddings of the same texts (mixed lengths per batch)."""
    session = onnx_session(onnx_path)
    worst = 1.0
    for start in range(0, len(texts), batch_size):
        ids, mask = tokenizer(texts[start: start + batch_size])
        got = session.run(["embeddings"], {"input_ids": ids, "attention_mask": mask})[0]  # [b, H]
        with torch.no_grad():
            ref = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()  # [b, H]
        cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
        worst = min(worst, float(cos.min()))
    return worst


def _fp16_copy(src: Path, dst: Path, external: bool) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    half = convert_float_to_float16(model, keep_io_types=True)
    onnx.save(half, str(dst), save_as_external_data=external, location=dst.name + ".data" if external else None)


def transformer_fusions(src: Path, dst: Path) -> dict | None:
    """ONNX Runtime's transformer optimizer for BERT-family graphs, saved offline: on a dynamo export it fuses
    LayerNormalization and BiasGelu but none of the attention. `{op type: count}`, or None when nothing fused.
    The int8 graph starts from it (train/quantize.py: dynamic quantization reaches MatMul, not the fused Attention)."""
    from onnxruntime.transformers.optimizer import optimize_model

    logging.disable(logging.WARNING)  # it logs a line per fusion under its own module names
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # and prints "failed in shape inference", then goes on
            model = optimize_model(str(src), model_type="bert", num_heads=0, hidden_size=0, opt_level=1)
            fused = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
            if fused:
                model.save_model_to_file(str(dst))
    finally:
        logging.disable(logging.NOTSET)
    return fused or None


def ort_fusions(src: Path, dst: Path) -> dict | None:
    """onnxscript's ONNX Runtime fusions, written for dynamo exports: the whole attention block as one `Attention`
    or `MultiHeadAttention` op, Add + LayerNorm as `SkipLayerNormalization`, `BiasGelu`; on Llama RMSNorm and
    bidirectional `MultiHeadAttention`. MiniLM goes from 324 nodes to 94 (docs/benchmarks.md §5).
    `{op type the plain graph lacks: count in the saved graph}`, or None when nothing fused."""
    import onnx
    from onnxscript import ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    plain = {n.op_type for n in onnx.load(str(src), load_external_data=False).graph.node}
    model, stats = optimize_for_ort(ir.load(str(src)))
    ops: dict[str, int] = {}
    for node in model.graph:
        if node.op_type not in plain:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
    if not any(stats.values()) or not ops:
        return None
    ir.save(model, str(dst))
    return ops


def _optimized_copy(src: Path, dst: Path, family: str, gate) -> tuple[dict, float] | None:
    """The fused graph at `dst`, saved offline: onnxscript's fusions, else, for BERT-family encoders, ONNX Runtime's
    transformer optimizer; the first whose graph passes `gate(dst) -> (passed, min cosine)`. Returns the manifest's
    `optimized` entry and its cosine, or None (nothing left at `dst`) when none applies or passes."""
    fusers = [("onnxscript", ort_fusions)] + ([("onnxruntime.transformers", transformer_fusions)]
                                              if family == "hf_encoder" else [])
    for name, fuse in fusers:
        try:
            ops = fuse(src, dst)
        except Exception as exc:  # noqa: BLE001 - an optional speed-up; the plain graph stays
            log.warning("%s's fusions do not apply to this graph (%s)", name, exc)
            ops = None
        if ops is None:
            dst.unlink(missing_ok=True)
            continue
        passed, cos = gate(dst)
        if passed:
            return {"file": dst.name, "by": name, "fusions": ops}, cos
        log.warning("%s's fused graph fails the parity gate (min cosine %.6f); not kept", name, cos)
        dst.unlink()
    return None


def export_onnx(model_dir: str | Path, output_dir: str | Path, *, max_seq_length: int | None = None,
                prefixes: tuple[str, str] | None = None, matryoshka_dims: list[int] | None = None,
                parity_texts: list[str] | None = None, source: dict | None = None, opset: int = 18,
                fp16: bool = False, optimize: bool = True, verbose: bool = False) -> Manifest:
    """Export a (merged) model directory to `output_dir` (model.onnx, tokenizer files, manifest.json)."""
    if not verbose:
        quiet_libraries()
    info = inspect_model(str(model_dir))
    max_len = max_seq_length or default_max_length(info.path, info.max_positions)
    prefixes = prefixes or info.prefixes
    tokenizer = TextTokenizer(info.path, max_len)
    model = OnnxEmbedder(BiEncoder(load_backbone(info))).eval()
    texts = [t for t in (parity_texts or DEFAULT_PARITY_TEXTS) if t.strip()]
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".onnx-", dir=output_dir.parent))
    try:
        start = time.perf_counter()
        ids, mask = tokenizer([prefixes[0] + texts[0], prefixes[1] + texts[1]])
        batch = torch.export.Dim("batch", min=1, max=65536)
        seq = torch.export.Dim("sequence", min=1, max=max(2, info.max_positions))
        with warnings.catch_warnings():
            if not verbose:  # the exporter's deprecation and axis-naming notes are not the user's to act on
                warnings.simplefilter("ignore", category=FutureWarning)
                warnings.simplefilter("ignore", category=UserWarning)
            program = torch.onnx.export(model, (torch.from_numpy(ids), torch.from_numpy(mask)), dynamo=True,
                                        input_names=["input_ids", "attention_mask"], output_names=["embeddings"],
                                        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
                                        opset_version=opset, external_data=False, verbose=False)
            params = sum(p.numel() * p.element_size() for p in model.parameters())
            program.save(str(staging / GRAPH), external_data=params > EXTERNAL_DATA_BYTES)
        export_s = time.perf_counter() - start
        parity_texts_prefixed = [prefixes[i % 2] + t for i, t in enumerate(texts)]
        min_cos = parity(model, staging / GRAPH, tokenizer, parity_texts_prefixed)
        if not min_cos >= PARITY_MIN_COSINE:
            raise ExportError(f"ONNX parity gate failed: min cosine {min_cos:.6f} < {PARITY_MIN_COSINE} against PyTorch "
                              f"on {len(texts)} texts; the export was discarded")
        fp16_cos = None
        if fp16:
            _fp16_copy(staging / GRAPH, staging / GRAPH_FP16, params // 2 > EXTERNAL_DATA_BYTES)
            fp16_cos = parity(model, staging / GRAPH_FP16, tokenizer, parity_texts_prefixed)
            if not fp16_cos >= FP16_MIN_COSINE:
                raise ExportError(f"fp16 ONNX parity failed: min cosine {fp16_cos:.5f} < {FP16_MIN_COSINE}")
        optimized, opt_cos = None, None
        if optimize and params <= EXTERNAL_DATA_BYTES:
            def gate(path: Path) -> tuple[bool, float]:
                cos = parity(model, path, tokenizer, parity_texts_prefixed)
                return cos >= PARITY_MIN_COSINE, cos

            kept = _optimized_copy(staging / GRAPH, staging / GRAPH_OPTIMIZED, info.family, gate)
            if kept is not None:
                optimized, opt_cos = kept
        for name in TOKENIZER_FILES:
            if (Path(info.path) / name).is_file():
                shutil.copy2(Path(info.path) / name, staging / name)
        dims = sorted(set(info.matryoshka_dims) | set(matryoshka_dims or []))
        manifest = Manifest.model_validate({
            "format_version": FORMAT_VERSION,
            "base_model": (source or {}).get("base_model", str(model_dir)),
            "family": info.family, "model_type": info.model_type,
            "embedding_dim": info.hidden_size, "matryoshka_dims": dims,
            "max_seq_length": max_len, "prefixes": {"query": prefixes[0], "passage": prefixes[1]},
            "pooling": "mean", "normalized": True,
            "inputs": {"input_ids": "int64 [batch, sequence]", "attention_mask": "int64 [batch, sequence]"},
            "outputs": {"embeddings": f"float32 [batch, {info.hidden_size}]"},
            "opset": opset, "tokenizer": "tokenizer.json", "pad_id": tokenizer.pad_id,
            "parity": {"min_cosine": min_cos, "threshold": PARITY_MIN_COSINE, "texts": len(texts), "fp16_min_cosine": fp16_cos,
                       "optimized_min_cosine": opt_cos},
            "optimized": optimized,
            "source": source or {"kind": "base_model_export"},
            "export_seconds": round(export_s, 2),
            "files": {p.name: _sha256(p) for p in sorted(staging.iterdir()) if p.is_file()},
        })
        write_manifest(staging, manifest)
        # mkdtemp made the folder 0700: a serving process of another user must be able to read the artifact
        staging.chmod(0o755)
        for f in staging.iterdir():
            f.chmod(0o644)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.export", description="Export a base or merged model to a servable ONNX artifact.")
    parser.add_argument("--model", required=True, help="local HF directory, Hub id, or all-MiniLM-L6-v2 (packaged)")
    parser.add_argument("--output", required=True, help="artifact directory to write (model.onnx, tokenizer, manifest.json): "
                        "a folder or a storage URI (s3://...), published with its seal")
    parser.add_argument("--max-seq-length", type=int, default=None, help="serving token limit (default: the model's)")
    parser.add_argument("--fp16", action="store_true", help="also write model.fp16.onnx for GPU serving")
    args = parser.parse_args(argv)
    from rayembed.cli import setup_logging

    from rayembed import storage
    from train.staging import job_scratch, stage

    setup_logging()
    local = job_scratch(args.output) / "onnx" if storage.is_uri(args.output) else args.output
    model = stage(args.model, folder=True) if storage.is_uri(args.model) else args.model
    manifest = export_onnx(model, local, max_seq_length=args.max_seq_length, fp16=args.fp16,
                           source={"kind": "base_model_export", "base_model": args.model})
    storage.publish(str(local), args.output, log=print)
    print(manifest.model_dump_json(include={"base_model", "embedding_dim", "matryoshka_dims", "max_seq_length", "parity"}, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
