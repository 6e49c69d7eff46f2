"""The served model checked against its own evaluation, on real Serve replicas: an intact graph passes, a graph with
noise in its weights fails with its reason and gets no provider; and a deployment's default_dimensions."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SAMPLE


def small_eval(folder: Path, n_queries: int = 40, n_docs: int = 200) -> Path:
    """The sample's first `n_queries` judged queries, their documents and others up to `n_docs`, as a BEIR folder."""
    qrels = [line.split("\t") for line in (SAMPLE / "eval" / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    qrels = qrels[:n_queries]
    wanted_q, wanted_d = {q for q, _, _ in qrels}, {d for _, d, _ in qrels}
    corpus = [json.loads(line) for line in (SAMPLE / "eval" / "corpus.jsonl").read_text().splitlines()]
    keep = [c for c in corpus if c["_id"] in wanted_d] + [c for c in corpus if c["_id"] not in wanted_d]
    queries = [json.loads(line) for line in (SAMPLE / "eval" / "queries.jsonl").read_text().splitlines()]
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(c) + "\n" for c in keep[:n_docs]))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries if q["_id"] in wanted_q))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join("\t".join(r) + "\n" for r in qrels))
    return folder


def job_evaluation(eval_dir: Path, artifact: Path) -> dict:
    """What a job reports for the packaged MiniLM (PyTorch, float32) on `eval_dir`, with the artifact's prefixes and
    max_seq_length: its tuned figure."""
    import torch

    from train.data import load_beir
    from train.evaluate import embed_set, per_query_scores
    from train.metrics import mean_metrics
    from train.model import build_bi_encoder, inspect_model
    from rayembed.artifact import TextTokenizer, read_manifest

    info, manifest = inspect_model("all-MiniLM-L6-v2"), read_manifest(artifact)
    rset = load_beir(eval_dir)
    model = build_bi_encoder(info, "all_weights").eval()
    prefixes = (manifest.prefixes.query, manifest.prefixes.passage)
    tokenizer = TextTokenizer(info.path, manifest.max_seq_length)
    metrics = mean_metrics(per_query_scores(*embed_set(model, tokenizer, rset, prefixes, torch.device("cpu")), rset))
    return {"dataset": str(eval_dir), "queries": len(rset.queries), "documents": len(rset.corpus), "base": metrics,
            "tuned": metrics, "verdict": "inconclusive", "delta_ndcg_at_10": 0.0}


def corrupt(artifact: Path, graph: str, scale: float = 0.3, seed: int = 0) -> None:
    """Gaussian noise of `scale` x each weight tensor's own spread added to every float initializer of `graph`."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(artifact / graph))
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.size > 16:
            init.CopyFrom(numpy_helper.from_array((w + scale * w.std() * rng.standard_normal(w.shape)).astype(np.float32), init.name))
    onnx.save(model, str(artifact / graph))


@pytest.fixture(scope="module")
def control_plane(ray_session, tmp_path_factory):
    """One control plane over a real Serve for the module's tests (Serve starts once)."""
    from ray import serve

    from cluster import controlplane
    from rayembed.runtime import free_port

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(controlplane, "TICK_S", 3600.0)  # reconcile only when the test says so
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        cp = controlplane.ControlPlane(str(tmp_path_factory.mktemp("home")), "http://127.0.0.1:9", "http://127.0.0.1:9")
        yield cp
        cp._stop.set()
        for name in [d["name"] for d in cp.list_deployments("default")]:
            cp.delete_deployment("default", name)
        serve.shutdown()


