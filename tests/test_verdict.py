"""The paired verdict and the report card as pure functions, on hand-made per-query scores and embeddings."""

import json

import numpy as np
import pytest

from rayembed.stats import format_interval, paired_bootstrap, queries_to_settle, signed, verdict_of


def test_identical_runs_give_an_interval_that_holds_zero_and_count_every_query_unchanged():
    scores = np.random.default_rng(1).uniform(0, 1, 100)
    ci = paired_bootstrap(scores, scores.copy())
    assert ci["low"] == ci["high"] == ci["delta"] == 0.0
    assert (ci["better"], ci["worse"], ci["unchanged"]) == (0, 0, 100)
    assert verdict_of(ci) == "inconclusive" and ci["queries_to_settle"] is None


def test_a_constant_shift_gives_an_interval_of_width_zero_at_the_shift():
    base = np.random.default_rng(2).uniform(0, 0.8, 100)
    ci = paired_bootstrap(base, base + 0.1)
    assert ci["low"] == pytest.approx(0.1, abs=1e-12) and ci["high"] == pytest.approx(0.1, abs=1e-12)
    assert ci["better"] == 100 and verdict_of(ci) == "improved"
    ci = paired_bootstrap(base + 0.1, base)
    assert verdict_of(ci) == "worse" and ci["high"] == pytest.approx(-0.1, abs=1e-12)


def test_a_shift_on_3_of_100_queries_is_inconclusive_and_says_how_many_queries_would_settle_it():
    base = np.full(100, 0.5)
    tuned = base.copy()
    tuned[[3, 40, 77]] += 0.5  # mean delta 0.015, but resting on 3 queries
    ci = paired_bootstrap(base, tuned)
    assert ci["delta"] == pytest.approx(0.015)
    assert ci["low"] == 0.0 and ci["high"] > 0.03  # a resample that draws none of the 3 moves nothing
    assert verdict_of(ci) == "inconclusive" and (ci["better"], ci["worse"], ci["unchanged"]) == (3, 0, 97)
    # sd of the deltas: sqrt(3 * 0.485^2 + 97 * 0.015^2) / sqrt(99); se = sd / 10
    sd = np.sqrt((3 * 0.485 ** 2 + 97 * 0.015 ** 2) / 99)
    assert ci["se"] == pytest.approx(sd / 10)
    assert ci["queries_to_settle"] == int(np.ceil(100 * (1.959964 * sd / 10 / 0.015) ** 2)) == 126


def test_the_seed_reproduces_the_interval_and_another_seed_moves_it():
    rng = np.random.default_rng(3)
    base, tuned = rng.uniform(0, 1, 50), rng.uniform(0, 1, 50)
    a, b, c = paired_bootstrap(base, tuned, seed=7), paired_bootstrap(base, tuned, seed=7), paired_bootstrap(base, tuned, seed=8)
    assert a == b and (a["low"], a["high"]) != (c["low"], c["high"])
    assert a["resamples"] == 10_000 and a["seed"] == 7


def test_the_interval_matches_the_normal_approximation_on_many_queries():
    rng = np.random.default_rng(4)
    base = rng.uniform(0, 1, 2000)
    tuned = base + rng.normal(0.01, 0.1, 2000)
    ci = paired_bootstrap(base, tuned)
    half = 1.96 * ci["se"]
    assert ci["low"] == pytest.approx(ci["delta"] - half, abs=0.15 * half)
    assert ci["high"] == pytest.approx(ci["delta"] + half, abs=0.15 * half)


