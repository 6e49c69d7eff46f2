"""Model entities: registered from an ONNX folder, or exported once from a base model as a Ray job."""

from __future__ import annotations

import json
import logging
import shlex
import sys
import time
import uuid

from cluster import job_files
from cluster.entities import JOB_DONE, Artifact, CustomizationJob, Evaluation, ModelDeployment, ModelEntity
from rayembed import storage
from rayembed.artifact import MANIFEST, REQUIRED_FILES, ArtifactError, parse_manifest
from cluster.services.base import SUBMIT_TIMEOUT_S, Service, check_body
from rayembed.errors import Conflict, InvalidRequest, Unavailable, shown

log = logging.getLogger(__name__)


class ModelService(Service):
    """Model entities and their export jobs (Ray jobs, through ctx.ray_jobs)."""

    # ---------------------------------------------------------------- model entities
    def list_models(self, workspace: str) -> list[dict]:
        self.ctx.workspace(workspace)
        return [m.model_dump(mode="json") for m in self.ctx.all("model", ModelEntity, workspace)]

    def get_model(self, workspace: str, name: str) -> dict:
        self.ctx.workspace(workspace)
        return self.ctx.load("model", workspace, name, ModelEntity).model_dump(mode="json")

    def create_model(self, workspace: str, body: dict, operator: bool = False) -> dict:
        """Register a base model: `base_model` (one the operator allowed: the packaged all-MiniLM-L6-v2, or what
        RAYEMBED_BASE_MODELS lists) is exported and verified once, as a Ray job; `artifact` (an ONNX folder this
        project wrote) is copied in as it is, by the operator only (`operator`: a Ray caller, the CLI), since it
        names a place. Its files go to a folder of its own, never reused, so a name registered again never reaches
        the old files."""
        self.ctx.workspace(workspace)
        name = check_body("create_model", body)["name"]
        base, artifact = body.get("base_model"), body.get("artifact")
        if not operator:
            if artifact is not None:
                raise InvalidRequest("artifact names a folder, which only the operator may register (`rayembed models "
                                     "register NAME --artifact DIR` over Ray); name a base_model, or train one with a "
                                     "customization job", "artifact")
            if base not in self.ctx.base_models:
                raise InvalidRequest(f"base_model {shown(base)} is not an allowed base model ({', '.join(self.ctx.base_models)}); "
                                     "the operator lists more in RAYEMBED_BASE_MODELS", "base_model")
        out = storage.join(self.ctx.workspace_root(workspace), "models", f"{name}-{uuid.uuid4().hex[:12]}", "onnx")
        if self.store.get("model", workspace, name) is not None:
            raise Conflict(f"model {name!r} already exists in workspace {workspace!r}")
        if artifact is not None:  # copied into storage and read first, so every node reads the same files
            published = self._publish_artifact(str(artifact), out)
            entity = self.entity_from_artifact(workspace, name, published, str(artifact), None, None,
                                               description=str(body.get("description", "")))
        else:
            entity = ModelEntity(workspace=workspace, name=name, status="exporting", base_model=str(base),
                                 artifact=Artifact(uri=out), source_job=f"export-{workspace}-{name}-{job_files.new_job_id()[5:13]}",
                                 description=str(body.get("description", "")))

        if artifact is None:  # an export: a Ray job that writes (the operator's registrations are the operator's)
            self.ctx.quota_for_job(workspace)
            self.ctx.quota_for_storage(workspace, "name")  # its folders listed once, outside the admission

        def attempt() -> ModelEntity:
            if artifact is None:
                self.ctx.quota_for_job(workspace)
            self._name_free(workspace, name)
            self.ctx.create(entity)
            return entity

        self.ctx.admitted(workspace, attempt, self.ctx.remove)
        if artifact is None:  # the export runs as a Ray job, submitted once its entity holds the name
            entry = (f"{shlex.quote(sys.executable)} -m train.export --model {shlex.quote(str(base))} "
                     f"--output {shlex.quote(str(out))}")
            try:
                self.ctx.ray_jobs.submit(entry, entity.source_job, {"rayembed": "model-export", "workspace": workspace,
                                                                    "model": name})
            except Exception as exc:  # noqa: BLE001 - the export did not start: the name is free again
                self.store.delete("model", workspace, name)
                raise Unavailable(f"Ray did not accept the export job: {type(exc).__name__}: {exc}"[:1000] +
                                  "; nothing was registered: retry in a few seconds") from None
        return entity.model_dump(mode="json")

    def _publish_artifact(self, folder: str, dest: str) -> str:
        """An ONNX folder the operator registers, sealed where every node reads it: a published URI as it is, any
        other folder copied to `dest` (the model's own folder; never sealed in place, which would write into it)."""
        if storage.is_uri(folder) and storage.read_seal(folder) is not None:
            return folder
        files = storage.list_files(folder) if storage.exists(folder) else {}
        missing = [f for f in REQUIRED_FILES if f not in files]
        if missing:
            raise InvalidRequest(f"artifact {shown(folder)} lacks {', '.join(missing)}: give a folder written by "
                                 "`python -m train.export` or a job's onnx/", "artifact")
        storage.publish(folder, dest)
        return dest

    def _name_free(self, workspace: str, name: str) -> None:
        """No model of this name, and no unfinished job that will create one."""
        if self.store.get("model", workspace, name) is not None:
            raise Conflict(f"model {name!r} already exists in workspace {workspace!r}")
        clash = [j.name for j in self.ctx.all("job", CustomizationJob, workspace)
                 if j.output_model == name and j.status not in JOB_DONE]
        if clash:
            raise Conflict(f"job {clash[0]} already creates model {name!r}")

    def entity_from_artifact(self, workspace: str, name: str, uri: str, base_model: str, hf_uri: str | None,
                              source_job: str | None, evaluation=None, description: str = "") -> ModelEntity:
        """A ready model entity from a published ONNX folder in storage (read through the storage API, so the
        actor's node needs none of the files)."""
        seal = storage.read_seal(uri)
        if seal is None:
            raise InvalidRequest(f"artifact {uri} was not published completely (no seal): run its job or export "
                                 "again", "artifact")
        missing = [f for f in REQUIRED_FILES if f not in seal["files"]]
        if missing:
            raise InvalidRequest(f"artifact {uri} lacks {', '.join(missing)}: give a folder written by "
                                 "`python -m train.export` or a job's onnx/", "artifact")
        try:
            m = parse_manifest(storage.read_text(storage.join(uri, MANIFEST)), uri)
        except ArtifactError as exc:
            raise InvalidRequest(str(exc), "artifact") from None
        if evaluation is None and "eval.json" in seal["files"]:  # a job's onnx/ carries its evaluation
            try:
                evaluation = Evaluation.from_report(json.loads(storage.read_text(storage.join(uri, "eval.json"))))
            except (ValueError, KeyError) as exc:
                raise InvalidRequest(f"{uri}/eval.json is not a job's evaluation report: {exc}", "artifact") from None
        params = None
        if hf_uri and storage.is_file(storage.join(hf_uri, "model.safetensors")):
            params = _count_parameters(storage.join(hf_uri, "model.safetensors"))
        return ModelEntity(workspace=workspace, name=name, status="ready",
                           base_model=m.base_model if base_model == uri else base_model,
                           artifact=Artifact(uri=uri, sha256=seal["sha256"], hf_uri=hf_uri),
                           parameter_count=params, precision="fp32 (ONNX; trained bf16-mixed on GPU)",
                           embedding_dim=m.embedding_dim, matryoshka_dims=m.dims, max_seq_length=m.max_seq_length,
                           prefixes=m.prefixes.model_dump(), evaluation=evaluation, source_job=source_job,
                           description=description)

    def delete_model(self, workspace: str, name: str) -> dict:
        """Refused while a deployment serves it or an unfinished job trains from it; else the entity goes, and so do
        the files in its own folder (a job's output stays with its job)."""
        def attempt() -> ModelEntity:
            model = self.ctx.load("model", self.ctx.workspace(workspace), name, ModelEntity)
            users = [d.name for d in self.ctx.all("deployment", ModelDeployment, workspace) if name in (d.model, d.pending_model)]
            if users:
                raise Conflict(f"model {name!r} is deployed by {', '.join(users)}; delete or repoint those deployments first")
            weights = model.artifact.hf_uri
            training = [j.name for j in self.ctx.all("job", CustomizationJob, workspace) if j.status not in JOB_DONE
                        and weights and weights in (j.spec.get("model"), (j.spec.get("job") or {}).get("model"))]
            if training:
                raise Conflict(f"model {name!r} is the base of job {', '.join(training)}; wait for it or cancel it")
            if not self.ctx.remove(model):
                raise Conflict(f"model {name!r} changed while it was being deleted; try again")
            return model

        model = self.ctx.admitted(workspace, attempt, lambda m: self.ctx.create(m))
        own = storage.join(self.ctx.workspace_root(workspace), "models")
        folder = storage.parent(model.artifact.uri)
        if storage.parent(folder) == own:  # the entity is gone, nothing can name these files now
            storage.delete_tree(folder)
        return {"name": name, "deleted": True}

    def reconcile(self, model: ModelEntity) -> None:
        """An exporting model: ready once its export's Ray job succeeded and its artifact reads back, else failed."""
        info = self.ctx.ray_jobs.info(model.source_job)
        status = getattr(info.status, "value", str(info.status)) if info else "GONE"
        if status in ("PENDING", "RUNNING") or (status == "GONE" and time.time() - model.created_at < SUBMIT_TIMEOUT_S):
            return  # running, or still being submitted
        log_text = ""
        if status == "FAILED":
            try:
                log_text = self.ctx.ray_jobs.logs(model.source_job)
            except RuntimeError:
                pass
        ready, why = None, None
        if status == "SUCCEEDED":  # the artifact read back from storage
            try:
                ready = self.entity_from_artifact(model.workspace, model.name, model.artifact.uri, model.base_model,
                                                   None, model.source_job, description=model.description)
            except InvalidRequest as exc:
                why = exc.message
        else:
            why = {"GONE": "the export's Ray job is gone (cluster restarted); register the model again",
                   "STOPPED": "the export was stopped"}.get(status, job_files.last_lines(log_text or (info.message if info else "")))
        if ready is not None:
            self.ctx.replace(model, ready.model_copy(update={"created_at": model.created_at}))
        else:  # a lost race (deleted, changed meanwhile): the next pass sees the entity as it is now
            self.ctx.replace(model, model.model_copy(update={"status": "failed", "error": why}))


def _count_parameters(uri: str) -> int | None:
    """Parameters in a safetensors file in storage, read from its header alone (no torch)."""
    import struct

    try:
        size = struct.unpack("<Q", storage.read_head(uri, 8))[0]
        header = json.loads(storage.read_head(uri, 8 + size)[8:])
    except (OSError, ValueError, struct.error):
        return None
    total = 0
    for key, meta in header.items():
        if key != "__metadata__":
            n = 1
            for d in meta["shape"]:
                n *= d
            total += n
    return total
