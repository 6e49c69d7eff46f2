"""The customization job's one config: a frozen pydantic model, YAML in, resolved YAML out.

Shaped like the customizer's job spec. Every field is documented; unknown keys and contradictions
are refused before any work, all problems at once, each naming its key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from rayembed import storage
from rayembed.regression import SHIPPED as SHIPPED_REGRESSION_SETS
from rayembed.config import ConfigError, Section, dump, load, validate  # noqa: F401 - ConfigError re-exported for callers

# The model card's conservative defaults.
DEFAULT_LEARNING_RATE = 5e-6
DEFAULT_WEIGHT_DECAY = 0.01
DEFAULT_TEMPERATURE = 0.02
RECOMMENDED_EXAMPLES = (5_000, 10_000)


class Prefixes(Section):
    query: str | None = Field(None, description="Prepended to queries; null = the model family's default ('query: ' for nemotron, '' otherwise).")
    passage: str | None = Field(None, description="Prepended to documents; null = the model family's default.")


class Mining(Section):
    negatives: int = Field(gt=0, le=64, description="Hard negatives mined per query with the base model; they replace neg_doc, and loss.negatives_per_query follows.")
    corpus: str | None = Field(None, json_schema_extra={"place": "read"}, description="JSONL or Parquet (a `text` field) to mine from; null = the training file's own documents.")
    max_score_ratio: float | None = Field(0.95, gt=0, le=1, description="Candidates scoring above this x the positive's score are dropped as likely false negatives (NV-Retriever's TopK-PercPos); null = no filter.")
    top_k: int | None = Field(None, gt=0, description="Candidates searched per query; null = max(30, 10 x negatives).")
    cache_dir: str | None = Field(None, json_schema_extra={"place": "write"}, description="Where mined files and the base model's ONNX export are cached by input hash; null = $RAYEMBED_HOME/mining (~/.rayembed/mining).")


class DatasetConfig(Section):
    training: str = Field(json_schema_extra={"place": "read"}, description="Training JSONL: one {query, pos_doc, neg_doc: [...]} per line.")
    validation: str | None = Field(None, json_schema_extra={"place": "read"}, description="Validation JSONL, same format; when absent a split is taken off the training file.")
    evaluation: str | None = Field(None, json_schema_extra={"place": "read"}, description="BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv) for base-vs-tuned evaluation; when absent the validation set is used.")
    regression: str | None = Field(None, json_schema_extra={"place": "read", "names": list(SHIPPED_REGRESSION_SETS)}, description="A second BEIR folder, text outside the job's domain, scored for base and tuned like the evaluation set; a drop there (its interval below zero) makes the verdict worse. `general` names the shipped set (rayembed/regression: cloud API documentation), resolved on each node that reads it; a folder of that name is ./general; null = none.")
    validation_fraction: float = Field(0.05, gt=0, lt=0.5, description="Share of training lines split off for validation when no validation file is given.")
    max_validation_examples: int = Field(500, gt=0, description="Cap on the validation split taken off the training file.")
    max_examples: int | None = Field(None, gt=0, description="Use a seeded subsample of this many training lines (after the validation split).")
    mining: Mining | None = Field(None, description="Mine hard negatives with the base model before training (cached); null = use neg_doc as given.")


class LoraConfig(Section):
    rank: int = Field(16, gt=0, description="LoRA rank r.")
    alpha: int = Field(32, gt=0, description="LoRA alpha (scale = alpha / rank).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch.")
    target_modules: list[str] | None = Field(None, description="Module names to adapt; null = the family's attention and MLP projections.")
    merge: bool = Field(True, description="Merge the adapter into the weights before export. Must be true.")

    @field_validator("merge")
    @classmethod
    def _merge_only(cls, v: bool) -> bool:
        if not v:
            raise ValueError(
                "must be true: the serving format is one ONNX graph, which cannot hold a standalone "
                "adapter; set training.lora.merge: true (the adapter is merged into the weights)"
            )
        return v


class TrainingSection(Section):
    training_type: Literal["sft"] = Field("sft", description="Supervised contrastive fine-tuning.")
    finetuning_type: Literal["all_weights", "lora_merged"] = Field("all_weights", description="Full SFT, or LoRA merged into the weights.")
    max_seq_length: int = Field(512, gt=0, le=8192, description="Tokens per text; longer texts are truncated during training.")
    lora: LoraConfig | None = Field(None, description="LoRA settings; only with finetuning_type lora_merged.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    compile: bool | Literal["auto"] = Field("auto", description="torch.compile the encoder; auto = on CUDA only. Compile time is reported apart and left out of examples/s.")
    seed: int = Field(42, description="Seed for data order, splits and initialisation.")

    @model_validator(mode="after")
    def _lora_matches_type(self) -> "TrainingSection":
        if self.lora is not None and self.finetuning_type != "lora_merged":
            raise ValueError("training.lora is set but training.finetuning_type is all_weights; set finetuning_type: lora_merged or remove lora")
        return self

    @property
    def lora_settings(self) -> LoraConfig:
        return self.lora or LoraConfig()


class Schedule(Section):
    epochs: int | None = Field(None, gt=0, description="Passes over the training set (default 1 when max_steps is not set).")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; exclusive with epochs.")

    @model_validator(mode="after")
    def _one_of(self) -> "Schedule":
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("schedule.epochs and schedule.max_steps are both set; keep one")
        return self


CPU_BUCKET_ROWS = 16  # texts per forward on CPU: 8-24 measured alike (bucket bench, docs/benchmarks.md section 2)


class Batch(Section):
    global_batch_size: int = Field(32, gt=0, description="Queries per optimizer step.")
    micro_batch_size: int | None = Field(None, gt=0, description="Queries per forward pass (gradient accumulation); null = global_batch_size.")
    length_buckets: int | Literal["auto"] | None = Field("auto", description="Texts per forward pass within a micro-batch, grouped by length and each group cut to its own longest text, so padding is not computed (same loss: padding is masked); auto = 16 on CPU, off on GPU (one wide forward keeps the GPU busy); null = off.")

    @model_validator(mode="after")
    def _divides(self) -> "Batch":
        micro = self.micro_batch_size
        if micro is not None and (micro > self.global_batch_size or self.global_batch_size % micro):
            raise ValueError(f"batch.micro_batch_size ({micro}) must divide batch.global_batch_size ({self.global_batch_size})")
        if isinstance(self.length_buckets, int) and self.length_buckets < 1:
            raise ValueError(f"batch.length_buckets must be at least 1, auto or null, not {self.length_buckets}")
        return self

    def bucket_rows(self, device_type: str) -> int | None:
        """Texts per forward pass, or None for one forward over the whole padded micro-batch."""
        if self.length_buckets == "auto":
            return None if device_type == "cuda" else CPU_BUCKET_ROWS
        return self.length_buckets

    @property
    def micro(self) -> int:
        return self.micro_batch_size or self.global_batch_size


class Optimizer(Section):
    learning_rate: float = Field(DEFAULT_LEARNING_RATE, ge=0, lt=1, description="Peak AdamW learning rate. 0: a control run that leaves the weights as they are.")
    weight_decay: float = Field(DEFAULT_WEIGHT_DECAY, ge=0, lt=1, description="AdamW weight decay (matrices only).")
    warmup_steps: int | None = Field(None, ge=0, description="Linear warm-up steps; null = 10% of the steps. Linear decay after.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")


class Loss(Section):
    temperature: float = Field(DEFAULT_TEMPERATURE, gt=0, le=1, description="Softmax temperature of the contrastive loss.")
    negatives_per_query: int = Field(1, ge=0, le=64, description="Hard negatives taken from neg_doc per query (the first ones: hardest first).")
    in_batch_negatives: bool = Field(False, description="Also contrast each query with the other queries' documents in the batch.")
    cached: bool = Field(False, description="GradCache: with micro-batches smaller than the global batch, one loss over the whole global batch (each query against every document of the step) for the activation memory of one micro-batch, at one more forward pass per micro-batch. Without it each micro-batch is its own loss, its in-batch negatives only its own queries' documents. Needs in_batch_negatives.")
    matryoshka_dims: list[int] | None = Field(None, description="Train several embedding sizes at once (e.g. [384, 768, 2048]); null = full size only.")
    matryoshka_weights: list[float] | None = Field(None, description="Loss weight per Matryoshka size; null = equal.")

    @model_validator(mode="after")
    def _dims(self) -> "Loss":
        dims, weights = self.matryoshka_dims, self.matryoshka_weights
        if dims is not None:
            if not dims or any(d <= 0 for d in dims) or len(set(dims)) != len(dims):
                raise ValueError("loss.matryoshka_dims must be distinct positive sizes")
        if weights is not None and (dims is None or len(weights) != len(dims)):
            raise ValueError("loss.matryoshka_weights needs one weight per entry of loss.matryoshka_dims")
        if self.cached and not self.in_batch_negatives:
            raise ValueError("loss.cached changes nothing without loss.in_batch_negatives: true (each query's loss "
                             "then depends on its own documents only, which plain accumulation computes exactly); "
                             "turn in_batch_negatives on or cached off")
        return self


class Output(Section):
    dir: str = Field(json_schema_extra={"place": "write"}, description="Job output directory: checkpoints/, model/, onnx/, eval.json, eval.png, config.yaml. "
                     "A storage URI (s3://bucket/prefix/job) works too: the job writes in node-local scratch and "
                     "publishes there.")
    storage_path: str | None = Field(None, json_schema_extra={"place": "write"}, description="Ray Train storage for checkpoints (local dir or pyarrow.fs URI); null = <dir>/checkpoints.")
    checkpoint_every_steps: int = Field(200, gt=0, description="Save a resumable checkpoint every N optimizer steps.")
    keep_checkpoints: int = Field(2, gt=0, description="Checkpoints kept on storage.")
    log_every_steps: int = Field(10, gt=0, description="Print loss, lr, examples/s, tokens/s every N steps (sent to Ray Train at most every 5 s).")
    export_fp16: bool = Field(False, description="Also write onnx/model.fp16.onnx for GPU serving.")
    export_int8: bool = Field(False, description="Also write onnx/model.int8.onnx for CPU replicas (dynamic int8, "
                              "served with precision: int8), kept only when it passes the parity gate and, with "
                              "dataset.evaluation, loses at most 0.005 nDCG@10; a failed gate is reported, not fatal.")
    onnx_opset: int = Field(18, ge=17, description="ONNX opset of the exported graph.")


class Resources(Section):
    use_gpu: bool | Literal["auto"] = Field("auto", description="Train on a GPU worker; auto = when the Ray cluster has one.")
    cpus_per_worker: int = Field(1, gt=0, description="CPUs reserved for the training worker.")
    torch_threads: int | None = Field(None, gt=0, description="Intra-op threads on CPU; null = the cores this process may use.")
    max_failures: int = Field(3, ge=0, description="Worker failures survived by resuming from the last checkpoint.")
    worker_resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources the training "
                                               "worker also reserves, to steer it to labelled nodes (e.g. {trainer: 1} "
                                               "for nodes started with --resources '{\"trainer\": 1}').")

    @field_validator("worker_resources")
    @classmethod
    def _custom_resources_only(cls, value: dict[str, float]) -> dict[str, float]:
        """Ray's own resources have their fields (cpus_per_worker, use_gpu); a node:ADDRESS resource would pin the
        worker to one node (the head's included) by address."""
        for key, amount in value.items():
            if key in ("CPU", "GPU", "TPU", "HPU", "NPU", "neuron_cores", "memory", "object_store_memory") or "_group_" in key:
                raise ValueError(f"{key!r} is Ray's own resource: set resources.cpus_per_worker or resources.use_gpu")
            if key.startswith(("node:", "accelerator_type:")):
                raise ValueError(f"{key!r} pins the worker to a node by address or type: start the nodes meant for "
                                 "training with a custom resource (ray start --resources '{\"trainer\": 1}') and "
                                 "name that")
            if not 0 < amount < float("inf"):
                raise ValueError(f"{key!r}: {amount} must be a positive number")
        return value


class JobConfig(Section):
    model: str = Field(json_schema_extra={"place": "model"}, description="Base model: a local Hugging Face directory, a Hub id, or all-MiniLM-L6-v2 (packaged).")
    name: str = Field("rayembed-job", pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$", max_length=128,
                      description="Job name (Ray Train run name: a folder under the checkpoints' storage path, so it "
                      "does not start with a dot).")
    prefixes: Prefixes = Prefixes()
    dataset: DatasetConfig
    training: TrainingSection = TrainingSection()
    schedule: Schedule = Schedule()
    batch: Batch = Batch()
    optimizer: Optimizer = Optimizer()
    loss: Loss = Loss()
    precision: Literal["bf16-mixed", "fp32"] = Field("bf16-mixed", description="bf16 autocast on GPU; CPU always computes in fp32.")
    output: Output
    resources: Resources = Resources()

    @model_validator(mode="before")
    @classmethod
    def _mined_negatives_are_used(cls, data):
        """dataset.mining.negatives sets loss.negatives_per_query unless that is set too (then they must agree)."""
        mining = ((data.get("dataset") or {}).get("mining") or {}) if isinstance(data, dict) else {}
        n = mining.get("negatives") if isinstance(mining, dict) else None
        if not isinstance(n, int) or isinstance(n, bool):
            return data
        loss = data.get("loss") or {}
        if not isinstance(loss, dict):
            return data
        if "negatives_per_query" in loss and loss["negatives_per_query"] != n:
            raise ValueError(f"loss.negatives_per_query ({loss['negatives_per_query']}) differs from "
                             f"dataset.mining.negatives ({n}); remove loss.negatives_per_query (mining sets it)")
        return {**data, "loss": {**loss, "negatives_per_query": n}}

    def with_absolute_paths(self) -> "JobConfig":
        """Local paths made absolute, so Ray workers (whose cwd differs) find the same files."""
        def absolute(p: str | None) -> str | None:
            return p if p is None or "://" in p else str(Path(p).expanduser().absolute())

        regression = self.dataset.regression  # a shipped set's name stays a name: each node resolves it to its own copy
        ds = self.dataset.model_copy(update={k: absolute(getattr(self.dataset, k)) for k in ("training", "validation", "evaluation")}
                                     | {"regression": regression if regression in SHIPPED_REGRESSION_SETS else absolute(regression)})
        if ds.mining is not None:
            ds = ds.model_copy(update={"mining": ds.mining.model_copy(update={k: absolute(getattr(ds.mining, k))
                                                                               for k in ("corpus", "cache_dir")})})
        out = self.output.model_copy(update={"dir": absolute(self.output.dir), "storage_path": absolute(self.output.storage_path)})
        model = absolute(self.model) if Path(self.model).expanduser().is_dir() else self.model
        return self.model_copy(update={"dataset": ds, "output": out, "model": model})

    @property
    def storage_path(self) -> str:
        if self.output.storage_path:
            return self.output.storage_path
        out = self.output.dir
        return storage.join(out, "checkpoints") if storage.is_uri(out) else str(Path(out).absolute() / "checkpoints")


def validate_config(raw: dict) -> JobConfig:
    """dict -> JobConfig, or ConfigError listing every problem by key."""
    return validate(JobConfig, raw)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> JobConfig:
    """Read YAML (optional), apply `--set key=value` overrides, validate."""
    return load(JobConfig, path, overrides)


def dump_config(cfg: JobConfig) -> str:
    return dump(cfg)