def test_paired_scores_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match="one length"):
        paired_bootstrap([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="empty"):
        paired_bootstrap([], [])


def test_the_figure_is_written_with_its_interval():
    ci = {"delta": 0.0161, "low": 0.0, "high": 0.0362, "confidence": 0.95, "queries": 100}
    assert format_interval(ci) == "+0.016 (95% CI 0.000 to +0.036, 100 queries)"
    assert signed(-0.0004) == "0.000" and signed(-0.012) == "-0.012"
    assert queries_to_settle(100, 0.0, 0.01) is None


@pytest.mark.parametrize("tuned_shift,outcome", [(0.1, "improved"), (0.0, "inconclusive"), (-0.1, "worse")])
def test_the_reports_verdict_comes_from_the_interval(tuned_shift, outcome):
    from train.report import summary, verdict

    base = list(np.linspace(0.2, 0.8, 40))
    tuned = [b + tuned_shift for b in base]
    v = verdict({"ndcg@10": float(np.mean(base))}, {"ndcg@10": float(np.mean(tuned))},
                {"base": {"ndcg@10": base}, "tuned": {"ndcg@10": tuned}})
    assert v["outcome"] == outcome and v["delta_ndcg@10"] == pytest.approx(tuned_shift)
    assert v["interval"]["low"] == pytest.approx(tuned_shift) and v["interval"]["queries"] == 40
    assert (v["warning"] is not None) == (outcome == "worse")
    assert (v["note"] is not None) == (outcome == "inconclusive")
    if outcome == "worse":
        assert "lower optimizer.learning_rate" in v["warning"] and "95% CI -0.100 to -0.100, 40 queries" in v["warning"]
    report = {"dataset": "d", "queries": 40, "documents": 9, "base": dict.fromkeys(
        ("ndcg@10", "recall@1", "recall@5", "recall@10", "recall@100", "mrr@10"), 0.5), "verdict": v}
    report["tuned"] = report["base"]
    text = summary(report)
    assert f"verdict: {outcome}, nDCG@10 {format_interval(v['interval'])}" in text
    assert "(paired bootstrap, 10000 resamples, seed 0)" in text


def test_an_old_report_without_per_query_scores_still_reads_as_an_evaluation():
    from cluster.entities import Evaluation
    from rayembed.stats import verdict_line

    old = {"dataset": "d", "queries": 100, "documents": 600, "base": {"ndcg@10": 0.5}, "tuned": {"ndcg@10": 0.502},
           "verdict": {"outcome": "unchanged", "delta_ndcg@10": 0.002, "warning": None}}
    ev = Evaluation.from_report(json.loads(json.dumps(old)))
    assert ev.verdict == "unchanged" and ev.interval is None and ev.card is None
    assert "+0.0020, no interval" in ev.summary()
    assert verdict_line("unchanged", 0.002, None) == "verdict: unchanged (nDCG@10 +0.0020; no interval in this report)"


def regression_report(main_shift: float, regression_shift: float) -> dict:
    """A hand-made eval.json: 40 evaluation queries moved by `main_shift`, 60 regression queries by `regression_shift`."""
    from train.report import verdict

    metrics = ("ndcg@10", "recall@1", "recall@5", "recall@10", "recall@100", "mrr@10")
    base, rbase = list(np.linspace(0.2, 0.8, 40)), list(np.linspace(0.1, 0.7, 60))
    tuned, rtuned = [b + main_shift for b in base], [b + regression_shift for b in rbase]
    regression = {"dataset": "general", "documents": 1000, "base": {"ndcg@10": float(np.mean(rbase))},
                  "tuned": {"ndcg@10": float(np.mean(rtuned))},
                  "per_query": {"base": {"ndcg@10": rbase}, "tuned": {"ndcg@10": rtuned}}}
    v = verdict({"ndcg@10": float(np.mean(base))}, {"ndcg@10": float(np.mean(tuned))},
                {"base": {"ndcg@10": base}, "tuned": {"ndcg@10": tuned}}, regression=regression)
    return {"dataset": "d", "queries": 40, "documents": 9, "base": dict.fromkeys(metrics, 0.5),
            "tuned": dict.fromkeys(metrics, 0.5 + main_shift), "verdict": v}


def test_a_drop_on_the_regression_set_makes_an_improved_job_worse_and_says_why():
    from cluster.cli import evaluation_table
    from cluster.entities import Evaluation
    from train.report import summary

    report = regression_report(0.1, -0.02)  # better on its own data, 0.02 worse on every regression query
    v = report["verdict"]
    assert v["outcome"] == "worse" and v["evaluation_outcome"] == "improved"
    check = v["regression"]
    assert check["outcome"] == "worse" and check["interval"]["high"] == pytest.approx(-0.02)
    assert v["warning"].startswith("regression: the tuned model ranks the regression set general worse than the base")
    assert "-0.020 (95% CI -0.020 to -0.020, 60 queries)" in v["warning"]
    text = summary(report)
    assert "verdict: worse" in text and "regression set general: nDCG@10 0.4000 -> 0.3800, -0.020 (95% CI -0.020 to " \
        "-0.020, 60 queries): a significant drop" in text
    ev = Evaluation.from_report(json.loads(json.dumps(report)))
    assert ev.verdict == "worse" and ev.evaluation_outcome == "improved" and ev.regression.queries == 60
    assert ev.regression.interval.high == pytest.approx(-0.02)
    assert "regression set general" in ev.summary() and "a significant drop" in evaluation_table(ev)


@pytest.mark.parametrize("regression_shift", [0.0, 0.02])
def test_no_significant_drop_on_the_regression_set_keeps_the_verdict_and_shows_its_figure(regression_shift):
    from cluster.entities import Evaluation
    from train.report import summary

    report = regression_report(0.1, regression_shift)
    v = report["verdict"]
    assert v["outcome"] == "improved" and "evaluation_outcome" not in v and v["warning"] is None
    assert v["regression"]["outcome"] == ("inconclusive" if regression_shift == 0 else "improved")
    line = f"{format_interval(v['regression']['interval'])}: no significant drop"
    assert line in summary(report) and line in Evaluation.from_report(report).regression.text()


def test_a_regression_set_with_a_noisy_drop_that_holds_zero_is_no_drop():
    """Half the regression queries 0.05 worse, half 0.04 better: a mean of -0.005, an interval that holds zero."""
    from train.report import regression_check

    rbase = list(np.linspace(0.2, 0.7, 100))
    rtuned = [b - 0.05 if i % 2 else b + 0.04 for i, b in enumerate(rbase)]
    check = regression_check({"dataset": "r", "base": {"ndcg@10": 0.45}, "tuned": {"ndcg@10": 0.445},
                              "per_query": {"base": {"ndcg@10": rbase}, "tuned": {"ndcg@10": rtuned}}})
    assert check["interval"]["low"] < 0 < check["interval"]["high"] and check["outcome"] == "inconclusive"


def planted(n_docs=300, n_queries=60, dim=64, noise=0.9, seed=5):
    """Queries that are noisy copies of their one relevant document; normalized."""
    rng = np.random.default_rng(seed)
    docs = rng.normal(size=(n_docs, dim)).astype(np.float32)
    rel = rng.choice(n_docs, n_queries, replace=False)
    queries = docs[rel] + noise * rng.normal(size=(n_queries, dim)).astype(np.float32)
    norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    qids, dids = [f"q{i}" for i in range(n_queries)], [f"d{i}" for i in range(n_docs)]
    return norm(queries), norm(docs), qids, dids, {f"q{i}": {f"d{j}": 1} for i, j in enumerate(rel)}


def test_hamming_is_the_popcount_of_the_xor():
    from train.report_card import binary_quantize, hamming

    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(5, 21)), rng.normal(size=(7, 21))
    want = ((a[:, None, :] > 0) != (b[None, :, :] > 0)).sum(-1)  # [5, 7]
    np.testing.assert_array_equal(hamming(binary_quantize(a), binary_quantize(b), 21), want)
    assert binary_quantize(a).shape == (5, 3)  # 21 bits in 3 bytes


