"""Sweep outputs: the table (printed, results.md, results.json), the winner against the base with its interval, and a
plot of nDCG@10 against lr."""

from __future__ import annotations

import json
from pathlib import Path

from rayembed.stats import regression_line, verdict_line


def table(summary: dict) -> str:
    best_lr = (summary.get("best") or {}).get("lr")
    lines = ["| lr | status | val nDCG@10 | val Recall@10 | final loss | val loss | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    fmt = lambda v, p=4: "-" if v is None else f"{v:.{p}f}"
    for t in summary["trials"]:
        mark = " (best)" if t["lr"] == best_lr else (" (extension)" if t["extension"] else "")
        status = t["status"] if t["status"] == "ok" else f"failed: {t['error']}"
        lines.append(f"| {t['lr']:.3g}{mark} | {status} | {fmt(t['ndcg'])} | {fmt(t['recall'])} | {fmt(t['loss'])} "
                     f"| {fmt(t['val_loss'])} | {fmt(t['seconds'], 0)} |")
    return "\n".join(lines)


def plot(path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [t for t in summary["trials"] if t["status"] == "ok" and t["ndcg"] is not None]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot([t["lr"] for t in ok], [t["ndcg"] for t in ok], "o-", label="trials")
    if summary.get("best"):
        ax.plot([summary["best"]["lr"]], [summary["best"]["ndcg"]], "r*", markersize=14, label="best")
    for t in summary["trials"]:
        if t["status"] != "ok":
            ax.axvline(t["lr"], color="grey", linestyle=":", label="failed")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("validation nDCG@10")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def winner_line(summary: dict) -> str | None:
    """The promoted winner against the base model on the job's evaluation set, with its interval (validation nDCG@10
    picks the winner; this says whether the winner beats the base)."""
    report = summary.get("winner_report")
    if not report:
        return None
    v = report["verdict"]
    line = "winner against the base model: " + verdict_line(v["outcome"], v["delta_ndcg@10"], v.get("interval")).removeprefix("verdict: ")
    return line + (f"\n{regression_line(v['regression'])}" if v.get("regression") else "")


def write_outputs(out: Path, summary: dict) -> None:
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    text = table(summary)
    if winner_line(summary):
        text += "\n\n" + winner_line(summary)
    (out / "results.md").write_text(text + "\n")
    plot(out / "sweep.png", summary)
    print(text)
    best = summary.get("best")
    print(f"best: lr {best['lr']:.3g} (val nDCG@10 {best['ndcg']:.4f}); config: {out / 'best_job.yaml'}" if best
          else "no trial succeeded")
