"""The API ingress's FastAPI app on a real port (uvicorn) in front of a real ControlPlane object, without Ray
Serve: for the security tests, which send real HTTP with real keys."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest

from serve.auth import KeyRing
from serve.settings import GatewayConfig


@pytest.fixture()
def plane(tmp_path, monkeypatch):
    """A ControlPlane over a real SQLite file in tmp_path/home; no reconciling (no Serve here)."""
    from cluster import controlplane

    monkeypatch.setattr(controlplane, "TICK_S", 3600.0)  # no reconciling (no Serve here)
    cp = controlplane.ControlPlane(str(tmp_path / "home"), "http://127.0.0.1:9", "http://127.0.0.1:9")
    yield cp
    cp._stop.set()


class ApiServer:
    """cluster.api's FastAPI app on a real port, its management calls going to a ControlPlane object."""

    def __init__(self, plane, monkeypatch):
        import uvicorn

        from cluster import api, upload_ingress
        from rayembed.runtime import free_port
        from serve.gateway import GatewayCore, install_core

        async def call(method, *args):
            return getattr(plane, method)(*args)

        monkeypatch.setattr(api, "_call", call)
        monkeypatch.setattr(upload_ingress, "call_plane", call)  # the upload route, mounted on the API app here
        self.plane = plane
        install_core(GatewayCore(GatewayConfig(), keys=None))
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(api.app, host="127.0.0.1", port=self.port, log_level="warning"))
        threading.Thread(target=self.server.run, daemon=True).start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)

    def sync(self) -> None:
        """What the Api replica's routes thread does."""
        from serve.gateway import installed_core

        routes = self.plane.routes()
        config = GatewayConfig.model_validate(routes["config"], context={"check_files": False})
        installed_core().set_table(config, routes["workspaces"], KeyRing(routes["keys"], routes.get("open", False)))

    def request(self, method: str, path: str, key: str | None = None, body: dict | None = None,
                raw: bytes | None = None):
        """-> (status, JSON answer, headers). `raw`: the body as bytes (an upload), else `body` as JSON."""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if raw is not None:
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(raw))}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method, headers=headers, data=data)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read()), resp.headers
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read()), exc.headers



    def stop(self) -> None:
        import asyncio

        self.server.should_exit = True
        time.sleep(0.3)
        asyncio.set_event_loop(asyncio.new_event_loop())
