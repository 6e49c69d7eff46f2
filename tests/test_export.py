"""ONNX export: pooling + normalisation in the graph, dynamic shapes, parity gate, manifest, CLI."""

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

import train.export as export_mod
from train.export import ExportError, export_onnx
from train.model import BiEncoder, inspect_model, load_backbone
from train.pooling import normalize
from rayembed.artifact import TextTokenizer, read_manifest
from tests.conftest import ROOT


@pytest.mark.parametrize("fixture", ["tiny_nemotron", "tiny_bert"])
def test_export_matches_pytorch_for_any_batch_and_length(fixture, request, tmp_path):
    model_dir = request.getfixturevalue(fixture)
    if fixture == "tiny_nemotron":  # the worker's one export of it (tests/conftest.py), which test_serve serves too
        onnx_dir = request.getfixturevalue("tiny_nemotron_onnx")
        manifest = read_manifest(onnx_dir)
    else:
        onnx_dir = tmp_path / "onnx"
        manifest = export_onnx(model_dir, onnx_dir, max_seq_length=64)
    files = {p.name for p in onnx_dir.iterdir()}
    assert {"model.onnx", "tokenizer.json", "manifest.json"} <= files
    assert manifest.parity.min_cosine >= 0.9999 and manifest.pooling == "mean"
    assert manifest.files["model.onnx"] and manifest.max_seq_length == 64
    session = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    info = inspect_model(str(model_dir))
    ref_model = BiEncoder(load_backbone(info)).eval()
    tok = TextTokenizer(onnx_dir, 64)
    for texts in (["one"], ["perl module for web servers", "x", "a much longer description " * 8]):
        ids, mask = tok(texts)
        got = session.run(["embeddings"], {"input_ids": ids, "attention_mask": mask})[0]
        with torch.no_grad():
            ref = normalize(ref_model(torch.from_numpy(ids), torch.from_numpy(mask))).numpy()
        assert got.shape == (len(texts), info.hidden_size)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(got, ref, atol=1e-4)


def test_fp16_copy_for_gpu_serving(tiny_bert, tmp_path):
    manifest = export_onnx(tiny_bert, tmp_path / "onnx", max_seq_length=32, fp16=True)
    assert "model.fp16.onnx" in manifest.files and manifest.parity.fp16_min_cosine >= 0.999
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.fp16.onnx"), providers=["CPUExecutionProvider"])
    ids, mask = TextTokenizer(tmp_path / "onnx", 32)(["perl module", "a library for parsing json"])
    out = session.run(["embeddings"], {"input_ids": ids, "attention_mask": mask})[0]
    assert out.dtype == np.float32 and out.shape == (2, 32)


def test_failed_parity_gate_keeps_the_previous_artifact(tiny_bert, tmp_path, monkeypatch):
    out = tmp_path / "onnx"
    export_onnx(tiny_bert, out, max_seq_length=32)
    before = (out / "manifest.json").read_text()
    monkeypatch.setattr(export_mod, "parity", lambda *a, **k: 0.5)
    with pytest.raises(ExportError, match="parity gate failed: min cosine 0.500000 < 0.9999"):
        export_onnx(tiny_bert, out, max_seq_length=32)
    assert (out / "manifest.json").read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnx-")], "staging directory left behind"


def test_export_cli_on_the_packaged_minilm(minilm_export):
    proc, out = minilm_export  # `python -m train.export --model all-MiniLM-L6-v2 --output DIR`, once per session
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"wrote {out}" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["embedding_dim"] == 384 and manifest["max_seq_length"] == 256
    assert manifest["prefixes"] == {"query": "", "passage": ""} and manifest["parity"]["min_cosine"] >= 0.9999
    # a real model: the synopsis lands nearer its own description than an unrelated one
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    texts = ["receive RSS feeds by email", "rss2email fetches RSS and Atom feeds and sends new items as email messages",
             "a real-time strategy game of ancient warfare"]
    ids, mask = TextTokenizer(out, 256)(texts)
    emb = session.run(["embeddings"], {"input_ids": ids, "attention_mask": mask})[0]
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2]) + 0.2


def _op_counts(path) -> dict[str, int]:
    import collections

    import onnx

    return dict(collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node))


