"""The job's evaluation report: base vs tuned metrics, a verdict with an overfitting warning, a PNG chart."""

from __future__ import annotations

import json
from pathlib import Path

SHOWN = ("ndcg@10", "recall@1", "recall@5", "recall@10", "recall@100", "mrr@10")
UNCHANGED_BAND = 0.005  # |delta nDCG@10| below this is noise at the eval sizes we use


def verdict(base: dict, tuned: dict) -> dict:
    delta = tuned["ndcg@10"] - base["ndcg@10"]
    if abs(delta) < UNCHANGED_BAND:
        outcome, warning = "unchanged", None
    elif delta > 0:
        outcome, warning = "improved", None
    else:
        outcome = "worse"
        warning = ("overfitting: the tuned model ranks held-out data worse than the base model "
                   f"(nDCG@10 {base['ndcg@10']:.4f} -> {tuned['ndcg@10']:.4f}); lower optimizer.learning_rate, "
                   "train fewer steps, or add data before serving it")
    return {"outcome": outcome, "delta_ndcg@10": delta, "warning": warning}


def write_report(out_dir: Path, final: dict, extra: dict) -> dict:
    ev = final["eval"]
    report = {"dataset": ev["dataset"], "queries": ev["queries"], "documents": ev["documents"],
              "base": ev["base"], "tuned": ev["tuned"], "verdict": verdict(ev["base"], ev["tuned"]),
              "validation": {"loss": final["val_loss"], **ev["validation"]},
              "training": {"final_loss": final["loss"], "steps": final["step"], "train_examples": final["train_examples"],
                           "validation_examples": final["validation_examples"], "device": final["device"],
                           "resumed_from_step": final.get("resumed_from_step"),
                           "train_seconds": final.get("train_seconds"), "examples_per_s": final.get("train_examples_per_s")},
              **extra}
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2))
    plot(out_dir / "eval.png", ev["base"], ev["tuned"], ev["dataset"])
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
    lines.append(f"verdict: {v['outcome']}" + (f"\nWARNING: {v['warning']}" if v["warning"] else ""))
    return "\n".join(lines)
