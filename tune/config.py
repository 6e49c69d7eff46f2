"""The sweep's config: a training job plus a search over the learning rate (frozen pydantic, YAML in)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, model_validator

from rayembed import storage
from rayembed.config import ConfigError, Section, load
from train.config import JobConfig, validate_config

DEFAULT_GRID = [5e-6, 1e-5, 2e-5]


class Search(Section):
    mode: Literal["grid", "loguniform"] = Field("grid", description="grid: learning_rates (+ extension); loguniform: num_samples draws between the bounds.")
    learning_rates: list[Annotated[float, Field(gt=0)]] = Field(min_length=1, default_factory=lambda: list(DEFAULT_GRID), description="Grid points (default around the card's 5e-6).")
    extend: bool = Field(True, description="When the best point is an end of the grid, try one step further that way.")
    extension_factor: float = Field(2.5, gt=1, description="Step of an extension: x factor above the top, / factor below the bottom.")
    max_extensions: int = Field(2, ge=0, description="Extensions at most.")
    min_learning_rate: float = Field(1e-7, gt=0, description="No extension (or sample) below this.")
    max_learning_rate: float = Field(2e-4, gt=0, description="No extension (or sample) above this.")
    num_samples: int = Field(8, gt=0, description="Draws in loguniform mode.")

    @model_validator(mode="after")
    def _points(self) -> "Search":
        if self.min_learning_rate >= self.max_learning_rate:
            raise ValueError("search.min_learning_rate must be below search.max_learning_rate")
        return self


class SweepOutput(Section):
    dir: str = Field(json_schema_extra={"place": "write"}, description="Sweep directory: trials/, results.json, results.md, sweep.png, best_job.yaml.")


class SweepConfig(Section):
    job: JobConfig = Field(description="The training job every trial runs (its optimizer.learning_rate is swept).")
    search: Search = Search()
    trial_evaluation: Literal["validation", "job"] = Field("validation", description="Trials score on the validation split (fast); 'job' also runs the job's evaluation set in every trial.")
    promote_winner: bool = Field(False, description="Run the winning learning rate as the full job (merge, export, eval vs base) into <dir>/winner.")
    output: SweepOutput


def inline_job(raw: dict, path: Path | None) -> dict:
    """`job:` may be a path to a job YAML, relative to the sweep file."""
    if isinstance(raw.get("job"), str) and path is not None:
        job_path = Path(raw["job"]) if Path(raw["job"]).is_absolute() else path.parent / raw["job"]
        if not job_path.is_file():
            raise ConfigError([f"job: {job_path} does not exist"])
        raw["job"] = yaml.safe_load(job_path.read_text())
    return raw


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    return load(SweepConfig, path, overrides, prepare=inline_job)


def trial_job(sweep: SweepConfig, lr: float) -> JobConfig:
    """The job one trial runs: the sweep's job at this learning rate, in its own directory."""
    raw = sweep.job.model_dump(mode="json")
    raw["optimizer"]["learning_rate"] = lr
    raw["name"] = f"{sweep.job.name}-lr{lr:.3g}"
    raw["output"]["dir"] = storage.join(sweep.output.dir, "trials", f"lr{lr:.3g}")
    raw["output"]["storage_path"] = None
    if sweep.trial_evaluation == "validation":
        raw["dataset"]["evaluation"] = None
        raw["dataset"]["regression"] = None  # the promoted winner's own job scores it (tune/report.py)
    return validate_config(raw)
