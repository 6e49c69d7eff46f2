"""The job's evaluation report: base vs tuned metrics, the paired verdict with its interval (and the regression set's,
when the job names one), the report card, and their charts (eval.png, card.png)."""

from __future__ import annotations

import json
from pathlib import Path

from rayembed.stats import RESAMPLES, SEED, format_interval, paired_bootstrap, regression_line, signed, verdict_line, verdict_of
from train.report_card import card_table, plot_card

SHOWN = ("ndcg@10", "recall@1", "recall@5", "recall@10", "recall@100", "mrr@10")


def verdict(base: dict, tuned: dict, per_query: dict | None = None, resamples: int = RESAMPLES, seed: int = SEED,
            regression: dict | None = None) -> dict:
    """`improved`, `worse` or `inconclusive`, from a paired bootstrap of the per-query delta nDCG@10
    (`per_query`: {"base": {"ndcg@10": [...]}, "tuned": {...}}, aligned by query); the interval beside it.

    `regression` (the regression set's {dataset, base, tuned, per_query}): no significant drop there is part of the
    verdict, so an interval below zero on it makes the job `worse` whatever the evaluation set says."""
    main = _main_verdict(base, tuned, per_query, resamples, seed)
    if regression is None:
        return main
    check = regression_check(regression, resamples, seed)
    if check["outcome"] != "worse":
        return {**main, "regression": check}
    reason = (f"regression: the tuned model ranks the regression set {check['dataset']} worse than the base model "
              f"(nDCG@10 {check['base']['ndcg@10']:.4f} -> {check['tuned']['ndcg@10']:.4f}, "
              f"{format_interval(check['interval'])}); it lost general retrieval ability: lower "
              "optimizer.learning_rate, train fewer steps, or mix general data in")
    warning = "; ".join(w for w in (main["warning"], reason) if w)
    return {**main, "outcome": "worse", "evaluation_outcome": main["outcome"], "warning": warning, "regression": check}


def regression_check(regression: dict, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """The regression set's own paired bootstrap: its interval and whether it shows a drop (`worse`)."""
    pq = regression["per_query"]
    ci = paired_bootstrap(pq["base"]["ndcg@10"], pq["tuned"]["ndcg@10"], resamples=resamples, seed=seed)
    return {"dataset": regression["dataset"], "queries": len(pq["base"]["ndcg@10"]),
            "documents": regression.get("documents"), "base": regression["base"], "tuned": regression["tuned"],
            "outcome": verdict_of(ci), "interval": ci}


def _main_verdict(base: dict, tuned: dict, per_query: dict | None, resamples: int, seed: int) -> dict:
    if per_query is None:
        raise ValueError("the verdict needs each query's nDCG@10 for base and tuned (per_query)")
    ci = paired_bootstrap(per_query["base"]["ndcg@10"], per_query["tuned"]["ndcg@10"], resamples=resamples, seed=seed)
    outcome = verdict_of(ci)
    warning = note = None
    if outcome == "worse":
        warning = ("overfitting: the tuned model ranks held-out data worse than the base model "
                   f"(nDCG@10 {base['ndcg@10']:.4f} -> {tuned['ndcg@10']:.4f}, {format_interval(ci)}); lower "
                   "optimizer.learning_rate, train fewer steps, or add data before serving it")
    elif outcome == "inconclusive":
        n = ci["queries_to_settle"]
        note = ("the interval includes 0: this evaluation set cannot tell the two models apart"
                + (f"; about {n} queries (n * (1.96 * se / |delta|)^2, at this per-query spread) would settle a delta "
                   f"of {signed(ci['delta'])}" if n else "; the two rank every query alike"))
    return {"outcome": outcome, "delta_ndcg@10": tuned["ndcg@10"] - base["ndcg@10"], "interval": ci,
            "warning": warning, "note": note}


def write_report(out_dir: Path, final: dict, extra: dict) -> dict:
    ev = final["eval"]
    report = {"dataset": ev["dataset"], "queries": ev["queries"], "documents": ev["documents"],
              "base": ev["base"], "tuned": ev["tuned"], "verdict": verdict(ev["base"], ev["tuned"], ev["per_query"], regression=ev.get("regression")),
              "per_query": ev["per_query"], **({"regression": ev["regression"]} if ev.get("regression") else {}), **({"card": ev["card"]} if ev.get("card") else {}),
              "validation": {"loss": final["val_loss"], **ev["validation"]},
              "training": {"final_loss": final["loss"], "steps": final["step"], "train_examples": final["train_examples"],
                           "validation_examples": final["validation_examples"], "device": final["device"],
                           "resumed_from_step": final.get("resumed_from_step"),
                           "train_seconds": final.get("train_seconds"), "examples_per_s": final.get("train_examples_per_s")},
              **extra}
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2))
    plot(out_dir / "eval.png", ev["base"], ev["tuned"], ev["dataset"])
    if report.get("card"):
        plot_card(out_dir / "card.png", report["card"], "/".join(Path(str(ev["dataset"])).parts[-2:]))
    return report


def plot(path: Path, base: dict, tuned: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = range(len(SHOWN))
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    ax.bar([x - 0.2 for x in xs], [base[m] for m in SHOWN], width=0.4, label="base")
    ax.bar([x + 0.2 for x in xs], [tuned[m] for m in SHOWN], width=0.4, label="tuned")
    for x, m in zip(xs, SHOWN):
        ax.text(x + 0.2, tuned[m] + 0.01, f"{tuned[m] - base[m]:+.3f}", ha="center", fontsize=7)
    ax.set_xticks(list(xs), SHOWN)
    ax.set_ylim(0, 1.08)
    ax.set_title(f"base vs tuned on {'/'.join(Path(title).parts[-2:]) or title}", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def summary(report: dict) -> str:
    lines = [f"evaluation on {report['dataset']} ({report['queries']} queries, {report['documents']} documents)",
             f"{'metric':<12}{'base':>9}{'tuned':>9}{'delta':>9}"]
    for m in SHOWN:
        b, t = report["base"][m], report["tuned"][m]
        lines.append(f"{m:<12}{b:>9.4f}{t:>9.4f}{t - b:>+9.4f}")
    v = report["verdict"]
    lines.append(verdict_line(v["outcome"], v["delta_ndcg@10"], v.get("interval")))
    if v.get("regression"):
        lines.append(regression_line(v["regression"]))
    if v.get("note"):
        lines.append(f"note: {v['note']}")
    if v.get("warning"):
        lines.append(f"WARNING: {v['warning']}")
    if report.get("card"):
        lines.append(card_table(report["card"]))
    return "\n".join(lines)