def test_fused_graph_is_written_parity_checked_and_preferred_on_cpu(minilm_onnx):
    """The packaged MiniLM's export carries the fused graph (whole attention blocks, Add + LayerNorm, bias + GELU as
    single ONNX Runtime ops); replicas load it on CPU and it matches the plain graph on padded batches."""
    from rayembed.engine import OnnxEmbedder

    manifest = json.loads((minilm_onnx / "manifest.json").read_text())
    opt = manifest["optimized"]
    assert opt["file"] == "model.opt.onnx" and opt["by"] == "onnxscript"
    assert opt["fusions"] == {"Attention": 6, "SkipLayerNormalization": 12, "BiasGelu": 6}  # 6 layers
    ops, plain_ops = _op_counts(minilm_onnx / "model.opt.onnx"), _op_counts(minilm_onnx / "model.onnx")
    assert ops["Attention"] == 6 and "Softmax" not in ops and sum(ops.values()) < sum(plain_ops.values()) / 2
    assert manifest["parity"]["optimized_min_cosine"] >= 0.9999 and "model.opt.onnx" in manifest["files"]
    texts = ["receive RSS feeds by email", "a real-time strategy game of ancient warfare", "x",
             "Moose is an extension of the Perl 5 object system, to make object oriented programming easier"]
    ids, mask = TextTokenizer(minilm_onnx, 256)(texts)
    fused, plain = OnnxEmbedder(minilm_onnx), OnnxEmbedder(minilm_onnx, precision="fp32")
    assert fused.path.name == "model.opt.onnx" and plain.path.name == "model.onnx"
    np.testing.assert_allclose(fused.run(ids, mask), plain.run(ids, mask), atol=1e-4)
    for i in range(len(texts)):  # padding changes nothing: each text alone gives its row of the batch
        one_ids, one_mask = TextTokenizer(minilm_onnx, 256)([texts[i]])
        np.testing.assert_allclose(fused.run(one_ids, one_mask)[0], fused.run(ids, mask)[i], atol=1e-5)


def test_llama_export_gets_a_fused_bidirectional_graph(tiny_nemotron, tiny_nemotron_onnx):
    """The nemotron architecture: RMSNorm (with the residual Add) and attention fused, and the attention stays
    bidirectional (the parity gate runs PyTorch's bidirectional model on mixed-length batches)."""
    from rayembed.engine import OnnxEmbedder

    manifest = read_manifest(tiny_nemotron_onnx)
    assert manifest.optimized["by"] == "onnxscript" and manifest.parity.optimized_min_cosine >= 0.9999
    assert {"MultiHeadAttention", "SkipSimplifiedLayerNormalization"} <= set(manifest.optimized["fusions"])
    ops = _op_counts(tiny_nemotron_onnx / "model.opt.onnx")
    assert "GroupQueryAttention" not in ops and "Softmax" not in ops  # GQA would be causal
    ids, mask = TextTokenizer(tiny_nemotron_onnx, 32)(["perl module for web servers", "x", "lint tool for ansible"])
    fused, plain = OnnxEmbedder(tiny_nemotron_onnx), OnnxEmbedder(tiny_nemotron_onnx, precision="fp32")
    assert fused.path.name == "model.opt.onnx"
    info = inspect_model(str(tiny_nemotron))
    with torch.no_grad():  # PyTorch's bidirectional model: a causal attention would miss it by far
        ref = normalize(BiEncoder(load_backbone(info)).eval()(torch.from_numpy(ids), torch.from_numpy(mask))).numpy()
    np.testing.assert_allclose(fused.run(ids, mask), ref, atol=1e-4)
    np.testing.assert_allclose(plain.run(ids, mask), ref, atol=1e-4)


def test_fusion_falls_back_and_the_parity_gate_judges_each_graph(tiny_bert, tmp_path, monkeypatch):
    """onnxscript's fusions failing leaves ONNX Runtime's optimizer for BERT-family graphs; a fused graph that fails
    the gate is removed, and the next fuser gets its turn."""
    out = tmp_path / "onnx"
    export_onnx(tiny_bert, out, max_seq_length=32, optimize=False)
    src, dst = out / "model.onnx", tmp_path / "fused.onnx"

    def broken(src, dst):
        raise RuntimeError("pattern mismatch")

    monkeypatch.setattr(export_mod, "ort_fusions", broken)
    kept, cos = export_mod._optimized_copy(src, dst, "hf_encoder", lambda path: (True, 1.0))
    assert kept["by"] == "onnxruntime.transformers" and kept["fusions"].get("LayerNormalization", 0) > 0 and dst.is_file()
    monkeypatch.undo()
    judged = []

    def gate(path):
        judged.append(_op_counts(path))
        return len(judged) > 1, 0.5 if len(judged) == 1 else 1.0  # the first graph fails, the second passes

    kept, cos = export_mod._optimized_copy(src, dst, "hf_encoder", gate)
    assert "Attention" in judged[0] and "Attention" not in judged[1] and kept["by"] == "onnxruntime.transformers"
    assert export_mod._optimized_copy(src, dst, "llama", lambda path: (False, 0.5)) is None and not dst.exists()