def test_int8_maps_the_corpus_range_onto_256_levels_per_dimension():
    from train.report_card import int8_calibrate, int8_dequantize, int8_quantize

    corpus = np.array([[-1.0, 0.0], [1.0, 0.5], [0.2, 0.25]], np.float32)
    low, step = int8_calibrate(corpus)
    codes = int8_quantize(corpus, low, step)
    assert codes.dtype == np.int8 and codes[:, 0].tolist() == [-128, 127, int(np.rint(1.2 / (2 / 255))) - 128]
    assert np.abs(int8_dequantize(codes, low, step) - corpus).max() <= step.max() / 2 + 1e-7
    assert int8_quantize(np.array([[5.0, -5.0]]), low, step).tolist() == [[127, -128]]  # clipped to the corpus range


def test_the_card_scores_every_size_and_precision_from_one_encoding():
    from train.report_card import bytes_per_vector, report_card

    q, d, qids, dids, qrels = planted()
    base_q = q + np.random.default_rng(7).normal(scale=0.5, size=q.shape).astype(np.float32)
    base_q /= np.linalg.norm(base_q, axis=1, keepdims=True)
    card = report_card({"base": (base_q, d), "tuned": (q, d)}, qids, dids, qrels, [8, 16, 64])
    assert card["sizes"] == [8, 16, 64] and len(card["rows"]) == 9 and card["queries"] == 60
    cell = {(r["dims"], r["precision"]): r for r in card["rows"]}
    assert [cell[(64, p)]["bytes_per_vector"] for p in ("float32", "int8", "binary")] == [256, 64, 8]
    assert bytes_per_vector(384, "binary") == 48 and cell[(8, "float32")]["mb_per_million_docs"] == 32
    full = cell[(64, "float32")]["tuned"]["ndcg@10"]
    assert full > 0.9 and full > cell[(8, "float32")]["tuned"]["ndcg@10"] + 0.1  # a smaller size costs quality here
    assert abs(cell[(64, "int8")]["tuned"]["ndcg@10"] - full) < 0.03  # int8 loses little...
    assert cell[(8, "binary")]["tuned"]["ndcg@10"] < cell[(8, "float32")]["tuned"]["ndcg@10"]  # 8 bits lose much
    assert cell[(64, "float32")]["delta"]["low"] > 0  # tuned beats its noisier base, with an interval
    assert "delta" not in cell[(64, "int8")]
    s = card["suggested"]
    assert s["dimensions"]["dims"] == 64 and s["dimensions"]["precision"] == "float32"


