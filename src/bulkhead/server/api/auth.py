"""`/auth`: password login and logout, who am I, my password, my API keys.

`POST /auth/login` is the only route here that takes no credential. A refused login is recorded
(failure counter, lock-out, audit entry) and committed before the 401 goes out, so its
transaction is managed here rather than by `SessionDep`. The other routes need a user
credential (a session token or an API key, of any role; agents are refused).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response, status
from pydantic import BaseModel, Field

from bulkhead.server.api.users import ApiKeyCreate, ApiKeyCreated, ApiKeyPublic, Id, create_key
from bulkhead.server.auth import Principal
from bulkhead.server.db import Database
from bulkhead.server.deps import PrincipalDep, SessionDep, bearer, get_db, get_settings
from bulkhead.server.errors import DomainError, Forbidden, Unauthorized
from bulkhead.server.schemas.policy import Input
from bulkhead.server.services import users as svc

router = APIRouter(tags=["auth"])
DbDep = Annotated[Database, Depends(get_db)]


def any_user(principal: PrincipalDep) -> Principal:
    """Any authenticated user, whatever the role (password session or API key)."""
    if principal.kind not in svc.USER_KINDS:
        raise Forbidden(f"{principal.label} is not a user")
    return principal


UserDep = Annotated[Principal, Depends(any_user)]


class LoginRequest(Input):
    name: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=svc.MAX_PASSWORD)


class LoginResponse(BaseModel):
    token: str = Field(description="send as `Authorization: Bearer <token>`")
    token_type: str = "bearer"
    expires_at: datetime


class Me(BaseModel):
    kind: str = Field(description="user (password session) or api_key")
    id: int
    name: str
    role: str | None
    scope: dict[str, list[str]] | None
    permissions: list[str]


class PasswordChange(Input):
    current_password: str = Field(min_length=1, max_length=svc.MAX_PASSWORD)
    new_password: str = Field(min_length=svc.MIN_PASSWORD, max_length=svc.MAX_PASSWORD)


@router.post("/auth/login", response_model=LoginResponse,
             summary="Log in with name and password; returns a session token",
             responses={401: {"description": "wrong name or password, disabled or locked"}})
def login(request: Request, db: DbDep, body: LoginRequest) -> LoginResponse:
    settings = get_settings(request)
    client = request.client.host if request.client else None
    with db.transaction() as session:
        outcome = svc.login(session, name=body.name, password=body.password,
                            session_hours=settings.session_hours, client=client)
    if outcome.token is None or outcome.expires_at is None:
        raise Unauthorized("wrong name or password")
    return LoginResponse(token=outcome.token, expires_at=outcome.expires_at)


@router.post("/auth/logout", status_code=status.HTTP_204_NO_CONTENT,
             summary="End the session of the presented token")
def logout(request: Request, session: SessionDep, actor: UserDep) -> Response:
    token = bearer(request) or ""
    if not svc.logout(session, actor=actor, token=token):
        raise DomainError("only a session token can be logged out; revoke an API key instead",
                          status=400, title="Bad request", type="/problems/not-a-session")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/auth/me", response_model=Me, summary="The calling user")
def me(actor: UserDep) -> Me:
    return Me(kind=actor.kind, id=actor.id, name=actor.name, role=actor.role,
              scope=actor.scope, permissions=sorted(actor.permissions))


@router.post("/auth/password", status_code=status.HTTP_204_NO_CONTENT,
             summary="Change my password (ends my other sessions)")
def change_password(request: Request, session: SessionDep, actor: UserDep,
                    body: PasswordChange) -> Response:
    svc.change_own_password(session, actor=actor, current_password=body.current_password,
                            new_password=body.new_password, keep_token=bearer(request))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/auth/api-keys", response_model=list[ApiKeyPublic], summary="My API keys")
def my_keys(session: SessionDep, actor: UserDep) -> list[ApiKeyPublic]:
    return [ApiKeyPublic.of(k) for k in svc.list_api_keys(session, user_id=actor.id)]


@router.post("/auth/api-keys", response_model=ApiKeyCreated,
             status_code=status.HTTP_201_CREATED,
             summary="Create an API key for myself (my role or a lower one)")
def create_my_key(session: SessionDep, actor: UserDep, body: ApiKeyCreate) -> ApiKeyCreated:
    return create_key(session, actor, actor.id, body)


@router.delete("/auth/api-keys/{key_id}", response_model=ApiKeyPublic,
               summary="Revoke one of my API keys")
def revoke_my_key(session: SessionDep, actor: UserDep, key_id: Id) -> ApiKeyPublic:
    return ApiKeyPublic.of(svc.revoke_api_key(session, actor=actor, key_id=key_id,
                                              user_id=actor.id))
