"""FastAPI dependencies, as `Annotated` aliases: the database session (one transaction per
request), the calling principal, and permission checks."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from bulkhead.server.auth import Principal
from bulkhead.server.db import Database
from bulkhead.server.errors import Forbidden, Unauthorized
from bulkhead.server.settings import Settings

# token prefix -> "module:function" resolving (session, token) to a Principal or None
TOKEN_RESOLVERS: dict[str, str] = {
    "bhs_": "bulkhead.server.services.users:resolve_session",
    "bhk_": "bulkhead.server.services.users:resolve_api_key",
    "bhg_": "bulkhead.server.services.agents:resolve_agent",
}


def get_db(request: Request) -> Database:
    db = request.app.state.db
    assert isinstance(db, Database)
    return db


def get_settings(request: Request) -> Settings:
    s = request.app.state.settings
    assert isinstance(s, Settings)
    return s


def get_session(request: Request) -> Iterator[Session]:
    with get_db(request).transaction() as session:
        yield session


# scope="function": the transaction commits when the handler returns, BEFORE the response is
# sent, so a failed commit is a 500 and never an acknowledged-but-lost write.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def _resolver(prefix: str) -> Callable[[Session, str], Principal | None] | None:
    target = TOKEN_RESOLVERS.get(prefix)
    if target is None:
        return None
    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    return fn  # type: ignore[no-any-return]


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def get_principal(request: Request, session: SessionDep) -> Principal:
    token = bearer(request)
    if token is None:
        raise Unauthorized("missing bearer token")
    resolve = _resolver(token[:4])
    principal = resolve(session, token) if resolve is not None else None
    if principal is None:
        raise Unauthorized("invalid or expired credential")
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require(permission: str) -> Callable[[Principal], Principal]:
    """Dependency factory: the principal, if it holds `permission`; else 403."""

    def check(principal: PrincipalDep) -> Principal:
        if not principal.can(permission):
            raise Forbidden(f"{principal.label} lacks permission {permission!r}")
        return principal

    check.__name__ = f"require_{permission.replace(':', '_')}"
    return check


def Requires(permission: str) -> type[Principal]:
    """`principal: Requires("policy:write")` in a handler signature."""
    return Annotated[Principal, Depends(require(permission))]  # type: ignore[return-value]
