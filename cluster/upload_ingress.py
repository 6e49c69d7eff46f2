"""The upload ingress: its own Serve application (`rayembed-uploads`, route prefix /v2/uploads), so a dataset
upload never passes through the process that serves inference. Ray Serve's ingress reads a request body into
the replica as fast as it arrives (serve/_private/direct_ingress_http_util.py queues every message), so the
replica an upload goes through holds the body: here, that is this replica, with its own memory reservation and
at most MAX_AT_ONCE uploads at a time, and not the API replica that answers /v1/embeddings.

    PUT /v2/uploads/workspaces/{workspace}/datasets/{name}/files/{path}   (the body is the file)

Keys and workspace scopes are the API's (serve/auth.py), followed from the control plane every half second.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Literal

import ray
from fastapi import FastAPI, Path, Request
from fastapi.responses import Response
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from cluster import schemas, uploads
from cluster.entities import DATASET_FILES, NAME_PATTERN
from cluster.settings import CONTROL_PLANE, NAMESPACE
from rayembed.errors import NotFound, ServeError, Unavailable, shown
from serve.auth import BearerAuth, KeyRing, access_of
from serve.http import error_response, install_error_handlers, json_response

log = logging.getLogger("ray.serve")
PREFIX = "/v2/uploads"
ROUTE = "/workspaces/{workspace}/datasets/{name}/files/{path:path}"
UPLOAD_MEMORY_BYTES = 4 * 2**30  # the replica's reservation: Serve holds each upload's body while it streams
KEYS_POLL_S = 0.5

app = FastAPI(title="rayembed uploads", docs_url=None, redoc_url=None, openapi_url=None)
install_error_handlers(app)
# Serve ships the ingress class and the app by value (cloudpickle), so, as in serve/gateway.py, the key ring lives in
# this importable module, set and read through its named functions (pickled by reference).
_RING: list[KeyRing | None] = [None]  # None until the control plane said which keys exist: refuse meanwhile


def installed_ring() -> KeyRing | None:
    return _RING[0]


def install_ring(ring: KeyRing) -> None:
    _RING[0] = ring


app.add_middleware(BearerAuth, ring=installed_ring, on_error=error_response)


async def call_plane(method: str, *args):
    """A ControlPlane method; its typed errors come back as they are, an absent actor as a 503."""
    try:
        return await getattr(ray.get_actor(CONTROL_PLANE, namespace=NAMESPACE), method).remote(*args)
    except RayTaskError as exc:
        if isinstance(exc.cause, ServeError):
            raise exc.cause from None
        raise
    except (RayActorError, ActorUnavailableError, ValueError) as exc:
        raise Unavailable(f"the control plane is not available ({type(exc).__name__}); retry in a few seconds") from None


def _name(what: str):
    return Path(description=f"the {what}'s name", pattern=NAME_PATTERN)


@app.put(ROUTE)
async def upload_dataset_file(request: Request, workspace: str = _name("workspace"), name: str = _name("dataset"),
                              path: Literal[tuple(DATASET_FILES)] = Path(description="the dataset file")  # type: ignore[valid-type]
                              ) -> Response:
    """The request body is the file, streamed to storage and validated in a Ray task (cluster/uploads.py)."""
    try:
        access = access_of(request.scope)
        if not access.allows(workspace):  # another workspace answers as one that does not exist
            raise NotFound(f"workspace {shown(workspace)} does not exist; create it with POST /v2/workspaces")
        declared = request.headers.get("content-length")
        dataset = await call_plane("begin_upload", workspace, name, path,
                                   int(declared) if declared and declared.isdigit() else None)
        who = access.key_id or (request.client.host if request.client else "-")
        try:
            stored = await uploads.upload(request, dataset, path, who)
        except BaseException:
            await call_plane("end_upload", workspace, name, path)
            raise
        answer = await call_plane("add_dataset_file", workspace, name, path, stored)
        return json_response(schemas.DatasetOut.model_validate(answer).model_dump(mode="json"))
    except Exception as exc:  # noqa: BLE001 - the one edge handler renders the envelope
        return error_response(exc)


@serve.deployment(ray_actor_options={"num_cpus": 0, "memory": UPLOAD_MEMORY_BYTES},
                  max_ongoing_requests=uploads.MAX_AT_ONCE, logging_config={"enable_access_log": False})
@serve.ingress(app)
class UploadIngress:
    def __init__(self):
        self._version = None
        threading.Thread(target=self._follow_keys, name="keys", daemon=True).start()

    def _follow_keys(self) -> None:
        warned = False
        while True:
            try:
                routes = ray.get(ray.get_actor(CONTROL_PLANE, namespace=NAMESPACE).routes.remote(self._version), timeout=10)
                if routes is not None:
                    install_ring(KeyRing(routes["keys"], routes.get("open", False)))
                    self._version = routes["version"]
                warned = False
            except Exception as exc:  # noqa: BLE001 - the control plane may be restarting
                if not warned:
                    log.warning("keys from the control plane: %s: %s", type(exc).__name__, exc)
                    warned = True
            time.sleep(KEYS_POLL_S)


def build_upload_app(args: dict | None = None):
    return UploadIngress.bind()
