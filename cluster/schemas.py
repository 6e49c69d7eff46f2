"""The management API's wire types: what each route accepts and answers, as /openapi.json documents them.

Requests: the control plane validates every body with these models (after the checks that give the common mistakes
their own message), so the documented schema is the one enforced. Answers: the API ingress passes each entity
through its `*Out` model (times as ISO 8601 UTC, nothing undocumented), and the client returns the same models.
Lists are paged: `page`, `page_size`, `sort`, a `status` filter (jobs: `kind` too), and a `pagination` object with totals.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from cluster.entities import (NAME_PATTERN, Artifact, Batching, DatasetFile, DeploymentStatus, Evaluation, JobProgress,
                              JobStatus, Verification)
from serve.settings import Autoscaling

NAME_DOC = "2-63 characters of lowercase letters, digits and '-', starting with a letter or digit"
Name = Field(pattern=NAME_PATTERN, min_length=2, max_length=63, description=NAME_DOC)


class Wire(BaseModel):
    """A request body: unknown fields are refused (a typo is an error, not a silently ignored setting)."""

    model_config = ConfigDict(extra="forbid")


class Answer(BaseModel):
    """An answer: readable as `obj.status` and, for scripts written against JSON, `obj["status"]`."""

    model_config = ConfigDict(extra="ignore")

    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


# ---------------------------------------------------------------- requests
class WorkspaceCreate(Wire):
    name: str = Field(pattern=NAME_PATTERN, description=NAME_DOC, examples=["search-team"])
    description: str = Field("", max_length=4096)


class ModelCreate(Wire):
    """Exactly one of `base_model` (exported to ONNX once, as a Ray job) or `artifact` (an ONNX folder rayembed wrote)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"name": "minilm", "base_model": "all-MiniLM-L6-v2"},
        {"name": "nemotron-base", "base_model": "/models/llama-nemotron-embed-1b-v2", "description": "the 1B base"}]})

    name: str = Field(pattern=NAME_PATTERN, description=NAME_DOC)
    base_model: str | None = Field(None, description="a Hugging Face folder (or a storage URI to one), a Hub-layout "
                                   "nemotron folder, or all-MiniLM-L6-v2 (the packaged model)")
    artifact: str | None = Field(None, description="an ONNX folder written by `python -m train.export` or a job's onnx/")
    description: str = Field("", max_length=4096)


class DatasetCreate(Wire):
    """An empty dataset; its files are uploaded with PUT .../datasets/{name}/files/{path}."""

    name: str = Field(pattern=NAME_PATTERN, description=NAME_DOC, examples=["debian"])
    description: str = Field("", max_length=4096)


JOB_EXAMPLE = {"output_model": "minilm-tuned", "config": {
    "model": {"name_or_path": "all-MiniLM-L6-v2"}, "dataset": {"name": "debian"},
    "optimizer": {"learning_rate": 5e-6}, "schedule": {"epochs": 1}}}


class JobCreate(Wire):
    """Exactly one of `config` (a training job) or `sweep` (a learning-rate sweep around a job)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [JOB_EXAMPLE]})

    output_model: str = Field(pattern=NAME_PATTERN, description="the model entity the job creates when it succeeds "
                              f"({NAME_DOC})")
    config: dict[str, Any] | None = Field(None, description="a training job config (docs/config.md); "
                                          "`dataset: {name: ...}` reads an uploaded dataset")
    sweep: dict[str, Any] | None = Field(None, description="a sweep config: `job` (a training job config) and "
                                         "the learning rates to try (docs/config.md)")


Precision = Literal["auto", "fp32", "fp16", "optimized", "int8"]


class DeploymentSettings(Wire):
    """How a model is served: replicas (or autoscaling), resources per replica, batching, which graph."""

    num_replicas: int = Field(1, ge=1)
    autoscaling: Autoscaling | None = None
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    batching: Batching = Batching()
    default_input_type: Literal["query", "passage"] | None = None
    precision: Precision = "auto"
    default_dimensions: int | None = Field(None, ge=1, description="dimensions when a request omits them: one of the "
                                           "model's sizes (its report card suggests one)")
    require_improved: bool = Field(False, description="refuse a model unless its job's 95% interval lies above zero "
                                   "(allow_worse overrides)")
    verify: bool = Field(True, description="score the job's evaluation set through the new replicas before routing")


class DeploymentConfigCreate(DeploymentSettings):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"name": "minilm-2", "model": "minilm", "num_replicas": 2}]})

    name: str = Field(pattern=NAME_PATTERN, description=NAME_DOC)
    model: str = Field(pattern=NAME_PATTERN, description="a ready model entity in the same workspace")


class DeploymentConfigUpdate(Wire):
    """The fields to change; a new version of the config is stored (deployments move to it when updated)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"num_replicas": 3}]})

    model: str | None = Field(None, pattern=NAME_PATTERN)
    num_replicas: int | None = Field(None, ge=1)
    autoscaling: Autoscaling | None = None
    num_cpus: float | None = Field(None, ge=0)
    num_gpus: float | None = Field(None, ge=0)
    batching: Batching | None = None
    default_input_type: Literal["query", "passage"] | None = None
    precision: Precision | None = None
    default_dimensions: int | None = Field(None, ge=1)
    require_improved: bool | None = None
    verify: bool | None = None


