"""What a tenant's request may name: entities, never places. A job through the API names a dataset and a base
model (a model entity of its workspace, or a base model the operator allowed); the server picks every
location it writes. Files outside the storage root are read only under a grant the operator gave the
workspace (`rayembed workspaces grant WS PREFIX`), or a global data root of a single-tenant install
(`rayembed up --data-root DIR`). Every location goes through the one parser (rayembed.locations).

The operator (who has Ray access: the CLI over Ray, `python -m train`) is not confined.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from rayembed.config import places
from rayembed.errors import InvalidRequest, shown
from rayembed.locations import LocationError, parse

# The base models a tenant may name without the operator listing them: the packaged all-MiniLM-L6-v2.
PACKAGED_BASE_MODELS = ("all-MiniLM-L6-v2",)
BASE_MODELS_ENV = "RAYEMBED_BASE_MODELS"


def data_roots(given: list[str] | tuple[str, ...] = ()) -> list[str]:
    """--data-root values, else RAYEMBED_DATA_ROOTS (os.pathsep-separated; the ':' of a URI's '://' does not
    separate); none by default. Each is parsed (rayembed.locations) and given back normalised."""
    listed = re.split(re.escape(os.pathsep) + r"(?!//)", os.environ.get("RAYEMBED_DATA_ROOTS", ""))
    roots = list(given) or [r for r in listed if r]
    out = []
    for r in roots:
        try:
            out.append(str(parse(str(Path(r).expanduser()) if "://" not in r else r, f"data root {r!r}")))
        except LocationError as exc:
            raise ValueError(str(exc)) from None
    return out


def check_data_roots(roots: list[str], storage_root: str, home: str) -> None:
    """Refuse a data root that overlaps the storage root or RAYEMBED_HOME (every workspace's files would lie under
    it), or that holds the user's home folder; ValueError says which and why."""
    guarded = {"the storage root": storage_root, "RAYEMBED_HOME": home}
    for r in roots:
        root = parse(r, f"data root {r!r}")
        for what, value in guarded.items():
            if root.overlaps(parse(value, what)):
                raise ValueError(f"data root {r} overlaps {what} ({value}): every workspace's datasets and models "
                                 "would lie under it; give a folder that holds only data to share")
        user_home = parse(str(Path.home()), "the home folder")
        if user_home.within(root):
            raise ValueError(f"data root {r} holds the home folder {Path.home()}: give the folder of the data itself")


def allowed_base_models(listed: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """The packaged base models plus the ones the operator lists (RAYEMBED_BASE_MODELS, os.pathsep-separated:
    Hub ids, or local folders given exactly as tenants must name them)."""
    # os.pathsep-separated, as RAYEMBED_DATA_ROOTS: the ':' of a URI's '://' does not separate
    env = re.split(re.escape(os.pathsep) + r"(?!//)", os.environ.get(BASE_MODELS_ENV, ""))
    extra = list(listed) if listed is not None else [m for m in env if m]
    return list(dict.fromkeys([*PACKAGED_BASE_MODELS, *extra]))


class Confinement:
    """One workspace's reading rights outside its own (server-chosen) folder: its grants and the global roots."""

    def __init__(self, grants: list[str]):
        self.grants = [parse(g, "grant") for g in grants]

    def read(self, value, field: str) -> str:
        """`value` normalised, if it lies under a grant; else a 400 that tells what to do, and nothing about the
        file (whether it exists is not revealed)."""
        try:
            loc = parse(value, field)
        except LocationError as exc:
            raise InvalidRequest(f"{exc}; name an uploaded dataset instead (dataset: {{name: ...}})", field) from None
        if not any(loc.within(g) for g in self.grants):
            granted = ", ".join(map(str, self.grants)) or "none"
            raise InvalidRequest(f"{field}: {shown(value)} is outside the locations this workspace may read "
                                 f"(grants: {granted}); upload it as a dataset (`rayembed datasets create`) and name "
                                 "it (dataset: {name: ...}), or ask the operator for a grant", field)
        return value

    def job(self, cls, raw: dict, field: str) -> None:
        """Every place a tenant's raw job or sweep config (`cls`: its config class) sets: reads only under a grant,
        no write location (the server chooses them), no model path (resolved to an entity or an allowed base model
        by the caller). Refused before anything is written."""
        for key, kind, value in places(cls, raw):
            where = f"{field}.{key}"
            if kind == "write":
                raise InvalidRequest(f"{where}: the server chooses where a job writes; remove {key}", where)
            if kind == "read":
                self.read(value, where)
