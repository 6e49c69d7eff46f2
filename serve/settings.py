"""The gateway's routing table and each provider's replica settings (pydantic, YAML-shaped).

workspace/model entity -> provider(s) -> an EmbeddingReplica deployment (built here from
`model_dir`) or an already running Serve application (`app`, as the control plane creates them).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from rayembed.artifact import missing_files
from rayembed.config import ConfigError, Section, read_yaml, validate

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class Autoscaling(Section):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(32, gt=0, description="per replica; Serve adds replicas above it")

    @model_validator(mode="after")
    def _order(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


# A model replica's own code never blocks its event loop (ONNX Runtime runs in the batcher's thread, serve/batcher.py),
# so Serve runs it on the replica's main loop instead of handing every request to a user-code thread: 1.07-1.10x the
# texts/s at 32 clients x 16 texts on 2 cores (docs/benchmarks.md §5). Read at process start, hence per deployment.
REPLICA_SERVE_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


class ProviderSettings(Section):
    """One provider: a deployment of one ONNX artifact (or a running Serve app that serves one)."""

    name: str = Field(description="provider / deployment name, unique across the gateway (the provider route uses it)")
    model_dir: str | None = Field(None, description="ONNX artifact directory (model.onnx, tokenizer.json, manifest.json), "
                                  "or a published artifact's storage URI (s3://...): each node materializes it once")
    model_sha256: str | None = Field(None, description="the published artifact's digest: replicas refuse other files")
    app: str | None = Field(None, description="instead of model_dir: a running Serve application serving an EmbeddingReplica")
    direct_url: str | None = Field(None, description="where the provider answers its own route over HTTP (`python -m "
                                   "serve` sets it): the gateway forwards the OpenAI routes' bodies there, one hop "
                                   "fewer than a handle call")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when the replica holds a GPU")
    precision: Literal["auto", "fp32", "fp16", "optimized", "int8"] = Field(
        "auto", description="auto: model.fp16.onnx on CUDA, model.opt.onnx (fused, parity-checked) on CPU, when exported; "
                            "fp32: the plain graph; int8: model.int8.onnx (python -m train.quantize, quality-gated)")
    num_replicas: int = Field(1, ge=1)
    autoscaling: Autoscaling | None = Field(None, description="replaces num_replicas when set")
    num_cpus: float = Field(1.0, ge=0, description="CPUs each replica reserves; also its ONNX Runtime thread count")
    num_gpus: float = Field(0.0, ge=0)
    intra_op_threads: int | None = Field(None, ge=1, description="default: the CPUs the replica reserves (at least 1)")
    spin: bool = Field(False, description="let ONNX Runtime's idle threads spin; only worth it when the replica's CPUs "
                                          "are its own (spinning on a shared CPU halves throughput)")
    max_batch_tokens: int = Field(8192, ge=1, description="token budget of one batch (the texts that queued while the previous batch ran)")
    max_batch_items: int = Field(512, ge=1, description="texts in one batch (bound together with the tokens)")
    max_batch_texts: int = Field(32, ge=1, description="texts per ONNX Runtime call (length-sorted sub-batches)")
    call_tokens: int | None = Field(None, ge=1, description="the fixed cost of one ONNX Runtime call in tokens' worth "
                                    "of compute, which the batch planner weighs against padding when it cuts a batch "
                                    "into calls; default: timed by each replica when it starts")
    batch_wait_timeout_s: float = Field(0.0, ge=0, description="extra wait for a batch to fill; 0 batches what queued "
                                                               "while the previous batch ran")
    max_ongoing_requests: int = Field(256, ge=1, description="calls one replica accepts (they wait in its batch "
                                      "queue); a call is one request, or the gateway's group of requests that "
                                      "reached it together")
    max_queued_requests: int = Field(512, ge=-1, description="calls waiting for a replica (counted as "
                                     "max_ongoing_requests counts them); beyond it: 429 (-1: no limit)")
    request_timeout_s: float = Field(120.0, gt=0, description="a replica that has not answered within it (hung, or "
                                      "stopped): the gateway retries on another replica, then answers 504")
    default_input_type: Literal["query", "passage"] | None = Field(
        None, description="input_type when a request has none (a model with prefixes otherwise requires it)")
    default_dimensions: int | None = Field(
        None, ge=1, description="dimensions when a request has none: one of the model's Matryoshka sizes (the report "
                                "card suggests the smallest within 0.01 nDCG@10 of the best); default: the full size")

    @field_validator("model_dir")
    @classmethod
    def _absolute(cls, value: str | None, info: ValidationInfo) -> str | None:
        # replicas run in other working directories: pin the path where the config was read
        if value is None or "://" in value or not (info.context or {}).get("check_files", True):
            return value
        return str(Path(value).resolve())

    @model_validator(mode="after")
    def _source(self, info: ValidationInfo):
        if not NAME.match(self.name):
            raise ValueError(f"name {self.name!r} must be 1-128 of letters, digits, '.', '_', '-'")
        if (self.model_dir is None) == (self.app is None):
            raise ValueError("give exactly one of model_dir (an ONNX artifact) or app (a running Serve application)")
        if self.model_dir is not None and "://" not in self.model_dir and (info.context or {}).get("check_files", True):
            missing = missing_files(self.model_dir)
            if missing:
                raise ValueError(f"model_dir {self.model_dir} lacks {', '.join(missing)}: export one with "
                                 "`python -m train.export` or point at a training job's onnx/ directory")
        return self

    def threads(self) -> int:
        return self.intra_op_threads or max(1, int(self.num_cpus))

    def deployment_options(self) -> dict:
        """Serve `.options(...)` for this provider's EmbeddingReplica."""
        opts: dict = {
            "name": f"replica-{self.name}",
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                                  "runtime_env": {"env_vars": dict(REPLICA_SERVE_ENV)}},
        }
        if self.autoscaling:
            opts["autoscaling_config"] = self.autoscaling.model_dump()
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