class DeploymentCreate(DeploymentConfigUpdate):
    """Either `config` (a stored deployment config) or `model` and inline settings (a config of the deployment's
    name, owned by it)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"name": "minilm", "model": "minilm"}, {"name": "tuned", "config": "minilm-2", "allow_worse": False}]})

    name: str = Field(pattern=NAME_PATTERN, description=NAME_DOC)
    config: str | None = Field(None, pattern=NAME_PATTERN, description="a deployment config in the same workspace")
    model: str | None = Field(None, pattern=NAME_PATTERN, description="a ready model entity (inline settings)")
    allow_worse: bool = Field(False, description="deploy a model its own job found worse than its base")


class DeploymentUpdate(DeploymentConfigUpdate):
    """Another model, another config, or changed settings: a new generation starts beside the serving one and the
    routes move once it answers (a zero-downtime swap)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"model": "minilm-tuned"}]})

    config: str | None = Field(None, pattern=NAME_PATTERN)
    allow_worse: bool | None = None


# ---------------------------------------------------------------- answers
class StatusChangeOut(Answer):
    status: str
    reason: str = ""
    at: datetime


class QuotaOut(Answer):
    max_active_jobs: int
    max_replicas: int
    max_cpus_per_deployment: float
    max_gpus_per_deployment: float
    max_storage_gib: float


class WorkspaceOut(Answer):
    name: str
    description: str = ""
    uid: str = Field("", description="the id of its folder in the storage root")
    data_grants: list[str] = Field(default_factory=list, description="where its jobs may read besides its datasets "
                                   "(set by the operator)")
    quota: QuotaOut | None = Field(None, description="its limits (set by the operator)")
    require_improved: bool = Field(False, description="its deployments serve only improved models (set by the operator)")
    created_at: datetime
    updated_at: datetime


class EntityOut(Answer):
    workspace: str
    name: str
    created_at: datetime
    updated_at: datetime


class ModelOut(EntityOut):
    status: Literal["exporting", "ready", "failed"]
    error: str | None = None
    base_model: str
    artifact: Artifact | None = None
    parameter_count: int | None = None
    precision: str
    embedding_dim: int | None = None
    matryoshka_dims: list[int] = []
    max_seq_length: int | None = None
    prefixes: dict[str, str] = {}
    evaluation: Evaluation | None = None
    source_job: str | None = None
    description: str = ""


class DatasetOut(EntityOut):
    description: str = ""
    uri: str
    files: dict[str, DatasetFile] = {}
    uploading: dict[str, float] = Field(default_factory=dict, description="files being uploaded -> since when")
    uploading_bytes: dict[str, int] = Field(default_factory=dict, description="files being uploaded -> the size each "
                                            "declared (counted against the storage quota meanwhile)")


class JobOut(EntityOut):
    kind: Literal["training", "sweep"]
    spec: dict[str, Any]
    output_model: str
    status: JobStatus
    status_history: list[StatusChangeOut] = []
    progress: JobProgress
    ray_job_id: str | None = None
    output_dir: str
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    result: dict[str, Any] | None = None
    gpu_estimate: dict[str, Any] | None = None
    warnings: list[str] = []
    by_operator: bool = Field(False, description="created by the operator over Ray; a tenant's job is checked again "
                              "against the workspace's rights when it is resumed")