def settle(cp, name: str, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        cp.reconcile()
        dep = cp.store.get("deployment", "default", name)
        if dep["status"] in ("READY", "FAILED") and dep["pending_app"] is None:
            return dep
        assert time.monotonic() < deadline, dep
        time.sleep(0.5)


@pytest.mark.timeout(900)
def test_a_corrupted_served_graph_fails_verification_and_gets_no_provider_an_intact_one_passes(
        control_plane, minilm_onnx, tmp_path):
    from cluster.entities import Artifact, Evaluation, ModelEntity
    from rayembed.engine import OnnxEmbedder

    cp = control_plane
    eval_dir = small_eval(tmp_path / "eval")
    evaluation = Evaluation.model_validate(job_evaluation(eval_dir, minilm_onnx))
    served_graph = OnnxEmbedder(minilm_onnx, device="cpu").path.name  # what a CPU replica loads (precision auto)
    for name in ("intact", "noisy"):
        art = tmp_path / name
        shutil.copytree(minilm_onnx, art)
        if name == "noisy":
            corrupt(art, served_graph)
        cp.ctx.save(ModelEntity(name=f"minilm-{name}", base_model="all-MiniLM-L6-v2", artifact=Artifact(uri=str(art)),
                             embedding_dim=384, evaluation=evaluation))
        cp.create_deployment("default", {"name": name, "model": f"minilm-{name}", "num_cpus": 0.25})

    good = settle(cp, "intact")
    v = good["verification"]
    assert good["status"] == "READY" and v["passed"] is True, v
    assert v["graph"] == served_graph and v["dims"] == 384 and (v["queries"], v["documents"]) == (40, 200)
    assert abs(v["delta"]) <= v["tolerance"] == 0.005 and v["expected"] == pytest.approx(evaluation.tuned["ndcg@10"], abs=1e-6)
    assert cp.store.get("provider", "default", "intact") is not None

    bad = settle(cp, "noisy")
    v = bad["verification"]
    assert bad["status"] == "FAILED" and v["passed"] is False and v["delta"] < -v["tolerance"], v
    assert "the served graph ranks worse than the model its job evaluated" in v["reason"]
    assert bad["error"].startswith("verification failed: served nDCG@10") and "tolerance 0.005" in bad["error"]
    assert cp.store.get("provider", "default", "noisy") is None

    # `rayembed deployments verify`: again, through the serving replicas, recorded on the deployment
    again = cp.verify_deployment("default", "intact")
    assert again["verification"]["passed"] is True and again["verification"]["at"] > good["verification"]["at"]
    assert again["status_history"][-1]["reason"].startswith("verified again: served nDCG@10")

    # a repointed deployment moves its routes only once its new generation passes: swapped to the noisy graph, it
    # keeps serving the intact one
    routed = cp.store.get("provider", "default", "intact")["app"]
    cp.update_deployment("default", "intact", {"model": "minilm-noisy"})
    swapped = settle(cp, "intact")
    assert swapped["status"] == "READY" and swapped["model"] == "minilm-intact" and swapped["app"] == routed
    assert swapped["verification"]["passed"] is True and swapped["verification"]["model"] == "minilm-intact"  # served
    assert swapped["error"].startswith("verification failed: served nDCG@10")
    assert "swap to model minilm-noisy failed, still serving minilm-intact: verification failed" in \
        swapped["status_history"][-1]["reason"]
    assert cp.store.get("provider", "default", "intact")["app"] == routed


@pytest.mark.timeout(900)
def test_default_dimensions_apply_when_a_request_omits_dimensions(control_plane, tiny_nemotron_onnx, tmp_path):
    from ray import serve

    from cluster import serve_apps as deployments
    from cluster.entities import Artifact, ModelEntity
    from rayembed.errors import InvalidRequest

    cp = control_plane
    cp.ctx.save(ModelEntity(name="nemo", base_model="tiny", artifact=Artifact(uri=str(tiny_nemotron_onnx)),
                         embedding_dim=64, matryoshka_dims=[16, 32]))
    with pytest.raises(InvalidRequest, match=r"default_dimensions 24 is not one of model 'nemo''s sizes \[16, 32, 64\]"):
        cp.create_deployment("default", {"name": "nemo16", "model": "nemo", "default_dimensions": 24})
    cp.create_deployment("default", {"name": "nemo16", "model": "nemo", "num_cpus": 0.25, "default_dimensions": 16})
    dep = settle(cp, "nemo16")
    assert dep["status"] == "READY", dep
    assert dep["verification"]["passed"] and dep["verification"]["reason"].startswith("no evaluation to compare with")
    handle = serve.get_app_handle(dep["app"])
    omitted, _ = handle.embed.remote(["a tool to compress files"], "query", "END", None).result()
    asked, _ = handle.embed.remote(["a tool to compress files"], "query", "END", 64).result()
    sliced, _ = handle.embed.remote(["a tool to compress files"], "query", "END", 16).result()
    assert omitted.shape == (1, 16) and asked.shape == (1, 64)
    np.testing.assert_allclose(omitted, sliced, atol=1e-6)
    assert deployments.replica_info(dep["app"])["default_dimensions"] == 16


def test_the_promotion_gate_acts_on_the_interval(tmp_path, monkeypatch):
    """`worse` (the interval below zero) is refused; a config with require_improved also refuses `inconclusive`;
    allow_worse overrides both; an `improved` model passes both."""
    from cluster import controlplane, serve_apps as deployments
    from cluster.entities import Artifact, Evaluation, ModelEntity
    from rayembed.errors import PromotionRefused
    from tests.test_cluster_units import fake_artifact
    from train.report import verdict

    monkeypatch.setattr(controlplane, "TICK_S", 3600.0)
    monkeypatch.setattr(deployments, "statuses", dict)
    onnx = fake_artifact(tmp_path)
    cp = controlplane.ControlPlane(str(tmp_path / "home"), "http://127.0.0.1:9", "http://127.0.0.1:9")
    base = np.linspace(0.3, 0.9, 100)
    shifts = {"better": np.r_[np.zeros(90), np.full(10, 0.2)], "unsure": np.r_[np.zeros(98), np.full(2, 0.3)],
              "worse": -np.r_[np.zeros(80), np.full(20, 0.2)]}
    try:
        for name, shift in shifts.items():
            b, t = {"ndcg@10": float(base.mean())}, {"ndcg@10": float((base + shift).mean())}
            v = verdict(b, t, {"base": {"ndcg@10": list(base)}, "tuned": {"ndcg@10": list(base + shift)}})
            ev = Evaluation.from_report({"dataset": "d", "queries": 100, "documents": 600, "base": b, "tuned": t, "verdict": v})
            cp.ctx.save(ModelEntity(name=name, base_model="b", artifact=Artifact(uri=str(onnx)), embedding_dim=8, evaluation=ev))
        assert [cp.get_model("default", n)["evaluation"]["verdict"] for n in shifts] == ["improved", "inconclusive", "worse"]
        cp.create_deployment_config("default", {"name": "strict", "model": "better", "require_improved": True})
        cp.create_deployment("default", {"name": "b1", "config": "strict"})
        cp.create_deployment("default", {"name": "u1", "model": "unsure"})  # inconclusive: not refused by default
        with pytest.raises(PromotionRefused, match=r"model 'worse' is worse than its base model: .*\(-0\.040 \(95% CI -0\.0"):
            cp.create_deployment("default", {"name": "w1", "model": "worse"})
        with pytest.raises(PromotionRefused, match=r"requires an improved model .* model 'unsure' is inconclusive: "
                                                   r".*100 queries\)\) on d: inconclusive; the interval includes 0: .*about \d+ queries .* would settle a delta "
                                                   r"of \+0\.006\. Evaluate on more queries .*allow_worse"):
            cp.create_deployment("default", {"name": "u2", "model": "unsure", "require_improved": True})
        with pytest.raises(PromotionRefused, match="requires an improved model"):
            cp.update_deployment("default", "b1", {"model": "unsure"})  # a swap meets the same gate
        assert cp.get_deployment("default", "b1")["model"] == "better"
        cp.create_deployment("default", {"name": "w2", "model": "worse", "allow_worse": True})
        cp.create_deployment("default", {"name": "u3", "model": "unsure", "require_improved": True, "allow_worse": True})
        # the operator's workspace policy: every deployment there requires `improved`, whatever its config says
        assert cp.set_policy("default", True)["require_improved"] is True
        with pytest.raises(PromotionRefused, match=r"workspace 'default' \(its operator's policy\) requires an improved "
                                                   r"model .* model 'unsure' is inconclusive"):
            cp.create_deployment("default", {"name": "u4", "model": "unsure"})
        cp.create_deployment("default", {"name": "b2", "model": "better"})
        with pytest.raises(PromotionRefused, match="workspace 'default' .* requires an improved model"):
            cp.update_deployment("default", "b2", {"model": "unsure"})
        cp.create_deployment("default", {"name": "u5", "model": "unsure", "allow_worse": True})
        assert cp.get_deployment("default", "u5")["allow_worse"] is True  # the override is on the record
        assert cp.set_policy("default", False)["require_improved"] is False
        cp.create_deployment("default", {"name": "u6", "model": "unsure"})
    finally:
        cp._stop.set()
