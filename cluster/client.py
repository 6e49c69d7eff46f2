"""A Python client shaped like the platform SDK, on httpx, answering with the API's own models (cluster/schemas.py):

    client = Client(base_url="http://127.0.0.1:8080", workspace="default")
    client.models.create(name="minilm", base_model="all-MiniLM-L6-v2")
    client.datasets.create(name="debian", training="train.jsonl", evaluation="eval/")
    job = client.customization.jobs.create(output_model="minilm-tuned", config={...})
    client.customization.jobs.wait(job.name, on_progress=print)
    client.deployments.create(name="minilm-tuned", model="minilm-tuned"); client.deployments.wait_ready("minilm-tuned")
    client.inference.gateway.model.post("v1/embeddings", name="minilm-tuned", body={"input": ["hello"]})
    client.models.get_openai_client().embeddings.create(model="minilm-tuned", input=["hello"])

With API keys configured on the cluster, pass `api_key=` or set RAYEMBED_API_KEY.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import httpx
import orjson

from cluster import schemas
from cluster.schemas import (Answer, DatasetOut, Deleted, DeploymentConfigDetail, DeploymentConfigOut, DeploymentOut,
                             JobOut, JobStatusOut, ModelOut, Page, ProviderOut, WorkspaceOut)
from rayembed.polling import poll

RETRY_STATUSES = (502, 503, 504)  # a transient refusal: the control plane restarting, the API not up yet


class ApiError(RuntimeError):
    """An error answer: `status` and the OpenAI-style envelope's `message`, `code`."""

    def __init__(self, status: int, message: str, code: str | None = None, body: Any = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.code, self.body = status, message, code, body


class TransientError(ApiError):
    """A refusal worth retrying: no connection (status 0), or 502/503/504 (the control plane restarting, the API
    not up yet). Requests made with `retries` and every waiter retry it."""


class Obj(dict):
    """A JSON object without a model (the gateway's inference answers): `obj["data"]` and `obj.data`."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _wrap(value):
    if isinstance(value, dict):
        return Obj({k: _wrap(v) for k, v in value.items()})
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


class Http:
    """One httpx connection pool for every call."""

    def __init__(self, base_url: str, timeout: float, api_key: str | None = None):
        self.base_url, self.timeout, self.api_key = base_url.rstrip("/"), timeout, api_key
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)

    def request(self, method: str, path: str, body: Any = None, raw: bool = False, retries: int = 0,
                file: str | None = None, params: dict | None = None, model: type[Answer] | None = None):
        """`retries`: for about that many seconds a transient refusal is retried (once a second). `file`: a local file
        sent as the body, streamed from disk (a dataset upload). `model`: the answer's type (else a JSON `Obj`)."""
        def attempt():
            payload = self._send(method, path, body, file, params)
            if raw:
                return payload.decode()
            data = orjson.loads(payload)
            return model.model_validate(data) if model is not None else _wrap(data)

        if not retries:
            return attempt()
        return poll(attempt, timeout_s=retries, interval_s=1.0, what=f"{method} {path}", transient=(TransientError,))

    def _send(self, method: str, path: str, body: Any, file: str | None, params: dict | None) -> bytes:
        try:
            if file is not None:
                with open(file, "rb") as fh:
                    resp = self._http.request(method, path, content=fh, params=params, headers={
                        "Content-Type": "application/octet-stream", "Content-Length": str(os.path.getsize(file))})
            else:
                resp = self._http.request(method, path, json=body, params=params)
        except httpx.TransportError as exc:  # refused, reset by a server going down, timed out
            raise TransientError(0, f"cannot reach {self.base_url}: {type(exc).__name__}: {exc}; is `rayembed up` "
                                    "running?") from None
        if resp.status_code < 400:
            return resp.content
        kind = TransientError if resp.status_code in RETRY_STATUSES else ApiError
        try:
            err = resp.json()["error"]
            raise kind(resp.status_code, err.get("message", ""), err.get("code"), err)
        except (ValueError, KeyError, TypeError):
            raise kind(resp.status_code, resp.text[:500]) from None

    def close(self) -> None:
        self._http.close()


class _Resource:
    model: type[Answer] = Answer

    def __init__(self, http: Http, workspace: str, path: str):
        self._http, self._workspace, self._path = http, workspace, path

    def _url(self, *parts: str, workspace: str | None = None) -> str:
        return "/".join([f"/v2/workspaces/{workspace or self._workspace}/{self._path}", *parts]).rstrip("/")

    def page(self, page: int = 1, page_size: int = schemas.PAGE_SIZE, sort: str = "-created_at", status: str | None = None,
             workspace: str | None = None, **filters: str) -> Page:
        """One page of the list, and its `pagination` (totals); `status` and a route's own `filters` (jobs: `kind`)."""
        params = {"page": page, "page_size": page_size, "sort": sort, **({"status": status} if status else {}),
                  **{k: v for k, v in filters.items() if v is not None}}
        return self._http.request("GET", self._url(workspace=workspace), params=params, retries=5,
                                  model=Page[self.model])

    def list(self, sort: str = "-created_at", status: str | None = None, workspace: str | None = None,
             **filters: str) -> list:
        """Every item (all pages), newest first by default; `status` and a route's own `filters` (jobs: `kind`)."""
        items, number = [], 1
        while True:
            page = self.page(number, schemas.MAX_PAGE_SIZE, sort, status, workspace, **filters)
            items += page.data
            if number >= page.pagination.total_pages:
                return items
            number += 1

    def retrieve(self, name: str, workspace: str | None = None):
        return self._http.request("GET", self._url(name, workspace=workspace), retries=5, model=self.model)

    def delete(self, name: str, workspace: str | None = None):
        return self._http.request("DELETE", self._url(name, workspace=workspace), model=Deleted)

    def _create(self, body: dict, workspace: str | None):
        return self._http.request("POST", self._url(workspace=workspace), {k: v for k, v in body.items() if v is not None},
                                  model=self.model)

    def _wait(self, name: str, timeout_s: float, done: Callable, what: str, workspace: str | None, interval_s: float):
        """Poll `retrieve(name)` until `done(entity)` is true (returning it); a transient refusal is waited out."""
        last: list = [None]

        def check():
            last[0] = entity = self.retrieve(name, workspace)
            return entity if done(entity) else None

        return poll(check, timeout_s=timeout_s, interval_s=interval_s, transient=(TransientError,),
                    what=lambda: f"{what} {name} still {getattr(last[0], 'status', 'unknown')}")


class Models(_Resource):
    model = ModelOut

    def __init__(self, http: Http, workspace: str):
        super().__init__(http, workspace, "models")

    def create(self, name: str, base_model: str | None = None, artifact: str | None = None, description: str = "",
               workspace: str | None = None) -> ModelOut:
        return self._create({"name": name, "base_model": base_model, "artifact": artifact, "description": description}, workspace)

    def wait_ready(self, name: str, timeout_s: float = 1800, workspace: str | None = None) -> ModelOut:
        def ready(model: ModelOut) -> bool:
            if model.status == "failed":
                raise ApiError(409, f"model {name} failed: {model.error}")
            return model.status == "ready"

        return self._wait(name, timeout_s, ready, "model", workspace, 1.0)

    def get_openai_client(self, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=self._http.base_url + "/v1", api_key=kwargs.pop("api_key", self._http.api_key or "unused"),
                      **kwargs)


class Datasets(_Resource):
    """Files uploaded into the cluster's storage, so a job reads them wherever it runs: `dataset: {name: ...}`."""

    model = DatasetOut

    def __init__(self, http: Http, workspace: str):
        super().__init__(http, workspace, "datasets")

    def create(self, name: str, training: str | None = None, validation: str | None = None, evaluation: str | None = None,
               description: str = "", workspace: str | None = None) -> DatasetOut:
        """Create the dataset and upload the files given: JSONL files, and `evaluation`, a local BEIR folder."""
        self._create({"name": name, "description": description}, workspace)
        return self.upload(name, training=training, validation=validation, evaluation=evaluation, workspace=workspace)

    def upload(self, name: str, training: str | None = None, validation: str | None = None, evaluation: str | None = None,
               workspace: str | None = None) -> DatasetOut:
        files = {"training.jsonl": training, "validation.jsonl": validation}
        if evaluation is not None:  # the judgments last: they are checked against the corpus and queries
            files.update({f"evaluation/{p}": os.path.join(evaluation, p) for p in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv")})
        dataset = None
        for path, local in files.items():
            if local is not None:
                url = "/v2/uploads" + self._url(name, "files", path, workspace=workspace).removeprefix("/v2")
                dataset = self._http.request("PUT", url, file=local, model=DatasetOut)  # the upload ingress
        return dataset if dataset is not None else self.retrieve(name, workspace)


class Jobs(_Resource):
    model = JobOut

    def __init__(self, http: Http, workspace: str):
        super().__init__(http, workspace, "customization/jobs")

    def create(self, output_model: str, config: dict | None = None, sweep: dict | None = None,
               workspace: str | None = None) -> JobOut:
        return self._create({"output_model": output_model, "config": config, "sweep": sweep}, workspace)

    def get_status(self, job_id: str, workspace: str | None = None) -> JobStatusOut:
        return self._http.request("GET", self._url(job_id, "status", workspace=workspace), retries=5, model=JobStatusOut)

    def cancel(self, job_id: str, workspace: str | None = None) -> JobOut:
        return self._http.request("POST", self._url(job_id, "cancel", workspace=workspace), model=JobOut)

    def resume(self, job_id: str, workspace: str | None = None) -> JobOut:
        """A failed or cancelled training job, again from its last checkpoint."""
        return self._http.request("POST", self._url(job_id, "resume", workspace=workspace), model=JobOut)

    def get_logs(self, job_id: str, workspace: str | None = None) -> str:
        return self._http.request("GET", self._url(job_id, "logs", workspace=workspace), raw=True, retries=5)

    def wait(self, job_id: str, on_progress: Callable[[JobStatusOut], None] | None = None, timeout_s: float = 24 * 3600,
             poll_s: float = 1.0, workspace: str | None = None) -> JobOut:
        """Until the job is completed, failed or cancelled; `on_progress(status)` on every poll. The control plane
        unavailable for a while (its node died, Ray restarts it elsewhere) is waited out until the deadline."""
        last: list = [None]

        def check():
            last[0] = status = self.get_status(job_id, workspace)
            if on_progress:
                on_progress(status)
            return status if status.status in ("completed", "failed", "cancelled") else None

        poll(check, timeout_s=timeout_s, interval_s=poll_s, transient=(TransientError,),
             what=lambda: f"job {job_id} still {getattr(last[0], 'status', 'unknown')}")
        return self.retrieve(job_id, workspace)


class DeploymentConfigs(_Resource):
    model = DeploymentConfigOut

    def __init__(self, http: Http, workspace: str):
        super().__init__(http, workspace, "deployment-configs")

    def create(self, name: str, model: str, workspace: str | None = None, **settings) -> DeploymentConfigOut:
        return self._create({"name": name, "model": model, **settings}, workspace)

    def retrieve(self, name: str, workspace: str | None = None) -> DeploymentConfigDetail:
        return self._http.request("GET", self._url(name, workspace=workspace), retries=5, model=DeploymentConfigDetail)

    def update(self, name: str, workspace: str | None = None, **changes) -> DeploymentConfigOut:
        return self._http.request("PATCH", self._url(name, workspace=workspace), changes, model=DeploymentConfigOut)


class Deployments(_Resource):
    model = DeploymentOut

    def __init__(self, http: Http, workspace: str):
        super().__init__(http, workspace, "deployments")

    def create(self, name: str, model: str | None = None, config: str | None = None, allow_worse: bool = False,
               workspace: str | None = None, **settings) -> DeploymentOut:
        return self._create({"name": name, "model": model, "config": config, "allow_worse": allow_worse or None,
                             **settings}, workspace)

    def update(self, name: str, workspace: str | None = None, **changes) -> DeploymentOut:
        return self._http.request("PATCH", self._url(name, workspace=workspace), changes, model=DeploymentOut)

    def delete(self, name: str, workspace: str | None = None) -> DeploymentOut:
        """Starts the deletion (DELETING); `wait_deleted` waits until it is gone."""
        return self._http.request("DELETE", self._url(name, workspace=workspace), model=DeploymentOut)

    def verify(self, name: str, workspace: str | None = None) -> DeploymentOut:
        """Score the model's evaluation set through the deployment's replicas again; the answer's `verification`
        holds the served nDCG@10 against the job's, and whether it passed."""
        return self._http.request("POST", self._url(name, "verify", workspace=workspace), model=DeploymentOut)

    def export(self, name: str, format: str = "rayservice", image: str | None = None, k8s_name: str | None = None,
               workspace: str | None = None) -> str:
        """A manifest (YAML) that serves the deployment's model elsewhere: `rayservice`, a KubeRay RayService whose
        containers run `image` (default: the platform's RAYEMBED_IMAGE)."""
        params = {k: v for k, v in {"format": format, "image": image, "k8s_name": k8s_name}.items() if v}
        return self._http.request("GET", self._url(name, "export", workspace=workspace), raw=True, retries=5,
                                  params=params)

    def wait_ready(self, name: str, timeout_s: float = 900, workspace: str | None = None,
                   routable: bool = True) -> DeploymentOut:
        """Until READY with no generation pending (a swap finished), or FAILED (raises); with `routable`,
        also until the gateway routes to its provider (the API picks routes up within a second)."""
        def ready(dep: DeploymentOut) -> bool:
            if dep.status == "FAILED":
                raise ApiError(409, f"deployment {name} failed: {dep.error}")
            return dep.status == "READY" and dep.pending_app is None and dep.pending_model is None

        start = time.monotonic()
        dep = self._wait(name, timeout_s, ready, "deployment", workspace, 0.5)
        if routable:
            url = f"/v2/workspaces/{workspace or self._workspace}/inference/gateway/provider/{name}/-/v1/models"

            def routed():
                try:
                    listing = self._http.request("GET", url)
                except ApiError as exc:
                    if exc.status != 404:
                        raise
                    return None
                return True if any(m.id.split("/")[-1] == dep.model for m in listing.data) else None

            poll(routed, timeout_s=max(1.0, timeout_s - (time.monotonic() - start)), interval_s=0.1,
                 transient=(TransientError,), what=f"deployment {name} is READY but the gateway does not route to it")
        return dep

    def wait_deleted(self, name: str, timeout_s: float = 300, workspace: str | None = None) -> None:
        def gone():
            try:
                self.retrieve(name, workspace)
            except ApiError as exc:
                if exc.status == 404:
                    return True
                raise
            return None

        poll(gone, timeout_s=timeout_s, interval_s=0.5, transient=(TransientError,),
             what=f"deployment {name} still exists")


class Providers(_Resource):
    model = ProviderOut

    def __init__(self, http: Http, workspace: str):
        super().__init__(http, workspace, "providers")


class Workspaces:
    def __init__(self, http: Http):
        self._http = http

    def list(self) -> list[WorkspaceOut]:
        items, number = [], 1
        while True:
            page = self._http.request("GET", "/v2/workspaces", params={"page": number, "page_size": schemas.MAX_PAGE_SIZE},
                                      retries=5, model=Page[WorkspaceOut])
            items += page.data
            if number >= page.pagination.total_pages:
                return items
            number += 1

    def create(self, name: str, description: str = "") -> WorkspaceOut:
        return self._http.request("POST", "/v2/workspaces", {"name": name, "description": description}, model=WorkspaceOut)

    def retrieve(self, name: str) -> WorkspaceOut:
        return self._http.request("GET", f"/v2/workspaces/{name}", retries=5, model=WorkspaceOut)

    def delete(self, name: str) -> Deleted:
        return self._http.request("DELETE", f"/v2/workspaces/{name}", model=Deleted)


class _GatewayRoute:
    def __init__(self, http: Http, workspace: str, kind: str):
        self._http, self._workspace, self._kind = http, workspace, kind

    def post(self, path: str, name: str, body: dict, workspace: str | None = None) -> Obj:
        url = f"/v2/workspaces/{workspace or self._workspace}/inference/gateway/{self._kind}/{name}/-/{path.lstrip('/')}"
        return self._http.request("POST", url, body)

    def get(self, path: str, name: str, workspace: str | None = None) -> Obj:
        url = f"/v2/workspaces/{workspace or self._workspace}/inference/gateway/{self._kind}/{name}/-/{path.lstrip('/')}"
        return self._http.request("GET", url)


class _Namespace:
    def __init__(self, **attrs):
        self.__dict__.update(attrs)


class Client:
    """`api_key`: sent as `Authorization: Bearer` on every call (default: $RAYEMBED_API_KEY; none when unset).
    Answers are the API's own models (cluster/schemas.py): `job.status`, `job.progress.step`, times as datetimes."""

    def __init__(self, base_url: str = "http://127.0.0.1:8080", workspace: str = "default", timeout: float = 120,
                 api_key: str | None = None):
        self.base_url, self.workspace = base_url.rstrip("/"), workspace
        http = self._http = Http(self.base_url, timeout, api_key or os.environ.get("RAYEMBED_API_KEY") or None)
        self.workspaces = Workspaces(http)
        self.models = Models(http, workspace)
        self.datasets = Datasets(http, workspace)
        self.customization = _Namespace(jobs=Jobs(http, workspace))
        self.deployment_configs = DeploymentConfigs(http, workspace)
        self.deployments = Deployments(http, workspace)
        self.providers = Providers(http, workspace)
        self.inference = _Namespace(gateway=_Namespace(model=_GatewayRoute(http, workspace, "model"),
                                                       provider=_GatewayRoute(http, workspace, "provider")))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
