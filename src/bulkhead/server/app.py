"""The FastAPI application: wiring only. Routers are discovered from `bulkhead.server.api`
(every module exposing `router`), mounted under `/api/v1`."""

from __future__ import annotations

import importlib
import pkgutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bulkhead import __version__
from bulkhead.server.db import Database
from bulkhead.server.errors import DomainError
from bulkhead.server.metrics import REQUEST_SECONDS
from bulkhead.server.policystate import PolicyState
from bulkhead.server.settings import Settings

PROBLEM = "application/problem+json"


def problem(status: int, title: str, detail: str, type_: str = "about:blank",
            errors: list[dict[str, str]] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"type": type_, "title": title, "status": status, "detail": detail}
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM)


def _loc_path(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = list(loc)
    where = parts.pop(0) if parts and parts[0] in ("body", "query", "path", "header") else ""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return f"{where}:{out}" if where and where != "body" else out


class BodyLimit:
    """Reject request bodies over `limit` bytes (by Content-Length, and while streaming)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for k, v in scope.get("headers", []):
            if k == b"content-length" and v.isdigit() and int(v) > self.limit:
                await self._reject(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return msg

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        resp = problem(413, "Payload too large",
                       f"request body exceeds {self.limit} bytes", "/problems/too-large")
        await resp(scope, receive, send)


class _TooLarge(Exception):
    pass


def create_app(settings: Settings | None = None, db: Database | None = None,
               flows: Any = None) -> FastAPI:
    settings = settings or Settings.from_env()
    if db is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        db = Database(settings.db_url)
        db.migrate()
    owns_flows = flows is None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        store = app.state.flows
        if owns_flows and store is not None and hasattr(store, "close"):
            store.close()  # moves staged rows into place; nothing is lost without it

    app = FastAPI(title="Bulkhead", version=__version__, openapi_url="/api/v1/openapi.json",
                  docs_url="/api/docs", redoc_url=None, lifespan=lifespan)
    app.state.settings = settings
    app.state.db = db
    app.state.flows = flows if flows is not None else _open_flow_store(settings)
    app.state.policy = PolicyState()
    _rebuild_policy_state(db, app.state.policy)

    @app.exception_handler(DomainError)
    async def _domain(_: Request, exc: DomainError) -> JSONResponse:
        return problem(exc.status, exc.title, exc.detail, exc.type,
                       [{"path": e.path, "message": e.message} for e in exc.errors])

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"path": _loc_path(e.get("loc", ())), "message": str(e.get("msg", ""))}
                  for e in exc.errors()]
        return problem(422, "Invalid input", f"{len(errors)} invalid field(s)",
                       "/problems/invalid", errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem(exc.status_code, str(exc.detail), str(exc.detail))

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    import bulkhead.server.api as api_pkg

    for mod in sorted(m.name for m in pkgutil.iter_modules(api_pkg.__path__)):
        module = importlib.import_module(f"bulkhead.server.api.{mod}")
        router = getattr(module, "router", None)
        if router is not None:
            app.include_router(router, prefix="/api/v1")
        root_router = getattr(module, "root_router", None)
        if root_router is not None:  # e.g. /metrics, where scrapers expect it
            app.include_router(root_router)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(Timing)
    return app


def _open_flow_store(settings: Settings) -> Any:
    try:
        from bulkhead.flows.store import DuckDBFlowStore
    except ImportError:  # the flow store module is optional for policy-only deployments
        return None
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return DuckDBFlowStore(settings.flows_file)


def _rebuild_policy_state(db: Database, state: PolicyState) -> None:
    """Load the active version and inventory into the compiled state (at start-up)."""
    try:
        from bulkhead.server.services.versions import rebuild_state
    except ImportError:
        return
    with db.transaction() as session:
        rebuild_state(session, state)


class Timing:
    """Request latency per route template into the Prometheus histogram."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def capture(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            REQUEST_SECONDS.labels(scope.get("method", ""), path, str(status[0])).observe(
                time.perf_counter() - start)