SAMPLE_EVAL = ROOT / "data" / "debian-pkgdesc-sample" / "eval"


def test_int8_graph_passes_both_gates_and_serves_only_when_asked(minilm_onnx, tmp_path):
    """`python -m train.quantize` writes model.int8.onnx with its gates' figures; `auto` keeps the fused graph."""
    import shutil

    from rayembed.engine import OnnxEmbedder

    art = tmp_path / "art"
    shutil.copytree(minilm_onnx, art)
    out = subprocess.run([sys.executable, "-m", "train.quantize", "--model-dir", str(art), "--eval", str(SAMPLE_EVAL)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    manifest = json.loads((art / "manifest.json").read_text())
    q = manifest["int8"]
    assert q["file"] == "model.int8.onnx" and q["from"] == "model.opt.onnx" and q["min_cosine"] >= 0.97
    assert "fusions" in q["quantized"]
    ops = _op_counts(art / "model.int8.onnx")  # every projection quantized, Q, K and V included: 6 per layer
    assert ops["MatMulInteger"] == 36 and "Attention" not in ops
    assert q["ndcg@10_drop"] <= 0.005 and set(q["ndcg@10"]) == {"model.opt.onnx", "model.int8.onnx"}
    assert manifest["files"]["model.int8.onnx"] == export_mod._sha256(art / "model.int8.onnx")
    assert (art / "model.int8.onnx").stat().st_mode & 0o777 == 0o644
    assert not list(art.glob(".*tmp"))
    texts = ["receive RSS feeds by email", "a real-time strategy game of ancient warfare", "x"]
    ids, mask = TextTokenizer(art, 256)(texts)
    auto, int8 = OnnxEmbedder(art), OnnxEmbedder(art, precision="int8")
    assert auto.path.name == "model.opt.onnx" and int8.path.name == "model.int8.onnx"
    a, b = auto.run(ids, mask), int8.run(ids, mask)
    cos = (a * b).sum(1)
    assert cos.min() >= 0.97 and not np.allclose(a, b, atol=1e-4)  # close, and really another graph


def test_int8_graph_is_quantized_from_the_plain_graph_when_the_optimizer_fails(minilm_onnx, tmp_path, monkeypatch):
    import shutil

    from train.quantize import quantize_artifact

    art = tmp_path / "art"
    shutil.copytree(minilm_onnx, art)

    def broken(src, dst):
        raise RuntimeError("no pattern matched")

    monkeypatch.setattr(export_mod, "transformer_fusions", broken)
    report = quantize_artifact(art)
    assert report["quantized"] == "model.onnx" and report["from"] == "model.opt.onnx" and report["min_cosine"] >= 0.97
    ops = _op_counts(art / "model.int8.onnx")
    assert ops["MatMulInteger"] == 36 and "BiasGelu" not in ops and not list(art.glob(".*tmp"))


def test_int8_graph_failing_a_gate_leaves_the_artifact_as_it_was(minilm_onnx, tmp_path):
    import shutil

    from rayembed.engine import OnnxEmbedder
    from train.quantize import QuantizeError, quantize_artifact

    art = tmp_path / "art"
    shutil.copytree(minilm_onnx, art)
    before = {p.name: p.read_bytes() for p in art.iterdir() if p.suffix == ".json"}
    with pytest.raises(QuantizeError, match="parity gate failed: min cosine .* nothing was written"):
        quantize_artifact(art, min_cosine=0.99999)
    assert {p.name: p.read_bytes() for p in art.iterdir() if p.suffix == ".json"} == before
    assert sorted(p.name for p in art.iterdir()) == sorted(p.name for p in minilm_onnx.iterdir())
    with pytest.raises(FileNotFoundError, match="python -m train.quantize"):
        OnnxEmbedder(art, precision="int8")
