"""What the control plane knows about a model's proof: the job's evaluation (the verdict with its interval, the
report card) as eval.json reports it, and a deployment's verification of the model it serves."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, Field


class Interval(BaseModel):
    """A paired-bootstrap interval of the per-query delta nDCG@10 (rayembed.stats.paired_bootstrap)."""

    delta: float
    low: float
    high: float
    confidence: float = 0.95
    se: float | None = None
    queries: int
    better: int
    worse: int
    unchanged: int
    resamples: int
    seed: int
    queries_to_settle: int | None = None

    def text(self) -> str:
        from rayembed.stats import format_interval

        return format_interval(self.model_dump())


class CardCell(BaseModel):
    dims: int
    precision: Literal["float32", "int8", "binary"]
    bytes_per_vector: int
    mb_per_million_docs: float
    base: dict[str, float] | None = None
    tuned: dict[str, float] | None = None
    delta: Interval | None = Field(None, description="float32 only: tuned against base at this size")


class ReportCard(BaseModel):
    """Quality at every Matryoshka size x vector precision, with the bytes each costs (train.report_card)."""

    sizes: list[int]
    precisions: list[str]
    documents: int
    queries: int
    methods: dict[str, str] = Field(default_factory=dict)
    rows: list[CardCell]
    suggested: dict[str, Any] = Field(default_factory=dict)
    seconds: float | None = None


class RegressionCheck(BaseModel):
    """Base vs tuned on the job's regression set (text outside its domain): a drop there, its interval below zero,
    makes the job's verdict `worse`."""

    dataset: str
    queries: int
    documents: int | None = None
    base: dict[str, float]
    tuned: dict[str, float]
    outcome: Literal["improved", "inconclusive", "worse"]
    interval: Interval

    def text(self) -> str:
        from rayembed.stats import regression_line

        return regression_line(self.model_dump())


class Evaluation(BaseModel):
    """Base vs tuned on the job's evaluation set, as the job's eval.json reports it: the verdict comes from the
    interval (`improved` above zero, `worse` below, else `inconclusive`); reports written before it carry a point
    verdict (`unchanged` within a fixed band) and no interval."""

    dataset: str
    queries: int
    documents: int
    base: dict[str, float]
    tuned: dict[str, float]
    verdict: Literal["improved", "inconclusive", "worse", "unchanged"]
    delta_ndcg_at_10: float
    interval: Interval | None = None
    warning: str | None = None
    note: str | None = None
    card: ReportCard | None = None
    regression: RegressionCheck | None = Field(None, description="the regression set's own figure, when the job named one")
    evaluation_outcome: str | None = Field(None, description="the evaluation set's verdict, where the regression set "
                                           "turned the job's verdict to worse")

    @classmethod
    def from_report(cls, report: dict) -> "Evaluation":
        v = report["verdict"]
        return cls(dataset=str(report["dataset"]), queries=report["queries"], documents=report["documents"],
                   base=report["base"], tuned=report["tuned"], verdict=v["outcome"],
                   delta_ndcg_at_10=v["delta_ndcg@10"], interval=v.get("interval"), warning=v.get("warning"),
                   note=v.get("note"), card=report.get("card"), regression=v.get("regression"),
                   evaluation_outcome=v.get("evaluation_outcome"))

    def figure(self) -> str:
        """`+0.016 (95% CI 0.000 to +0.036, 100 queries)`, or the bare delta of a report that has no interval."""
        return self.interval.text() if self.interval else f"{self.delta_ndcg_at_10:+.4f}, no interval"

    def served_figure(self, dims: int | None, full: int | None = None) -> float | None:
        """The job's tuned nDCG@10 at `dims` (float32: the card's row, or the headline at the full size `full`);
        None when the report has no figure at that size."""
        if dims is None or dims == full:
            return self.tuned["ndcg@10"]
        for cell in self.card.rows if self.card else []:
            if cell.dims == dims and cell.precision == "float32" and cell.tuned:
                return cell.tuned["ndcg@10"]
        return None

    def summary(self) -> str:
        line = (f"nDCG@10 base {self.base['ndcg@10']:.4f} -> tuned {self.tuned['ndcg@10']:.4f} "
                f"({self.figure()}) on {self.dataset}: {self.verdict}")
        return line + (f"; {self.regression.text()}" if self.regression else "")


class Verification(BaseModel):
    """The job's evaluation set scored through a generation's own replicas (cluster/verify.py)."""

    ndcg_at_10: float | None = Field(None, description="nDCG@10 of the served graph")
    expected: float | None = Field(None, description="the job's tuned nDCG@10 at these dims (float32, PyTorch)")
    delta: float | None = Field(None, description="served - expected")
    tolerance: float | None = Field(None, description="the largest shortfall allowed for this precision")
    graph: str | None = None
    precision: str | None = None
    dims: int | None = None
    queries: int = 0
    documents: int = 0
    passed: bool
    reason: str
    model: str | None = None
    generation: int | None = None
    seconds: float | None = None
    at: float = Field(default_factory=lambda: round(time.time(), 3))
