"""State: one small store interface, its embedded default (a SQLite file under RAYEMBED_HOME) and PostgreSQL
through SQLAlchemy (RAYEMBED_DATABASE_URL=postgresql+psycopg://...), the state that outlives any one node.

Entities are JSON documents keyed by (kind, workspace, name); the schema carries a version and is
migrated forward on open. Writes are transactions, so a crash never leaves half an entity behind.

Concurrency is optimistic, per entity: a row's `updated_at` column is its body's `updated_at`, and `put` and `delete`
take what the caller read (`expect`): a compare-and-set (`UPDATE ... WHERE updated_at = ?`) that reports whether it
won, so two writers never overwrite each other and nobody holds a lock across a round trip. `expect=None` creates
(insert only if absent); `expect=ANY` writes whatever is there (settings, keys).
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Protocol

from rayembed.errors import Unavailable

SCHEMA_VERSION = 3
ANY = object()  # `expect` for a write that replaces whatever is stored


def _stamp_from_body(execute, fetch) -> None:
    """Schema 3: the `updated_at` column becomes the body's own `updated_at` (it was the store's clock), so a
    compare-and-set can name the version a caller read. In Python: both databases get the very same floats."""
    for kind, workspace, name, body in fetch("SELECT kind, workspace, name, body FROM objects", {}):
        stamp = json.loads(body).get("updated_at")
        if isinstance(stamp, (int, float)):
            execute("UPDATE objects SET updated_at = :t WHERE kind = :k AND workspace = :w AND name = :n",
                    {"t": float(stamp), "k": kind, "w": workspace, "n": name})


# version -> statements that bring the schema from version-1 to version
MIGRATIONS: dict[int, list[str]] = {
    1: ["CREATE TABLE objects (kind TEXT NOT NULL, workspace TEXT NOT NULL, name TEXT NOT NULL, body TEXT NOT NULL, "
        "updated_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (kind, workspace, name))"],
    2: ["CREATE TABLE history (kind TEXT NOT NULL, workspace TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL, "
        "body TEXT NOT NULL, PRIMARY KEY (kind, workspace, name, version))",
        "CREATE INDEX objects_by_workspace ON objects (kind, workspace)"],
    3: [_stamp_from_body],
}


def _stamp(body: dict) -> float:
    stamp = body.get("updated_at")
    return float(stamp) if isinstance(stamp, (int, float)) else time.time()


class StoreError(RuntimeError):
    """The state database cannot be opened or is newer than this rayembed."""


class StoreWriteError(Unavailable):
    """The state file cannot be written (read-only, disk full, locked): a 503 that says what to check."""


class Store(Protocol):
    """What the control plane needs from a database; SQLiteStore is the embedded default."""

    def get(self, kind: str, workspace: str, name: str) -> dict | None: ...
    def list(self, kind: str, workspace: str | None = None) -> list[dict]: ...
    def put(self, kind: str, workspace: str, name: str, body: dict, expect=ANY) -> bool: ...
    def delete(self, kind: str, workspace: str, name: str, expect=ANY) -> bool: ...
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
                        if callable(statement):
                            statement(self._db.execute, lambda sql, args: self._db.execute(sql, args).fetchall())
                        else:
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

    def put(self, kind: str, workspace: str, name: str, body: dict, expect=ANY) -> bool:
        """Write `body`; False when `expect` did not hold (the row exists, for None; it changed or is gone, for a stamp)."""
        args = (kind, workspace, name, json.dumps(body), _stamp(body))
        if expect is ANY:
            sql = "INSERT OR REPLACE INTO objects (kind, workspace, name, body, updated_at) VALUES (?, ?, ?, ?, ?)"
        elif expect is None:
            sql = "INSERT OR IGNORE INTO objects (kind, workspace, name, body, updated_at) VALUES (?, ?, ?, ?, ?)"
        else:
            sql = ("UPDATE objects SET body = ?4, updated_at = ?5 WHERE kind = ?1 AND workspace = ?2 AND name = ?3 "
                   "AND updated_at = ?6")
            args = (*args, float(expect))
        return self._write(sql, args).rowcount > 0

    def delete(self, kind: str, workspace: str, name: str, expect=ANY) -> bool:
        sql, args = "DELETE FROM objects WHERE kind = ? AND workspace = ? AND name = ?", (kind, workspace, name)
        if expect is not ANY:
            sql, args = sql + " AND updated_at = ?", (*args, float(expect))
        return self._write(sql, args).rowcount > 0

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


class SQLAlchemyStore:
    """The same tables and migrations in any database SQLAlchemy reaches; PostgreSQL is the one we test."""

    def __init__(self, url: str):
        try:
            import sqlalchemy as sa
        except ImportError:
            raise StoreError(f"{redacted(url)} needs SQLAlchemy and a driver: pip install 'rayembed[postgres]'") from None
        self.sa = sa
        self.url = url
        try:
            self._engine = sa.create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=8)
        except (sa.exc.ArgumentError, ImportError, sa.exc.NoSuchModuleError) as exc:
            raise StoreError(f"database URL {redacted(url)}: {exc}") from None
        self.migrate()

    def _run(self, write: bool, statements: list[tuple[str, dict]]):
        """Statements in one transaction -> the last one's result rows (or rowcount for a write)."""
        sa = self.sa
        try:
            with self._engine.begin() as conn:
                result = None
                for sql, args in statements:
                    result = conn.execute(sa.text(sql), args)
                return result.rowcount if write else result.fetchall()
        except sa.exc.OperationalError as exc:
            what = "write to" if write else "read"
            raise StoreWriteError(f"the control plane cannot {what} its database {redacted(self.url)}: "
                                  f"{str(exc.orig).strip().splitlines()[0]}; check that the server is up and reachable "
                                  "(nothing was changed)") from None

    def migrate(self) -> int:
        sa = self.sa
        try:
            with self._engine.begin() as conn:
                if conn.dialect.name == "postgresql":  # two heads opening at once migrate one after the other
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(7208454)"))
                conn.execute(sa.text("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"))
                row = conn.execute(sa.text("SELECT value FROM meta WHERE key = 'schema_version'")).fetchone()
                current = int(row[0]) if row else 0
                if current > SCHEMA_VERSION:
                    raise StoreError(f"{redacted(self.url)} has schema version {current}, newer than this rayembed's "
                                     f"{SCHEMA_VERSION}: upgrade rayembed, or point RAYEMBED_DATABASE_URL elsewhere")
                for version in range(current + 1, SCHEMA_VERSION + 1):
                    for statement in MIGRATIONS[version]:
                        if callable(statement):
                            statement(lambda sql, args: conn.execute(sa.text(sql), args),
                                      lambda sql, args: conn.execute(sa.text(sql), args).fetchall())
                        else:
                            conn.execute(sa.text(statement))
                    conn.execute(sa.text("DELETE FROM meta WHERE key = 'schema_version'"))
                    conn.execute(sa.text("INSERT INTO meta (key, value) VALUES ('schema_version', :v)"), {"v": str(version)})
        except sa.exc.OperationalError as exc:
            raise StoreError(f"cannot open the database {redacted(self.url)}: {str(exc.orig).strip()}") from None
        return SCHEMA_VERSION

    def schema_version(self) -> int:
        return int(self._run(False, [("SELECT value FROM meta WHERE key = 'schema_version'", {})])[0][0])

    def get(self, kind: str, workspace: str, name: str) -> dict | None:
        rows = self._run(False, [("SELECT body FROM objects WHERE kind = :k AND workspace = :w AND name = :n",
                                  {"k": kind, "w": workspace, "n": name})])
        return json.loads(rows[0][0]) if rows else None

    def list(self, kind: str, workspace: str | None = None) -> list[dict]:
        if workspace is None:
            rows = self._run(False, [("SELECT body FROM objects WHERE kind = :k ORDER BY workspace, name", {"k": kind})])
        else:
            rows = self._run(False, [("SELECT body FROM objects WHERE kind = :k AND workspace = :w ORDER BY name",
                                      {"k": kind, "w": workspace})])
        return [json.loads(r[0]) for r in rows]

    def put(self, kind: str, workspace: str, name: str, body: dict, expect=ANY) -> bool:
        args = {"k": kind, "w": workspace, "n": name, "b": json.dumps(body), "t": _stamp(body)}
        insert = "INSERT INTO objects (kind, workspace, name, body, updated_at) VALUES (:k, :w, :n, :b, :t) "
        if expect is ANY:
            sql = insert + "ON CONFLICT (kind, workspace, name) DO UPDATE SET body = excluded.body, updated_at = excluded.updated_at"
        elif expect is None:
            sql = insert + "ON CONFLICT (kind, workspace, name) DO NOTHING"
        else:
            sql = ("UPDATE objects SET body = :b, updated_at = :t WHERE kind = :k AND workspace = :w AND name = :n "
                   "AND updated_at = :e")
            args["e"] = float(expect)
        return self._run(True, [(sql, args)]) > 0

    def delete(self, kind: str, workspace: str, name: str, expect=ANY) -> bool:
        sql, args = "DELETE FROM objects WHERE kind = :k AND workspace = :w AND name = :n", {"k": kind, "w": workspace, "n": name}
        if expect is not ANY:
            sql, args = sql + " AND updated_at = :e", {**args, "e": float(expect)}
        return self._run(True, [(sql, args)]) > 0

    def add_version(self, kind: str, workspace: str, name: str, version: int, body: dict) -> None:
        self._run(True, [("INSERT INTO history (kind, workspace, name, version, body) VALUES (:k, :w, :n, :v, :b) "
                          "ON CONFLICT (kind, workspace, name, version) DO UPDATE SET body = excluded.body",
                          {"k": kind, "w": workspace, "n": name, "v": version, "b": json.dumps(body)})])

    def versions(self, kind: str, workspace: str, name: str) -> list[dict]:
        rows = self._run(False, [("SELECT body FROM history WHERE kind = :k AND workspace = :w AND name = :n ORDER BY version",
                                  {"k": kind, "w": workspace, "n": name})])
        return [json.loads(r[0]) for r in rows]

    def close(self) -> None:
        self._engine.dispose()


def redacted(url: str) -> str:
    """A database URL with its password hidden (it goes into logs and the API's ping)."""
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)


def open_store(url: str) -> Store:
    """`sqlite:///path/state.db` or a plain path: the embedded SQLite store; any other SQLAlchemy URL
    (`postgresql+psycopg://user:password@host/db`): that database."""
    if url.startswith("sqlite:///"):
        return SQLiteStore(url.removeprefix("sqlite:///"))
    if url.startswith(("postgresql://", "postgres://")):  # the driver we ship (psycopg 3), not SQLAlchemy's default
        url = "postgresql+psycopg://" + url.partition("://")[2]
    if "://" in url:
        return SQLAlchemyStore(url)
    return SQLiteStore(url)
