"""State: one small store interface and its embedded default, a SQLite file under the storage root.

Entities are JSON documents keyed by (kind, workspace, name); the schema carries a version and is
migrated forward on open. Writes are transactions, so a crash never leaves half an entity behind.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Protocol

from serve.errors import Unavailable

SCHEMA_VERSION = 2
# version -> statements that bring the schema from version-1 to version
MIGRATIONS: dict[int, list[str]] = {
    1: ["CREATE TABLE objects (kind TEXT NOT NULL, workspace TEXT NOT NULL, name TEXT NOT NULL, body TEXT NOT NULL, "
        "updated_at REAL NOT NULL, PRIMARY KEY (kind, workspace, name))"],
    2: ["CREATE TABLE history (kind TEXT NOT NULL, workspace TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL, "
        "body TEXT NOT NULL, PRIMARY KEY (kind, workspace, name, version))",
        "CREATE INDEX objects_by_workspace ON objects (kind, workspace)"],
}


class StoreError(RuntimeError):
    """The state database cannot be opened or is newer than this rayembed."""


class StoreWriteError(Unavailable):
    """The state file cannot be written (read-only, disk full, locked): a 503 that says what to check."""


class Store(Protocol):
    """What the control plane needs from a database; SQLiteStore is the embedded default."""

    def get(self, kind: str, workspace: str, name: str) -> dict | None: ...
    def list(self, kind: str, workspace: str | None = None) -> list[dict]: ...
    def put(self, kind: str, workspace: str, name: str, body: dict) -> None: ...
    def delete(self, kind: str, workspace: str, name: str) -> bool: ...
    def add_version(self, kind: str, workspace: str, name: str, version: int, body: dict) -> None: ...
    def versions(self, kind: str, workspace: str, name: str) -> list[dict]: ...


class SQLiteStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self.migrate()

    def migrate(self) -> int:
        """Bring the schema to SCHEMA_VERSION; refuse a database written by a newer rayembed."""
        with self._lock:
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            current = int(row[0]) if row else 0
            if current > SCHEMA_VERSION:
                raise StoreError(f"{self.path} has schema version {current}, newer than this rayembed's "
                                 f"{SCHEMA_VERSION}: upgrade rayembed, or point RAYEMBED_HOME elsewhere")
            for version in range(current + 1, SCHEMA_VERSION + 1):
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in MIGRATIONS[version]:
                        self._db.execute(statement)
                    self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)", (str(version),))
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            return SCHEMA_VERSION

    def schema_version(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])

    def get(self, kind: str, workspace: str, name: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT body FROM objects WHERE kind = ? AND workspace = ? AND name = ?",
                                   (kind, workspace, name)).fetchone()
        return json.loads(row[0]) if row else None

    def list(self, kind: str, workspace: str | None = None) -> list[dict]:
        with self._lock:
            if workspace is None:
                rows = self._db.execute("SELECT body FROM objects WHERE kind = ? ORDER BY workspace, name", (kind,))
            else:
                rows = self._db.execute("SELECT body FROM objects WHERE kind = ? AND workspace = ? ORDER BY name",
                                        (kind, workspace))
            return [json.loads(r[0]) for r in rows.fetchall()]

    def _write(self, sql: str, args: tuple) -> sqlite3.Cursor:
        """One statement, one transaction: a write that fails leaves the file as it was."""
        with self._lock:
            try:
                return self._db.execute(sql, args)
            except sqlite3.OperationalError as exc:  # readonly, "database or disk is full", locked past the timeout
                raise StoreWriteError(f"the control plane cannot write its state file {self.path}: {exc}; check that "
                                      "the file and its folder are writable and the disk has free space (nothing "
                                      "was changed)") from None

    def put(self, kind: str, workspace: str, name: str, body: dict) -> None:
        self._write("INSERT OR REPLACE INTO objects (kind, workspace, name, body, updated_at) "
                    "VALUES (?, ?, ?, ?, julianday('now'))", (kind, workspace, name, json.dumps(body)))

    def delete(self, kind: str, workspace: str, name: str) -> bool:
        cur = self._write("DELETE FROM objects WHERE kind = ? AND workspace = ? AND name = ?", (kind, workspace, name))
        return cur.rowcount > 0

    def add_version(self, kind: str, workspace: str, name: str, version: int, body: dict) -> None:
        self._write("INSERT OR REPLACE INTO history (kind, workspace, name, version, body) VALUES (?, ?, ?, ?, ?)",
                    (kind, workspace, name, version, json.dumps(body)))

    def versions(self, kind: str, workspace: str, name: str) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT body FROM history WHERE kind = ? AND workspace = ? AND name = ? ORDER BY version",
                                    (kind, workspace, name)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_store(url: str) -> SQLiteStore:
    """`sqlite:///path/state.db` or a plain path. Other database URLs need a store implementation."""
    if url.startswith("sqlite:///"):
        return SQLiteStore(url.removeprefix("sqlite:///"))
    if "://" in url:
        raise StoreError(f"state URL {url!r}: only SQLite (sqlite:///path or a file path) is implemented in this "
                         "version; a PostgreSQL store would implement cluster.store.Store")
    return SQLiteStore(url)
