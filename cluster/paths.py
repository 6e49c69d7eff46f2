"""Which files a job or model registration submitted through the API may touch: its own workspace's
folder under the storage root (<home>/workspaces/<ws>) and the data roots the operator allowed
(`rayembed up --data-root DIR`, RAYEMBED_DATA_ROOTS; by default the folder `up` ran in). Paths are
resolved (symlinks and `..` followed) before the check, so neither escapes a root.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from rayembed.errors import InvalidRequest, shown
from rayembed.regression import SHIPPED as SHIPPED_REGRESSION_SETS

# A Hub model id (owner/name) or a packaged name: not a path, nothing local is read.
MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


def data_roots(given: list[str] | tuple[str, ...] = ()) -> list[str]:
    """--data-root values, else RAYEMBED_DATA_ROOTS (os.pathsep-separated; the ':' of a URI's '://' does not
    separate), else the current folder."""
    listed = re.split(re.escape(os.pathsep) + r"(?!//)", os.environ.get("RAYEMBED_DATA_ROOTS", ""))
    roots = list(given) or [r for r in listed if r]
    return [r if "://" in r else str(Path(r).expanduser().resolve()) for r in roots or ["."]]


class Confinement:
    """The roots one workspace's API requests may read from, and the folder they may write to."""

    def __init__(self, own: str, roots: list[str]):
        """`own`: the workspace's folder in the storage root (a URI, or a local folder)."""
        self.own = own if "://" in own else str(Path(own).resolve())
        self.roots = roots

    def describe(self) -> str:
        return ", ".join([str(self.own), *self.roots])

    def _inside(self, value: str, roots: list[str]) -> bool:
        if "://" in value:  # a remote URI (s3://, gs://): only under a root given as a URI, never through '..'
            if ".." in value.partition("?")[0].split("/"):
                return False
            return any(value.startswith(r.rstrip("/") + "/") for r in roots if "://" in r)
        path = Path(value).expanduser().resolve()
        return any(path == Path(r) or path.is_relative_to(r) for r in roots if "://" not in r)

    def read(self, value: str | None, field: str) -> None:
        if value is not None and not self._inside(value, [str(self.own), *self.roots]):
            raise InvalidRequest(f"{field}: {shown(value)} is outside the folders this workspace's jobs may read "
                                 f"({self.describe()}); upload it as a dataset (`rayembed datasets create`), copy "
                                 "it there, or start the cluster with `rayembed up --data-root DIR`", field)

    def write(self, value: str | None, field: str) -> None:
        if value is not None and not self._inside(value, [str(self.own)]):
            raise InvalidRequest(f"{field}: {shown(value)} is outside this workspace's folder {self.own}; "
                                 "leave it unset", field)

    def model(self, value: str | None, field: str) -> None:
        """A model is a local folder (confined) or a name that reads nothing local (packaged, Hub id)."""
        if value is None:
            return
        if MODEL_ID.match(value) and ".." not in value and not Path(value).expanduser().exists():
            return
        self.read(value, field)

    def job(self, cfg, field: str) -> None:
        """Every path a training job config reads or writes (paths already absolute)."""
        self.model(cfg.model, f"{field}.model")
        for key in ("training", "validation", "evaluation"):
            self.read(getattr(cfg.dataset, key), f"{field}.dataset.{key}")
        if cfg.dataset.regression not in SHIPPED_REGRESSION_SETS:  # a shipped set's name reads no tenant-chosen place
            self.read(cfg.dataset.regression, f"{field}.dataset.regression")
        if cfg.dataset.mining is not None:
            self.read(cfg.dataset.mining.corpus, f"{field}.dataset.mining.corpus")
            self.write(cfg.dataset.mining.cache_dir, f"{field}.dataset.mining.cache_dir")
