"""Datasets: files uploaded through the API into storage, which jobs read by name."""

from __future__ import annotations

import logging
import time
import uuid

from cluster.entities import DATASET_FILES, JOB_DONE, CustomizationJob, Dataset, DatasetFile
from rayembed import storage
from cluster.services.base import Service, check_body, check_name, running_uploads, validated
from rayembed.errors import Conflict, InvalidRequest, shown
from rayembed.regression import SHIPPED as SHIPPED_REGRESSION_SETS

log = logging.getLogger(__name__)


class DatasetService(Service):
    """Dataset entities (the files are validated and stored by the upload ingress: cluster/uploads.py)."""

    # ---------------------------------------------------------------- datasets (the files go through the API ingress)
    def create_dataset(self, workspace: str, body: dict) -> dict:
        self.ctx.workspace(workspace)
        name = check_body("create_dataset", body)["name"]
        folder = f"{name}-{uuid.uuid4().hex[:12]}"  # never reused: a dataset made again never reaches old files
        ds = validated(Dataset, {"description": body.get("description", "")}, "dataset", workspace=workspace,
                       name=name, uri=storage.join(self.ctx.workspace_root(workspace), "datasets", folder))
        self.ctx.admitted(workspace, lambda: self.ctx.create(ds), lambda _: self.ctx.remove(ds))
        return ds.model_dump(mode="json")

    def list_datasets(self, workspace: str) -> list[dict]:
        self.ctx.workspace(workspace)
        return [d.model_dump(mode="json") for d in self.ctx.all("dataset", Dataset, workspace)]

    def get_dataset(self, workspace: str, name: str) -> dict:
        self.ctx.workspace(workspace)
        return self.ctx.load("dataset", workspace, name, Dataset).model_dump(mode="json")

    def begin_upload(self, workspace: str, name: str, path: str, declared_bytes: int | None = None) -> dict:
        """Before an upload's first byte: refused (409) while an unfinished job reads the dataset or another upload
        of the same file runs, or (429) when the workspace's datasets would pass its storage quota. Marks the file
        as uploading, so no job starts on the dataset until `add_dataset_file` or `end_upload`."""
        if path not in DATASET_FILES:
            raise InvalidRequest(f"{shown(path)} is not a dataset file: use one of {', '.join(DATASET_FILES)}", "path")
        if declared_bytes is None:
            raise InvalidRequest("send the upload with a Content-Length header (its size is checked against the "
                                 "workspace's storage quota before it is read)", "body")

        folders = self.ctx.folders_used(self.ctx.workspace(workspace))  # listed once, before the admission (it may run again)

        def attempt() -> Dataset:
            ds = self.ctx.load("dataset", self.ctx.workspace(workspace), name, Dataset)
            users = self._jobs_reading(ds)
            if users:
                raise Conflict(f"dataset {name!r} is read by job {', '.join(users)}: wait for it to finish or cancel it "
                               "before uploading its files again (or create another dataset)")
            if self._uploading(ds).get(path):
                raise Conflict(f"{path} of dataset {name!r} is being uploaded right now; wait for that upload")
            used = {**self.ctx.datasets_used(workspace, replacing=(name, path)), **folders}  # the file replaced: not held
            self.ctx.quota_for_storage(workspace, "body", more=declared_bytes, used=used)
            live = self._uploading(ds)
            marked = self.ctx.replace(ds, ds.model_copy(update={
                "uploading": {**live, path: time.time()},
                "uploading_bytes": {**{p: n for p, n in ds.uploading_bytes.items() if p in live}, path: declared_bytes}}))
            if marked is None:
                raise Conflict(f"dataset {name!r} changed while the upload began; try again")
            return marked

        ds = self.ctx.admitted(workspace, attempt, self._unmark(path))
        return ds.model_dump(mode="json")

    def _unmark(self, path: str):
        def undo(ds: Dataset) -> None:
            self.ctx.modify(lambda: self.ctx.load("dataset", ds.workspace, ds.name, Dataset), lambda d: _unmarked(d, path))
        return undo

    def end_upload(self, workspace: str, name: str, path: str) -> None:
        """An upload that failed: the file is no longer marked (what was stored before stays)."""
        if self.store.get("dataset", workspace, name) is not None:
            self._unmark(path)(Dataset.model_validate(self.store.get("dataset", workspace, name)))

    def _uploading(self, ds: Dataset) -> dict[str, float]:
        return running_uploads(ds)

    def add_dataset_file(self, workspace: str, name: str, path: str, stored: dict) -> dict:
        """Record a file the upload task validated and stored at the dataset's folder (a new upload replaces it)."""
        if path not in DATASET_FILES:
            raise InvalidRequest(f"{shown(path)} is not a dataset file: use one of {', '.join(DATASET_FILES)}", "path")
        file = DatasetFile.model_validate(stored)
        ds = self.ctx.modify(lambda: self.ctx.load("dataset", self.ctx.workspace(workspace), name, Dataset),
                             lambda d: _unmarked(d, path).model_copy(update={"files": {**d.files, path: file}}))
        return ds.model_dump(mode="json")

    def _jobs_reading(self, ds: Dataset) -> list[str]:
        """Unfinished jobs whose config reads the dataset's files."""
        def reads(job: CustomizationJob) -> bool:
            given = (job.spec.get("job") if job.kind == "sweep" else job.spec).get("dataset") or {}
            read = [given.get(k) for k in ("training", "validation", "evaluation", "regression")]
            read.append((given.get("mining") or {}).get("corpus"))
            return any(isinstance(r, str) and (r == ds.uri or r.startswith(ds.uri.rstrip("/") + "/")) for r in read)

        return [j.name for j in self.ctx.all("job", CustomizationJob, ds.workspace) if j.status not in JOB_DONE and reads(j)]

    def delete_dataset(self, workspace: str, name: str) -> dict:
        def attempt() -> Dataset:
            ds = self.ctx.load("dataset", self.ctx.workspace(workspace), name, Dataset)
            users = self._jobs_reading(ds)
            if users:
                raise Conflict(f"dataset {name!r} is read by job {', '.join(users)}; wait for it to finish or cancel it")
            if self._uploading(ds):
                raise Conflict(f"dataset {name!r} has an upload running ({', '.join(self._uploading(ds))}); wait for it")
            if not self.ctx.remove(ds):
                raise Conflict(f"dataset {name!r} changed while it was being deleted; try again")
            return ds

        ds = self.ctx.admitted(workspace, attempt, lambda ds: self.ctx.create(ds))
        storage.delete_tree(ds.uri)  # the entity is gone, so no new job can name it
        return {"name": name, "deleted": True}

    def resolve_spec(self, workspace: str, spec: dict, field: str) -> dict:
        """`dataset: {name: ...}` in a job config -> the dataset's files as the config's paths (in storage);
        `regression_dataset: OTHER` -> that dataset's evaluation folder as the regression set."""
        spec = self._with_regression_dataset(workspace, spec, field)
        given = spec.get("dataset")
        if not isinstance(given, dict) or "name" not in given:
            return spec
        ds = self.ctx.load("dataset", workspace, check_name(given["name"], "dataset", f"{field}.dataset.name"), Dataset)
        if self._uploading(ds):
            raise Conflict(f"dataset {ds.name!r} has an upload running ({', '.join(self._uploading(ds))}); start the job "
                           "when it is done")
        fields = ds.job_fields()
        if "training" not in fields:
            raise InvalidRequest(f"dataset {ds.name!r} has no training.jsonl yet: upload it first "
                                 f"(`rayembed datasets upload {ds.name} --training FILE`)", f"{field}.dataset.name")
        clash = sorted(set(fields) & set(given))
        if clash:
            raise InvalidRequest(f"{field}.dataset: give either name (dataset {ds.name!r}) or {', '.join(clash)}, not "
                                 "both", f"{field}.dataset")
        return {**spec, "dataset": {**{k: v for k, v in given.items() if k != "name"}, **fields}}

    def _with_regression_dataset(self, workspace: str, spec: dict, field: str) -> dict:
        """`dataset.regression_dataset: NAME` (a dataset of the workspace with evaluation files) -> `regression`: its
        evaluation folder, chosen by the server like every other place of the job."""
        given = spec.get("dataset")
        if not isinstance(given, dict) or "regression_dataset" not in given:
            return spec
        key = f"{field}.dataset.regression_dataset"
        if given.get("regression") is not None:
            raise InvalidRequest(f"{field}.dataset: give either regression (a shipped set: "
                                 f"{', '.join(SHIPPED_REGRESSION_SETS)}) or regression_dataset, not both", key)
        other = self.ctx.load("dataset", workspace, check_name(given["regression_dataset"], "dataset", key), Dataset)
        folder = other.job_fields().get("evaluation")
        if folder is None:
            raise InvalidRequest(f"dataset {other.name!r} has no evaluation files to use as a regression set: upload "
                                 f"its corpus.jsonl, queries.jsonl and qrels/test.tsv first", key)
        rest = {k: v for k, v in given.items() if k != "regression_dataset"}
        return {**spec, "dataset": {**rest, "regression": folder}}


def _unmarked(ds: Dataset, path: str) -> Dataset:
    """`ds` with `path`'s upload no longer running."""
    return ds.model_copy(update={"uploading": {p: t for p, t in ds.uploading.items() if p != path},
                                 "uploading_bytes": {p: n for p, n in ds.uploading_bytes.items() if p != path}})
