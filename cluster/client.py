"""A Python client shaped like the platform SDK (standard library HTTP only):

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

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable


class ApiError(RuntimeError):
    """An error answer: `status` and the OpenAI-style envelope's `message`, `code`."""

    def __init__(self, status: int, message: str, code: str | None = None, body: Any = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.code, self.body = status, message, code, body


class Obj(dict):
    """A JSON object readable as `obj["status"]` and `obj.status`."""

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
    def __init__(self, base_url: str, timeout: float, api_key: str | None = None):
        self.base_url, self.timeout, self.api_key = base_url.rstrip("/"), timeout, api_key

    def request(self, method: str, path: str, body: Any = None, raw: bool = False, retries: int = 0, file: str | None = None):
        """`file`: a local file sent as the body, streamed from disk (a dataset upload)."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data else {}
        if file is not None:
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(os.path.getsize(file))}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(retries + 1):
            fh = open(file, "rb") if file is not None else None
            req = urllib.request.Request(self.base_url + path, data=fh or data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    payload = resp.read()
                return payload.decode() if raw else _wrap(json.loads(payload))
            except urllib.error.HTTPError as exc:
                payload = exc.read()
                try:
                    err = json.loads(payload)["error"]
                    error = ApiError(exc.code, err.get("message", ""), err.get("code"), err)
                except (ValueError, KeyError, TypeError):
                    error = ApiError(exc.code, payload.decode(errors="replace")[:500])
                if exc.code != 503 or attempt == retries:
                    raise error from None
            except (urllib.error.URLError, ConnectionError) as exc:  # refused, or reset by a server going down
                if attempt == retries:
                    reason = getattr(exc, "reason", None) or exc
                    raise ApiError(0, f"cannot reach {self.base_url}: {reason}; is `rayembed up` running?") from None
            finally:
                if fh is not None:
                    fh.close()
            time.sleep(1.0)


class _Resource:
    def __init__(self, http: Http, workspace: str, path: str):
        self._http, self._workspace, self._path = http, workspace, path

    def _url(self, *parts: str, workspace: str | None = None) -> str:
        return "/".join([f"/v2/workspaces/{workspace or self._workspace}/{self._path}", *parts]).rstrip("/")

    def list(self, workspace: str | None = None) -> list[Obj]:
        return self._http.request("GET", self._url(workspace=workspace), retries=5)["data"]

    def retrieve(self, name: str, workspace: str | None = None) -> Obj:
        return self._http.request("GET", self._url(name, workspace=workspace), retries=5)

    def delete(self, name: str, workspace: str | None = None) -> Obj:
        return self._http.request("DELETE", self._url(name, workspace=workspace))

    def _create(self, body: dict, workspace: str | None) -> Obj:
        return self._http.request("POST", self._url(workspace=workspace), {k: v for k, v in body.items() if v is not None})


class Models(_Resource):
    def __init__(self, http: Http, workspace: str):
        super().__init__(http, workspace, "models")

    def create(self, name: str, base_model: str | None = None, artifact: str | None = None, description: str = "",
               workspace: str | None = None) -> Obj:
        return self._create({"name": name, "base_model": base_model, "artifact": artifact, "description": description}, workspace)

    def wait_ready(self, name: str, timeout_s: float = 1800, workspace: str | None = None) -> Obj:
        deadline = time.monotonic() + timeout_s
        while True:
            model = self.retrieve(name, workspace)
            if model.status == "ready":
                return model
            if model.status == "failed":
                raise ApiError(409, f"model {name} failed: {model.error}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"model {name} still {model.status} after {timeout_s:.0f} s")
            time.sleep(1.0)

    def get_openai_client(self, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=self._http.base_url + "/v1", api_key=kwargs.pop("api_key", self._http.api_key or "unused"),
                      **kwargs)


class Datasets(_Resource):
    """Files uploaded into the cluster's storage, so a job reads them wherever it runs: `dataset: {name: ...}`."""

    def __init__(self, http: Http, workspace: str):
        super().__init__(http, workspace, "datasets")

    def create(self, name: str, training: str | None = None, validation: str | None = None, evaluation: str | None = None,
               description: str = "", workspace: str | None = None) -> Obj:
        """Create the dataset and upload the files given: JSONL files, and `evaluation`, a local BEIR folder."""
        self._create({"name": name, "description": description}, workspace)
        return self.upload(name, training=training, validation=validation, evaluation=evaluation, workspace=workspace)

    def upload(self, name: str, training: str | None = None, validation: str | None = None, evaluation: str | None = None,
               workspace: str | None = None) -> Obj:
        files = {"training.jsonl": training, "validation.jsonl": validation}
        if evaluation is not None:  # the judgments last: they are checked against the corpus and queries
            files.update({f"evaluation/{p}": os.path.join(evaluation, p) for p in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv")})
        dataset = None
        for path, local in files.items():
            if local is not None:
                dataset = self._http.request("PUT", self._url(name, "files", path, workspace=workspace), file=local)
        return dataset if dataset is not None else self.retrieve(name, workspace)


class Jobs(_Resource):
    def __init__(self, http: Http, workspace: str):
        super().__init__(http, workspace, "customization/jobs")

    def create(self, output_model: str, config: dict | None = None, sweep: dict | None = None,
               workspace: str | None = None) -> Obj:
        return self._create({"output_model": output_model, "config": config, "sweep": sweep}, workspace)

    def get_status(self, job_id: str, workspace: str | None = None) -> Obj:
        return self._http.request("GET", self._url(job_id, "status", workspace=workspace), retries=5)

    def cancel(self, job_id: str, workspace: str | None = None) -> Obj:
        return self._http.request("POST", self._url(job_id, "cancel", workspace=workspace))

    def resume(self, job_id: str, workspace: str | None = None) -> Obj:
        """A failed or cancelled training job, again from its last checkpoint."""
        return self._http.request("POST", self._url(job_id, "resume", workspace=workspace))

    def get_logs(self, job_id: str, workspace: str | None = None) -> str:
        return self._http.request("GET", self._url(job_id, "logs", workspace=workspace), raw=True, retries=5)

    def wait(self, job_id: str, on_progress: Callable[[Obj], None] | None = None, timeout_s: float = 24 * 3600,
             poll_s: float = 1.0, workspace: str | None = None) -> Obj:
        """Until the job is completed, failed or cancelled; `on_progress(status)` on every poll. The control plane
        unavailable for a while (its node died, Ray restarts it elsewhere) is waited out until the deadline."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                status = self.get_status(job_id, workspace)
            except ApiError as exc:
                if exc.status != 503 or time.monotonic() > deadline:
                    raise
                time.sleep(poll_s)
                continue
            if on_progress:
                on_progress(status)
            if status.status in ("completed", "failed", "cancelled"):
                return self.retrieve(job_id, workspace)
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {status.status} after {timeout_s:.0f} s")
            time.sleep(poll_s)


class DeploymentConfigs(_Resource):
    def __init__(self, http: Http, workspace: str):
        super().__init__(http, workspace, "deployment-configs")

    def create(self, name: str, model: str, workspace: str | None = None, **settings) -> Obj:
        return self._create({"name": name, "model": model, **settings}, workspace)

    def update(self, name: str, workspace: str | None = None, **changes) -> Obj:
        return self._http.request("PATCH", self._url(name, workspace=workspace), changes)


class Deployments(_Resource):
    def __init__(self, http: Http, workspace: str):
        super().__init__(http, workspace, "deployments")

    def create(self, name: str, model: str | None = None, config: str | None = None, allow_worse: bool = False,
               workspace: str | None = None, **settings) -> Obj:
        return self._create({"name": name, "model": model, "config": config, "allow_worse": allow_worse or None,
                             **settings}, workspace)

    def update(self, name: str, workspace: str | None = None, **changes) -> Obj:
        return self._http.request("PATCH", self._url(name, workspace=workspace), changes)

    def export(self, name: str, format: str = "rayservice", image: str | None = None, k8s_name: str | None = None,
               workspace: str | None = None) -> str:
        """A manifest (YAML) that serves the deployment's model elsewhere: `rayservice`, a KubeRay RayService whose
        containers run `image` (default: the platform's RAYEMBED_IMAGE)."""
        query = urllib.parse.urlencode({k: v for k, v in {"format": format, "image": image, "k8s_name": k8s_name}.items() if v})
        return self._http.request("GET", self._url(name, "export", workspace=workspace) + "?" + query, raw=True, retries=5)

    def wait_ready(self, name: str, timeout_s: float = 900, workspace: str | None = None, routable: bool = True) -> Obj:
        """Until READY with no generation pending (a swap finished), or FAILED (raises); with `routable`,
        also until the gateway routes to its provider (the API picks routes up within a second)."""
        deadline = time.monotonic() + timeout_s
        while True:
            dep = self.retrieve(name, workspace)
            if dep.status == "READY" and dep.pending_app is None and dep.pending_model is None:
                if routable:
                    self._wait_routable(name, dep.model, workspace, deadline)
                return dep
            if dep.status == "FAILED":
                raise ApiError(409, f"deployment {name} failed: {dep.error}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"deployment {name} still {dep.status} after {timeout_s:.0f} s")
            time.sleep(0.5)

    def _wait_routable(self, name: str, model: str, workspace: str | None, deadline: float) -> None:
        url = f"/v2/workspaces/{workspace or self._workspace}/inference/gateway/provider/{name}/-/v1/models"
        while True:
            try:
                listing = self._http.request("GET", url)
                if any(m.id.split("/")[-1] == model for m in listing.data):
                    return
            except ApiError as exc:
                if exc.status != 404:
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"deployment {name} is READY but the gateway does not route to it")
            time.sleep(0.1)

    def wait_deleted(self, name: str, timeout_s: float = 300, workspace: str | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self.retrieve(name, workspace)
            except ApiError as exc:
                if exc.status == 404:
                    return
                raise
            time.sleep(0.5)
        raise TimeoutError(f"deployment {name} still exists after {timeout_s:.0f} s")


class Providers(_Resource):
    def __init__(self, http: Http, workspace: str):
        super().__init__(http, workspace, "providers")


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
    """`api_key`: sent as `Authorization: Bearer` on every call (default: $RAYEMBED_API_KEY; none when unset)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8080", workspace: str = "default", timeout: float = 120,
                 api_key: str | None = None):
        self.base_url, self.workspace = base_url.rstrip("/"), workspace
        http = self._http = Http(self.base_url, timeout, api_key or os.environ.get("RAYEMBED_API_KEY") or None)
        self.models = Models(http, workspace)
        self.datasets = Datasets(http, workspace)
        self.customization = _Namespace(jobs=Jobs(http, workspace))
        self.deployment_configs = DeploymentConfigs(http, workspace)
        self.deployments = Deployments(http, workspace)
        self.providers = Providers(http, workspace)
        self.inference = _Namespace(gateway=_Namespace(model=_GatewayRoute(http, workspace, "model"),
                                                       provider=_GatewayRoute(http, workspace, "provider")))

    @property
    def workspaces(self) -> _Namespace:
        http = self._http
        return _Namespace(
            list=lambda: http.request("GET", "/v2/workspaces", retries=5)["data"],
            create=lambda name, description="": http.request("POST", "/v2/workspaces", {"name": name, "description": description}),
            retrieve=lambda name: http.request("GET", f"/v2/workspaces/{name}", retries=5),
            delete=lambda name: http.request("DELETE", f"/v2/workspaces/{name}"))
