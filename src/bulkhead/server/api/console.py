"""The web console: static files under `/console/` (no build step), `/` redirects there.

Plain Starlette routes, not API routes: they take no credential by design (the files are
public, like any static site) and stay out of the OpenAPI schema. Every page is a client of
the public API (`/api/v1`) and logs in like any API client, keeping its token in
sessionStorage.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response

from bulkhead.server.app import problem

root_router = APIRouter(include_in_schema=False)
STATIC = Path(__file__).resolve().parent.parent / "console"
TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css",
         ".html": "text/html", ".svg": "image/svg+xml", ".json": "application/json"}
# the console talks only to its own origin; inline code and framing are refused
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


def _headers() -> dict[str, str]:
    return {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


async def root(_: Request) -> Response:
    return RedirectResponse("/console/", status_code=307)


def resolve(path: str) -> Path | None:
    """The file for a console path; any path without an extension is the app shell; None
    for a path outside the console directory or a missing file."""
    base = STATIC.resolve()
    try:
        target = (base / path).resolve() if path else base / "index.html"
    except (ValueError, OSError):  # a NUL byte (%00), a symlink loop, a name too long
        return None
    if not target.is_relative_to(base):
        return None
    if not target.suffix and not target.is_file():
        target = base / "index.html"  # a client-side route
    return target if target.is_file() else None


async def console_file(request: Request) -> Response:
    path = str(request.path_params.get("path", ""))
    target = resolve(path)
    if target is None:
        return problem(404, "Not found", f"path:{path}: not a console file",
                       "/problems/not-found")
    media = TYPES.get(target.suffix) or mimetypes.guess_type(target.name)[0] or \
        "application/octet-stream"
    return FileResponse(target, media_type=media, headers=_headers())


root_router.add_route("/", root, methods=["GET"], include_in_schema=False)
root_router.add_route("/console", root, methods=["GET"], include_in_schema=False)
root_router.add_route("/console/{path:path}", console_file, methods=["GET"],
                      include_in_schema=False)