class JobStatusOut(Answer):
    name: str
    status: JobStatus
    progress: JobProgress
    status_history: list[StatusChangeOut] = []
    error: str | None = None
    output_model: str
    started_at: datetime | None = None
    finished_at: datetime | None = None
    warnings: list[str] = []


class DeploymentConfigOut(EntityOut):
    version: int
    model: str
    num_replicas: int
    autoscaling: Autoscaling | None = None
    num_cpus: float
    num_gpus: float
    batching: Batching
    default_input_type: Literal["query", "passage"] | None = None
    precision: Precision
    default_dimensions: int | None = None
    require_improved: bool = False
    verify: bool = True


class DeploymentConfigDetail(DeploymentConfigOut):
    versions: list[DeploymentConfigOut] = Field([], description="every version, oldest first")


class DeploymentOut(EntityOut):
    config: str
    config_version: int
    model: str
    status: DeploymentStatus
    status_history: list[StatusChangeOut] = []
    generation: int
    app: str | None = None
    pending_app: str | None = None
    pending_model: str | None = None
    pending_since: datetime | None = None
    serving_config: str | None = Field(None, description="the config the serving generation was started from")
    serving_config_version: int | None = Field(None, description="... and its version")
    retiring: dict[str, datetime] = Field({}, description="old generations -> when they are deleted")
    allow_worse: bool = False
    owns_config: bool = False
    error: str | None = None
    verification: Verification | None = None


class ProviderOut(EntityOut):
    deployment: str
    model: str
    app: str
    embedding_dim: int | None = None
    routes: dict[str, str] = {}


class Deleted(Answer):
    name: str
    deleted: bool = True


class ErrorBody(BaseModel):
    message: str = Field(description="what went wrong and what to change")
    type: str = Field(description="invalid_request_error, not_found_error, conflict_error, ...")
    param: str | None = Field(None, description="the field or parameter at fault")
    code: str | None = None


class ErrorEnvelope(BaseModel):
    """Every error, on every route (the OpenAI envelope)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"error": {
        "message": "model 'nope' does not exist in workspace 'default'", "type": "not_found_error",
        "param": None, "code": "not_found"}}]})

    error: ErrorBody


class Pagination(Answer):
    page: int = Field(description="this page, from 1")
    page_size: int = Field(description="the most items a page holds")
    current_page_size: int = Field(description="the items on this page")
    total_pages: int
    total_results: int = Field(description="the items that match the filter, on every page")


T = TypeVar("T", bound=BaseModel)


class Page(Answer, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    pagination: Pagination
    sort: str
    filter: dict[str, str] = Field({}, description="the filters applied")


PAGE_SIZE = 10
MAX_PAGE_SIZE = 1000
MAX_PAGE = 1_000_000  # a page number past any list (and within a JSON integer every client parses)
SORTS = ("created_at", "-created_at", "updated_at", "-updated_at", "name", "-name")


def page_of(items: list[dict], page: int, page_size: int, sort: str, status: str | None,
            where: dict[str, str | None] | None = None) -> dict:
    """One page of `items` (the control plane's dicts, every one of them): filtered by status (and by `where`'s
    fields: a job's kind), sorted, sliced."""
    where = {k: v for k, v in (where or {}).items() if v is not None}
    if status is not None:
        items = [i for i in items if str(i.get("status", "")).lower() == status.lower()]
    for field, value in where.items():
        items = [i for i in items if str(i.get(field, "")).lower() == value.lower()]
    key = sort.lstrip("-")
    items = sorted(items, key=lambda i: (i.get(key) is None, i.get(key) or 0, i.get("name", "")),
                   reverse=sort.startswith("-"))
    total = len(items)
    chunk = items[(page - 1) * page_size: page * page_size]
    return {"object": "list", "data": chunk, "sort": sort,
            "filter": {**({"status": status} if status is not None else {}), **where},
            "pagination": {"page": page, "page_size": page_size, "current_page_size": len(chunk),
                           "total_pages": max(1, math.ceil(total / page_size)), "total_results": total}}
