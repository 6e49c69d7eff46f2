"""Where the platform keeps its state and how its parts find each other (read when called, never at import)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

CONTROL_PLANE = "rayembed-control-plane"  # the detached actor's name
NAMESPACE = "rayembed"
API_APP = "rayembed-api"  # the Serve application of the API ingress
UPLOAD_APP = "rayembed-uploads"  # the upload ingress (cluster/upload_ingress.py), apart from the API's replica
DEFAULT_PORT = 8080


@dataclass(frozen=True)
class Settings:
    home: Path  # RAYEMBED_HOME: state.db, job and model folders, the local cluster's record
    host: str
    port: int
    state_url: str | None  # RAYEMBED_DATABASE_URL: another database than <home>/state.db (PostgreSQL for a cluster)
    storage: str  # RAYEMBED_STORAGE: datasets, jobs' outputs and models; a URI (s3://...) that every node reads
    proxy_location: str  # RAYEMBED_PROXY_LOCATION: where Serve runs HTTP proxies (EveryNode, HeadOnly)
    control_plane_resources: dict  # RAYEMBED_CONTROL_PLANE_RESOURCES: JSON, custom resources pinning the actor to nodes

    @property
    def base_url(self) -> str:
        return f"http://{'127.0.0.1' if self.host == '0.0.0.0' else self.host}:{self.port}"


def settings() -> Settings:
    home = Path(os.environ.get("RAYEMBED_HOME") or Path.home() / ".rayembed").expanduser().absolute()
    return Settings(home=home, host=os.environ.get("RAYEMBED_HOST", "127.0.0.1"),
                    port=int(os.environ.get("RAYEMBED_PORT", DEFAULT_PORT)),
                    state_url=os.environ.get("RAYEMBED_DATABASE_URL") or os.environ.get("RAYEMBED_STATE_URL") or None,
                    storage=os.environ.get("RAYEMBED_STORAGE") or str(home),
                    proxy_location=os.environ.get("RAYEMBED_PROXY_LOCATION") or "EveryNode",
                    control_plane_resources=json.loads(os.environ.get("RAYEMBED_CONTROL_PLANE_RESOURCES") or "{}"))
