"""Datasets: files uploaded through the API into storage, which jobs read by name."""

from __future__ import annotations

import logging

from cluster.entities import DATASET_FILES, JOB_DONE, CustomizationJob, Dataset, DatasetFile
from cluster.schemas import DatasetCreate
from rayembed import storage
from cluster.services.base import Core, check_name, validated
from rayembed.errors import Conflict, InvalidRequest, shown
from rayembed.regression import SHIPPED as SHIPPED_REGRESSION_SETS

log = logging.getLogger(__name__)


class DatasetService(Core):
    """Dataset entities (the files are validated and stored by the API ingress, cluster/datasets.py)."""

    # ---------------------------------------------------------------- datasets (the files go through the API ingress)
    def create_dataset(self, workspace: str, body: dict) -> dict:
        self._workspace(workspace)
        name = check_name(body.get("name"), "dataset")
        validated(DatasetCreate, body, "dataset")
        with self._lock:
            if self.store.get("dataset", workspace, name) is not None:
                raise Conflict(f"dataset {name!r} already exists in workspace {workspace!r}")
            ds = validated(Dataset, {"description": body.get("description", "")}, "dataset", workspace=workspace,
                         name=name, uri=storage.join(self._workspace_root(workspace), "datasets", name))
            self._save(ds)
        return ds.model_dump(mode="json")

    def list_datasets(self, workspace: str) -> list[dict]:
        self._workspace(workspace)
        return [d.model_dump(mode="json") for d in self._all("dataset", Dataset, workspace)]

    def get_dataset(self, workspace: str, name: str) -> dict:
        self._workspace(workspace)
        return self._load("dataset", workspace, name, Dataset).model_dump(mode="json")

    def add_dataset_file(self, workspace: str, name: str, path: str, stored: dict) -> dict:
        """Record a file the API ingress validated and stored at the dataset's folder (a new upload replaces it)."""
        with self._lock:
            self._workspace(workspace)
            ds = self._load("dataset", workspace, name, Dataset)
            if path not in DATASET_FILES:
                raise InvalidRequest(f"{shown(path)} is not a dataset file: use one of {', '.join(DATASET_FILES)}", "path")
            ds = ds.touched(files={**ds.files, path: DatasetFile.model_validate(stored)})
            self._save(ds)
        return ds.model_dump(mode="json")

    def _jobs_reading(self, ds: Dataset) -> list[str]:
        """Unfinished jobs whose config reads the dataset's files."""
        def reads(job: CustomizationJob) -> bool:
            given = (job.spec.get("job") if job.kind == "sweep" else job.spec).get("dataset") or {}
            return any(isinstance(given.get(k), str) and given[k].startswith(ds.uri.rstrip("/") + "/")
                       for k in ("training", "validation", "evaluation", "regression"))

        return [j.name for j in self._all("job", CustomizationJob, ds.workspace) if j.status not in JOB_DONE and reads(j)]

    def delete_dataset(self, workspace: str, name: str) -> dict:
        with self._lock:
            self._workspace(workspace)
            ds = self._load("dataset", workspace, name, Dataset)
            users = self._jobs_reading(ds)
            if users:
                raise Conflict(f"dataset {name!r} is read by job {', '.join(users)}; wait for it to finish or cancel it")
            self.store.delete("dataset", workspace, name)
        storage.delete_tree(ds.uri)  # outside the lock: the entity is gone, so no new job can name it
        return {"name": name, "deleted": True}

    def _with_dataset(self, workspace: str, spec: dict, field: str) -> dict:
        """`dataset: {name: ...}` in a job config -> the dataset's files as the config's paths (in storage);
        `regression_dataset: OTHER` -> that dataset's evaluation folder as the regression set."""
        spec = self._with_regression_dataset(workspace, spec, field)
        given = spec.get("dataset")
        if not isinstance(given, dict) or "name" not in given:
            return spec
        ds = self._load("dataset", workspace, check_name(given["name"], "dataset", f"{field}.dataset.name"), Dataset)
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
        other = self._load("dataset", workspace, check_name(given["regression_dataset"], "dataset", key), Dataset)
        folder = other.job_fields().get("evaluation")
        if folder is None:
            raise InvalidRequest(f"dataset {other.name!r} has no evaluation files to use as a regression set: upload "
                                 f"its corpus.jsonl, queries.jsonl and qrels/test.tsv first", key)
        rest = {k: v for k, v in given.items() if k != "regression_dataset"}
        return {**spec, "dataset": {**rest, "regression": folder}}
