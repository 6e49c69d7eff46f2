"""The control plane's entities (pydantic): workspaces, model entities, customization jobs,
deployment configs, deployments and providers. Stored as JSON documents by `cluster.store`."""

from __future__ import annotations

import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.evaluation import CardCell, Evaluation, Interval, ReportCard, Verification  # noqa: F401 - entities
from rayembed import storage
from serve.settings import Autoscaling  # the provider's own section: one definition, one min <= max check

NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{1,62}$"
NAME = re.compile(NAME_PATTERN)
DEFAULT_WORKSPACE = "default"

JobStatus = Literal["created", "pending", "running", "completed", "failed", "cancelled"]
JOB_DONE = ("completed", "failed", "cancelled")
DeploymentStatus = Literal["CREATED", "PENDING", "READY", "FAILED", "DELETING"]


def now() -> float:
    return round(time.time(), 3)


class Entity(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workspace: str = DEFAULT_WORKSPACE
    name: str
    created_at: float = Field(default_factory=now)
    updated_at: float = Field(default_factory=now)

    def touched(self, **changes: Any) -> "Entity":
        return self.model_copy(update={**changes, "updated_at": now()})


class Quota(BaseModel):
    """What one workspace may hold and run at once; the operator sets it (`rayembed workspaces quota`)."""

    model_config = ConfigDict(extra="forbid")

    max_active_jobs: int = Field(2, ge=0, description="customization jobs not yet finished (and model exports)")
    max_replicas: int = Field(8, ge=0, description="replicas over all its deployments (autoscaling: their maximum)")
    max_cpus_per_deployment: float = Field(8.0, ge=0, description="num_cpus x replicas of one deployment")
    max_gpus_per_deployment: float = Field(1.0, ge=0, description="num_gpus x replicas of one deployment")
    max_storage_gib: float = Field(20.0, ge=0, description="what it holds in storage: its datasets' files, its "
                                   "jobs' folders (checkpoints, outputs) and its models' folders")


class Workspace(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    uid: str = Field("", description="its folder's id in the storage root, never reused ('' for a workspace made "
                     "before ids: its folder is workspaces/<name>)")
    data_grants: list[str] = Field(default_factory=list, description="locations outside the storage root its jobs "
                                   "may read (set by the operator)")
    quota: Quota = Field(default_factory=Quota)
    require_improved: bool = Field(False, description="deploy only models whose job's 95% interval lies above zero, "
                                   "whatever their deployment config says (set by the operator; a request's "
                                   "allow_worse still overrides it, and the deployment records that)")
    created_at: float = Field(default_factory=now)
    updated_at: float = Field(default_factory=now)


class ApiKey(BaseModel):
    """An API key's record: its SHA-256 only (the key itself is shown once, when created)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    sha256: str
    workspaces: list[str]  # ["*"]: every workspace, and creating/deleting workspaces
    label: str = ""
    created_at: float = Field(default_factory=now)

    def public(self) -> dict:
        return self.model_dump(mode="json", exclude={"sha256"})


class Artifact(BaseModel):
    """Where a model's files live in the storage root (a URI, or a path where storage is a local folder), and
    the digest of the published ONNX folder that replicas verify when they materialize it."""

    uri: str = Field(description="the published ONNX artifact folder (model.onnx, tokenizer, manifest.json)")
    sha256: str | None = Field(None, description="the ONNX folder's digest (its seal); None while it is being exported")
    hf_uri: str | None = Field(None, description="the merged Hugging Face folder (None for a base model)")

    @model_validator(mode="before")
    @classmethod
    def _stored_before_uris(cls, data: Any) -> Any:
        """Entities stored by rayembed before storage URIs named the folders onnx_dir and hf_dir."""
        if isinstance(data, dict) and "onnx_dir" in data:
            data = {**{k: v for k, v in data.items() if k not in ("onnx_dir", "hf_dir")},
                    "uri": data["onnx_dir"], "hf_uri": data.get("hf_dir")}
        return data


# a dataset's files: the upload path -> the job config key it fills (the evaluation files make one BEIR folder)
DATASET_FILES = {"training.jsonl": "training", "validation.jsonl": "validation",
                 "evaluation/corpus.jsonl": "evaluation", "evaluation/queries.jsonl": "evaluation",
                 "evaluation/qrels/test.tsv": "evaluation"}


class DatasetFile(BaseModel):
    uri: str
    bytes: int
    sha256: str
    records: int = Field(description="examples (training, validation), documents, queries or judgments")


class Dataset(Entity):
    """Files uploaded through the API into the storage root, so a client that shares no disk with the cluster
    gives a job its data: `dataset: {name: ...}` in a job config reads them."""

    description: str = ""
    uri: str = Field(description="the dataset's folder in the storage root")
    files: dict[str, DatasetFile] = Field(default_factory=dict, description="upload path -> the stored file")
    uploading: dict[str, float] = Field(default_factory=dict, description="upload path -> when its upload began "
                                        "(no job may start on the dataset meanwhile)")
    uploading_bytes: dict[str, int] = Field(default_factory=dict, description="upload path -> the size it declared "
                                            "(counted against the storage quota while it runs)")

    def job_fields(self) -> dict[str, str]:
        """The job config's dataset keys this dataset fills."""
        fields = {key: self.files[path].uri for path, key in DATASET_FILES.items() if key != "evaluation" and path in self.files}
        if all(p in self.files for p, k in DATASET_FILES.items() if k == "evaluation"):
            fields["evaluation"] = storage.join(self.uri, "evaluation")
        return fields


class ModelEntity(Entity):
    status: Literal["exporting", "ready", "failed"] = "ready"
    error: str | None = None
    base_model: str
    artifact: Artifact | None = None
    parameter_count: int | None = None
    precision: str = "fp32"
    embedding_dim: int | None = None
    matryoshka_dims: list[int] = Field(default_factory=list)
    max_seq_length: int | None = None
    prefixes: dict[str, str] = Field(default_factory=dict)
    evaluation: Evaluation | None = None
    source_job: str | None = None
    description: str = ""


class JobProgress(BaseModel):
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    examples_per_s: float | None = None
    eta_seconds: float | None = None
    percent: float = 0.0


class StatusChange(BaseModel):
    status: str
    reason: str = ""
    at: float = Field(default_factory=now)


class CustomizationJob(Entity):
    """`name` is the job id; the Ray job carries the same id as its submission id."""

    kind: Literal["training", "sweep"] = "training"
    spec: dict[str, Any] = Field(description="the training job config (or, for a sweep, the sweep config), unchanged")
    output_model: str = Field(description="model entity the job creates on success")
    status: JobStatus = "created"
    status_history: list[StatusChange] = Field(default_factory=list)
    progress: JobProgress = JobProgress()
    ray_job_id: str | None = None
    output_dir: str
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    result: dict[str, Any] | None = None
    gpu_estimate: dict[str, Any] | None = None
    warnings: list[str] = Field(default_factory=list)
    by_operator: bool = Field(False, description="created over Ray by the operator (its places are the operator's); "
                              "a tenant's job is checked again against the workspace's rights when it is resumed")


class Batching(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_batch_tokens: int = Field(8192, ge=1)
    max_batch_items: int = Field(512, ge=1)
    max_batch_texts: int = Field(32, ge=1)


class ModelDeploymentConfig(Entity):
    """Versioned: every change stores a new version; deployments record the version they run."""

    version: int = 1
    model: str = Field(description="model entity name in the same workspace")
    num_replicas: int = Field(1, ge=1)
    autoscaling: Autoscaling | None = None
    num_cpus: float = Field(1.0, gt=0, description="CPUs each replica reserves (never 0: a replica holds a core of the "
                            "node, and unreserved ones would pack onto nodes without limit)")
    num_gpus: float = Field(0.0, ge=0)
    batching: Batching = Batching()
    default_input_type: Literal["query", "passage"] | None = None
    precision: Literal["auto", "fp32", "fp16", "optimized", "int8"] = Field(
        "auto", description="which of the artifact's graphs replicas load (serve.settings.ProviderSettings.precision)")
    default_dimensions: int | None = Field(None, ge=1, description="dimensions when a request omits them")
    require_improved: bool = Field(False, description="serve only a model whose job's interval lies above zero")
    verify: bool = Field(True, description="score the job's evaluation set through the replicas before routing to them")


class ModelDeployment(Entity):
    config: str = Field(description="the ModelDeploymentConfig it runs")
    config_version: int = 1
    model: str
    status: DeploymentStatus = "CREATED"
    status_history: list[StatusChange] = Field(default_factory=list)
    generation: int = 0
    app: str | None = Field(None, description="the Serve application serving it now")
    pending_app: str | None = Field(None, description="a new generation being started (a model swap)")
    pending_model: str | None = Field(None, description="the model the pending generation serves")
    pending_since: float | None = None
    serving_config: str | None = Field(None, description="the config the serving generation (app) was started from")
    serving_config_version: int | None = Field(None, description="... and its version (a swap pending or failed "
                                               "leaves config_version elsewhere: quotas count both)")
    retiring: dict[str, float] = Field(default_factory=dict, description="old generations -> when they are deleted")
    allow_worse: bool = False
    owns_config: bool = Field(False, description="its config was created inline with it and goes with it")
    error: str | None = None
    verification: Verification | None = Field(None, description="the last verification of the served model")


class ModelProvider(Entity):
    """Exists exactly while its deployment is READY; the gateway routes to it."""

    deployment: str
    model: str
    app: str
    embedding_dim: int | None = None
    routes: dict[str, str] = Field(default_factory=dict)