def test_int8_and_binary_are_computed_not_copied_from_float():
    """Rankings that float32 tells apart and the stored codes do not, or order otherwise."""
    from train.report_card import ranked_ids

    norm = lambda x: np.asarray(x, np.float32) / np.linalg.norm(np.asarray(x, np.float32), axis=1, keepdims=True)  # noqa: E731
    # binary: doc 0 wins on its one large component; its bits (+,-,-) are far from the query's (+,+,+), doc 1's match
    docs, query = norm([[0.99, -0.1, -0.05], [0.5, 0.5, 0.5], [-1, 0.1, 0.1]]), norm([[0.95, 0.2, 0.1]])
    assert ranked_ids(query, docs, "float32", k=3)[0].tolist() == [0, 1, 2]
    assert ranked_ids(query, docs, "binary", k=3)[0].tolist() == [1, 0, 2]
    # int8: docs 0 and 1 differ by less than one level of each dimension's range: the same codes, a tie
    docs = norm([[0.6, 0.8, 0.0], [0.6002, 0.7998, 0.0], [-1, -1, -1], [1, -1, 1]])
    query = norm([[0.6002, 0.7998, 0.0]])
    assert ranked_ids(query, docs, "float32", k=2)[0].tolist() == [1, 0]
    assert ranked_ids(query, docs, "int8", k=2)[0].tolist() == [0, 1]


def test_the_suggestion_is_the_smallest_size_within_the_tolerance_of_the_best():
    from train.report_card import suggest

    rows = [{"dims": d, "precision": p, "bytes_per_vector": b, "tuned": {"ndcg@10": v}}
            for d, p, b, v in [(16, "float32", 64, 0.80), (32, "float32", 128, 0.885), (64, "float32", 256, 0.89),
                               (64, "int8", 64, 0.887), (64, "binary", 8, 0.70)]]
    s = suggest(rows)
    assert (s["dimensions"]["dims"], s["dimensions"]["best_ndcg@10"]) == (32, 0.89)
    assert (s["storage"]["dims"], s["storage"]["precision"]) == (64, "int8")  # 64 bytes, like 16 x float32, but better


def test_the_card_chart_is_written(tmp_path):
    from train.report_card import plot_card, report_card

    q, d, qids, dids, qrels = planted(n_docs=50, n_queries=10, dim=16)
    card = report_card({"base": (q, d), "tuned": (q, d)}, qids, dids, qrels, [8, 16])
    plot_card(tmp_path / "card.png", card, "planted")
    assert (tmp_path / "card.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_sweep_table_shows_the_winner_against_the_base_with_its_interval(tmp_path):
    from tune.report import write_outputs

    ci = paired_bootstrap(np.full(50, 0.5), np.r_[np.full(48, 0.5), np.full(2, 0.7)])
    summary = {"trials": [{"lr": 1e-5, "status": "ok", "ndcg": 0.9, "recall": 0.9, "loss": 0.1, "val_loss": 0.2,
                           "seconds": 10, "error": None, "extension": False}],
               "best": {"lr": 1e-5, "ndcg": 0.9},
               "winner_report": {"verdict": {"outcome": verdict_of(ci), "delta_ndcg@10": ci["delta"], "interval": ci}}}
    write_outputs(tmp_path, summary)
    text = (tmp_path / "results.md").read_text()
    assert f"winner against the base model: inconclusive, nDCG@10 {format_interval(ci)}; 2 queries better" in text
    assert ci["low"] == 0.0 and ci["delta"] == pytest.approx(0.008)


def test_verification_judges_the_served_figure_against_the_jobs_at_the_same_size():
    from cluster.entities import Evaluation
    from cluster.verify import judge

    q, d, qids, dids, qrels = planted(dim=32)
    from train.report_card import report_card

    card = report_card({"base": (q, d), "tuned": (q, d)}, qids, dids, qrels, [16, 32])
    at = {r["dims"]: r["tuned"]["ndcg@10"] for r in card["rows"] if r["precision"] == "float32"}
    ev = Evaluation(dataset="d", queries=60, documents=300, base={"ndcg@10": at[32]}, tuned={"ndcg@10": at[32]},
                    verdict="inconclusive", delta_ndcg_at_10=0.0, card=card)
    ok = judge(ev, at[16] - 0.004, "fp32", 16, False, full=32)
    assert ok.passed and ok.expected == pytest.approx(at[16], abs=1e-6) and ok.tolerance == 0.005
    bad = judge(ev, at[16] - 0.02, "int8", 16, False, full=32)
    assert not bad.passed and "tolerance 0.015 for int8" in bad.reason and bad.delta == pytest.approx(-0.02, abs=1e-6)
    assert judge(ev, at[32] - 0.02, "int8", 32, True, full=32).reason.endswith("served anyway (allow_worse)")
    old = ev.model_copy(update={"card": None})  # a report written before the card: no figure at 16
    skipped = judge(old, 0.5, "fp32", 16, False, full=32)
    assert skipped.passed and "no figure at 16 dimensions" in skipped.reason
