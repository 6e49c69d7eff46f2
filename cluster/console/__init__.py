"""The web console (`/console`) and the API's reference (`/docs`, a vendored Swagger UI): static files shipped in the
wheel, served by the API ingress ahead of its key check. The pages hold no data and no key: they are clients of the
public /v2 API and call it with the key the user types (kept in sessionStorage), so the key check stays where it is.

Every page is plain ES modules and SVG drawn by the page, under a Content-Security-Policy with no inline script and
no origin but this one: nothing is fetched from a CDN, so the console works on an air-gapped cluster."""

from __future__ import annotations

from pathlib import Path

STATIC = Path(__file__).parent / "static"
PREFIX = "/console"
ASSETS = PREFIX + "/static/"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".svg": "image/svg+xml", ".png": "image/png", ".txt": "text/plain; charset=utf-8", "": "text/plain; charset=utf-8"}
# the console sets no inline style either; Swagger UI's React components set style attributes, so /docs allows them
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
DOCS_CSP = CSP.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'")
PAGES = {PREFIX: "index.html", PREFIX + "/": "index.html", "/docs": "docs.html"}


def _files() -> dict[str, Path]:
    """URL path -> file: only what ships under static/ (a request names a key of this table, never a path)."""
    table = {ASSETS + p.relative_to(STATIC).as_posix(): p for p in STATIC.rglob("*") if p.is_file()}
    table.update({url: STATIC / name for url, name in PAGES.items()})
    return table


class ConsoleFiles:
    """ASGI middleware: GET/HEAD of a console or docs path answers from the table, every other request goes on."""

    def __init__(self, app):
        self.app = app
        self.files = _files()
        self.cache: dict[str, tuple[int, bytes]] = {}

    def _read(self, path: str, file: Path) -> bytes:
        """The file's bytes, read again only when it changed (a stat per request; the bundle is 1.8 MB)."""
        stamp = file.stat().st_mtime_ns
        if self.cache.get(path, (None,))[0] != stamp:
            self.cache[path] = (stamp, file.read_bytes())
        return self.cache[path][1]

    def _mine(self, path: str) -> bool:
        return path in PAGES or path.startswith(PREFIX + "/")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self._mine(scope["path"]):
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        file = self.files.get(path)
        if method not in ("GET", "HEAD"):
            status, body, kind = 405, b"the console's files are read with GET", ".txt"
        elif file is None:
            status, body, kind = 404, b"no such console file", ".txt"
        else:
            status, body, kind = 200, self._read(path, file), file.suffix
        headers = [(b"content-type", TYPES.get(kind, TYPES[""]).encode()), (b"content-length", str(len(body)).encode()),
                   (b"content-security-policy", (DOCS_CSP if path == "/docs" else CSP).encode()),
                   (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                   (b"x-frame-options", b"DENY"), (b"cache-control", b"no-cache")]
        if status == 405:
            headers.append((b"allow", b"GET, HEAD"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})


def install(app) -> None:
    """Outside the API's key check (added after it, so it runs first): the pages themselves need no key."""
    app.add_middleware(ConsoleFiles)
