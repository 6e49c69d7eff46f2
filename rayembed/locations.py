"""The one parser of locations: every path or URI an operator or a tenant gives is decoded, normalised and
checked here, then compared by path parts, never by string prefix. Tenants name entities, so this only
sees the places an operator configured (the storage root, data roots, a workspace's grants).

Refused outright: percent escapes (pyarrow decodes them, so `%2e%2e` would be `..`), query strings and
fragments (`?endpoint_override=...` would point reads at any host), userinfo (`s3://KEY:SECRET@bucket`: a
secret that would be copied into every URI the API returns), backslashes, NUL and control characters,
`~`, Windows drive letters, and `..` or `.` parts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

SCHEMES = frozenset({"file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss"})
_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*)://(.*)$", re.IGNORECASE | re.DOTALL)
_DRIVE = re.compile(r"^[A-Za-z]:")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{0,254}$")


class LocationError(ValueError):
    """A location that is not accepted, with the reason and what to give instead."""


@dataclass(frozen=True, order=True)
class Location:
    """A parsed location: `scheme` '' for a local path; `host` the bucket (or ''); `parts` the path's parts."""

    scheme: str
    host: str
    parts: tuple[str, ...]

    def __str__(self) -> str:
        path = "/".join(self.parts)
        if not self.scheme:
            return "/" + path
        if self.scheme == "file":
            return "file:///" + path
        return f"{self.scheme}://{self.host}" + (f"/{path}" if path else "")

    def within(self, root: "Location") -> bool:
        """True when this is `root` or lies under it (same scheme and bucket, `root`'s parts a prefix of ours)."""
        return ((self.scheme or "file") == (root.scheme or "file") and self.host == root.host
                and self.parts[:len(root.parts)] == root.parts)

    def overlaps(self, other: "Location") -> bool:
        return self.within(other) or other.within(self)


def _check_text(value: str, what: str) -> None:
    if not value:
        raise LocationError(f"{what} is empty")
    if len(value) > 4096:
        raise LocationError(f"{what} is longer than 4096 characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise LocationError(f"{what} holds a control character")
    for char, why in (("%", "a percent escape (give the decoded name)"), ("\\", "a backslash"),
                      ("?", "a query string (set storage options in the environment, e.g. AWS_ENDPOINT_URL)"),
                      ("#", "a fragment")):
        if char in value:
            raise LocationError(f"{what} holds {why}")


def _parts(path: str, what: str) -> tuple[str, ...]:
    parts = tuple(p for p in path.split("/") if p)
    for p in parts:
        if p in (".", ".."):
            raise LocationError(f"{what} holds a {p!r} part: give the location itself")
        if p.startswith("~"):
            raise LocationError(f"{what} holds '~': give an absolute path")
    return parts


def parse(value: str, what: str = "location", resolve_local: bool = True) -> Location:
    """`value` as a Location, or LocationError naming `what`. A local path must be absolute (or is made so) and,
    with `resolve_local`, has its symlinks followed, so a link inside a root cannot lead out of it."""
    if not isinstance(value, str):
        raise LocationError(f"{what} must be a string")
    _check_text(value, what)
    m = _SCHEME.match(value)
    if m is None:
        if "://" in value or (":" in value.split("/")[0] and _DRIVE.match(value)):
            raise LocationError(f"{what} {value!r} is neither an absolute path nor a URI this platform reads")
        if value.startswith("~"):
            raise LocationError(f"{what} starts with '~': give an absolute path")
        _parts(value, what)  # `..` refused before anything is resolved
        path = Path(value).absolute()
        if resolve_local:
            path = path.resolve()
        return Location("", "", _parts(str(PurePosixPath(path)), what))
    scheme, rest = m.group(1).lower(), m.group(2)
    if scheme not in SCHEMES:
        raise LocationError(f"{what}: the scheme {scheme}:// is not one the storage layer reads ({', '.join(sorted(SCHEMES))})")
    if scheme == "file":
        if not rest.startswith("/"):
            raise LocationError(f"{what}: a file:// URI needs an absolute path (file:///...)")
        local = parse(rest, what, resolve_local)
        return Location("file", "", local.parts)
    host, _, path = rest.partition("/")
    if "@" in host:
        raise LocationError(f"{what} holds credentials (user:secret@): give them through the environment "
                            "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) instead")
    if not _BUCKET.match(host):
        raise LocationError(f"{what}: {host!r} is not a bucket name (lowercase letters, digits, '.', '-', '_')")
    return Location(scheme, host, _parts(path, what))


def inside(value: str, roots: list[str] | tuple[str, ...], what: str = "location") -> Location:
    """`value` parsed, if it lies within one of `roots` (each parsed the same way); else LocationError."""
    loc = parse(value, what)
    for root in roots:
        if loc.within(parse(root, "root")):
            return loc
    raise LocationError(f"{what} is outside the locations granted here")
