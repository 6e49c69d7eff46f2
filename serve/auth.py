"""API keys at the HTTP edge: `Authorization: Bearer <key>` checked against a key ring of hashed keys,
each scoped to workspaces; the health probes need none. Keys are made and revoked by the control plane
(`rayembed keys`); the gateway only ever holds their SHA-256, never a key.

A key is `rek_<id>_<secret>`: the id finds the record, the secret's SHA-256 must match it. A fast hash
is right for a 256-bit random secret (nothing to brute-force), as for GitHub's and Stripe's tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Callable

from rayembed.errors import ServeError, Unauthorized, Unavailable

PREFIX = "rek"
ALL = "*"  # a key for every workspace (an admin key): it also creates and deletes workspaces
OPEN_PATHS = frozenset({"/v1/health/live", "/v1/health/ready"})
SCOPE_KEY = "rayembed.access"  # where the middleware leaves the request's Access in the ASGI scope
HOW = "send the header Authorization: Bearer <key>; `rayembed keys create` makes one"


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key() -> tuple[str, str, str]:
    """-> (key id, the key to hand out once, the digest to store)."""
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    return key_id, f"{PREFIX}_{key_id}_{secret}", digest(secret)


@dataclass(frozen=True)
class Access:
    """What one request may touch: `workspaces` None means all of them (no keys configured, or an admin key)."""

    key_id: str | None = None
    workspaces: frozenset[str] | None = None

    @property
    def admin(self) -> bool:
        return self.workspaces is None

    def allows(self, workspace: str) -> bool:
        return self.workspaces is None or workspace in self.workspaces


OPEN = Access()


class KeyRing:
    """The keys the control plane holds (id -> digest, workspaces). With none, every request is refused, unless
    the operator chose open mode (`open_`: `rayembed up --open`, on a loopback bind only): auth fails closed."""

    def __init__(self, records: list[dict] | tuple = (), open_: bool = False):
        self.keys = {r["id"]: r for r in records}
        self.open = bool(open_) and not self.keys

    @property
    def enabled(self) -> bool:
        return not self.open

    def authenticate(self, header: str | None) -> Access:
        if self.open:
            return OPEN
        if not self.keys:
            raise Unauthorized("this API has no keys yet, so it answers nobody: the operator creates one with "
                               "`rayembed keys create --for WORKSPACE` (or starts a loopback-only install with "
                               "`rayembed up --open`)")
        if not header:
            raise Unauthorized(f"an API key is required: {HOW}")
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized(f"the Authorization header must be 'Bearer <key>': {HOW}")
        parts = token.split("_", 2)
        record = self.keys.get(parts[1]) if len(parts) == 3 and parts[0] == PREFIX else None
        # compare digests in constant time even for an unknown id, so timing does not tell ids apart
        expected = record["sha256"] if record else "0" * 64
        if not hmac.compare_digest(expected, digest(parts[-1])) or record is None:
            raise Unauthorized("invalid API key (unknown, mistyped or revoked); `rayembed keys list` shows the keys")
        scope = record["workspaces"]
        return Access(record["id"], None if ALL in scope else frozenset(scope))


def records_of(text: str, what: str = "RAYEMBED_API_KEYS") -> list[dict]:
    """Keys as the operator hands them out (`rek_<id>_<secret>`, one per line or comma-separated; `#` comments) ->
    key records for every workspace, holding only each secret's SHA-256. ValueError names a malformed entry."""
    records = []
    for n, raw in enumerate(re.split(r"[\s,]+", re.sub(r"#[^\n]*", "", text)), 1):
        if not raw:
            continue
        parts = raw.split("_", 2)
        if len(parts) != 3 or parts[0] != PREFIX or not parts[1] or len(parts[2]) < 16:
            raise ValueError(f"{what}: entry {n} is not an API key (rek_<id>_<secret>, as `rayembed keys create` "
                             "prints them)")
        records.append({"id": parts[1], "sha256": digest(parts[2]), "workspaces": [ALL]})
    return records


def access_of(scope: dict) -> Access:
    """The Access the middleware attached to this request (OPEN on apps without it)."""
    return scope.get(SCOPE_KEY, OPEN)


class BearerAuth:
    """ASGI middleware (no per-request thread or task, unlike BaseHTTPMiddleware): authenticates every
    HTTP request but the health probes, answers 401 through `on_error`, and attaches the Access."""

    def __init__(self, app, ring: Callable[[], KeyRing | None], on_error: Callable):
        self.app, self.ring, self.on_error = app, ring, on_error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        try:
            ring = self.ring()
            if ring is None:  # fail closed until the control plane has said which keys exist
                raise Unavailable("the API is starting and has not loaded its keys yet; retry in a few seconds")
            header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
            scope[SCOPE_KEY] = ring.authenticate(header)
        except ServeError as exc:
            response = self.on_error(exc)
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)