class ModelRoute(Section):
    workspace: str = "default"
    name: str = Field(description="model entity name")
    providers: list[ProviderSettings] = Field(min_length=1)

    @model_validator(mode="after")
    def _names(self):
        for value, what in ((self.workspace, "workspace"), (self.name, "name")):
            if not NAME.match(value):
                raise ValueError(f"{what} {value!r} must be 1-128 of letters, digits, '.', '_', '-'")
        return self


class Limits(Section):
    max_inputs_per_request: int = Field(2048, ge=1, description="more inputs in one request: 413")
    max_chars_per_input: int = Field(100_000, ge=1, description="a longer input: 413")
    max_body_bytes: int = Field(32 * 2**20, ge=1024, description="a larger request body: 413, refused before it is read")
    body_timeout_s: float = Field(30.0, gt=0, description="a request body not fully received within it: 408 (a stalled client)")


class GatewayAuth(Section):
    """API keys of a gateway outside the platform (`python -m serve`, a RayService). With none, it answers 401 to
    everything but the health probes, unless `open` (which `python -m serve` allows only on a loopback bind)."""

    open: bool = Field(False, description="no keys, every request answered (python -m serve --open, loopback only)")
    keys: list[dict] = Field(default_factory=list, description="key records {id, sha256, workspaces}: only the "
                             "SHA-256 of each key (python -m serve --api-keys-file hashes a file of keys into these)")
    keys_env: str | None = Field("RAYEMBED_API_KEYS", description="an environment variable of the gateway's processes "
                                 "holding keys (rek_<id>_<secret>, one per line or comma-separated), hashed when a "
                                 "replica starts: on Kubernetes, a key of the `rayembed` Secret")

    def ring(self):
        """The KeyRing of these settings, in the process that serves (the environment is read here)."""
        from serve.auth import KeyRing, records_of

        extra = records_of(os.environ.get(self.keys_env, ""), self.keys_env) if self.keys_env else []
        return KeyRing([*self.keys, *extra], open_=self.open)


class GatewayConfig(Section):
    models: list[ModelRoute] = Field(default_factory=list, description="model entities and their providers")
    auth: GatewayAuth = GatewayAuth()
    limits: Limits = Limits()
    gateway_replicas: int = Field(1, ge=1, description="replicas of the gateway deployment (HTTP parsing, routing, "
                                                       "rendering); more pay off on nodes with spare cores")
    gateway_env: dict[str, str] = Field(
        default_factory=dict, description="environment of the gateway's replica processes only, for Ray Serve "
                                          "settings read at process start; merged over serve.gateway.GATEWAY_SERVE_ENV "
                                          "(a key set to \"\" drops that default)")

    @model_validator(mode="after")
    def _unique(self):
        entities = [(m.workspace, m.name) for m in self.models]
        providers = [(m.workspace, p.name) for m in self.models for p in m.providers]  # unique per workspace
        dup_e = sorted({f"{w}/{n}" for w, n in entities if entities.count((w, n)) > 1})
        dup_p = sorted({p for w, p in providers if providers.count((w, p)) > 1})
        if dup_e or dup_p:
            raise ValueError("names must be unique: " + "; ".join(
                [f"model {e} appears twice" for e in dup_e] + [f"provider {p} appears twice" for p in dup_p]))
        return self

    def providers(self) -> dict[str, ProviderSettings]:
        """Providers this config builds itself (model_dir), by name; app-backed ones run elsewhere."""
        return {p.name: p for m in self.models for p in m.providers}


def load_gateway_config(source: dict | str | Path) -> GatewayConfig:
    """Validate a routing table (a dict, or a YAML file); every problem is reported with its key."""
    data = read_yaml(source) if isinstance(source, (str, Path)) else source
    where = f" in {source}" if isinstance(source, (str, Path)) else ""
    config = validate(GatewayConfig, data, title=f"invalid gateway config{where}")
    if not config.models:
        raise ConfigError(["models: give at least one model with its providers"], f"invalid gateway config{where}")
    return config


def single_model_config(model_dir: str, name: str, replicas: int = 1, **provider: object) -> GatewayConfig:
    """The standalone `python -m serve --model-dir DIR` table: one model, one provider of the same name."""
    return load_gateway_config({"models": [{"name": name, "providers": [
        {"name": name, "model_dir": model_dir if "://" in model_dir else str(Path(model_dir).resolve()),
         "num_replicas": replicas, **provider}]}]})
