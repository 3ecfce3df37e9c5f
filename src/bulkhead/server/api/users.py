"""`/users`: user management (owners and admins), and their API keys.

Owners manage everyone; admins manage everyone but owners; auditors read. Users are never
deleted (their names stay meaningful in the audit log): disable them instead.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, get_args

from fastapi import APIRouter, Depends, Path, Query, status
from pydantic import AwareDatetime, BaseModel, Field, StringConstraints, field_validator

from bulkhead.policy.fileformat import KEY_RE
from bulkhead.server.api.audit import MAX_ID
from bulkhead.server.auth import ROLES, Principal
from bulkhead.server.db import utcnow
from bulkhead.server.deps import SessionDep, require
from bulkhead.server.models.users import ApiKey, User
from bulkhead.server.schemas.policy import Input
from bulkhead.server.services import users as svc

router = APIRouter(tags=["users"])

RoleName = Literal["owner", "admin", "policy_editor", "viewer", "auditor"]
assert set(get_args(RoleName)) == set(ROLES), "RoleName must list auth.ROLES"

UsersReader = Annotated[Principal, Depends(require("users:read"))]
UsersWriter = Annotated[Principal, Depends(require("users:write"))]
Id = Annotated[int, Path(ge=1, le=MAX_ID)]

UserName = Annotated[str, StringConstraints(pattern=svc.NAME_PATTERN)]
Password = Annotated[str, StringConstraints(min_length=svc.MIN_PASSWORD,
                                            max_length=svc.MAX_PASSWORD)]
LabelKey = Annotated[str, StringConstraints(pattern=KEY_RE.pattern)]
LabelValue = Annotated[str, StringConstraints(min_length=1, max_length=128,
                                              pattern=r"^[^\x00-\x1f\x7f]+$")]
Scope = Annotated[dict[LabelKey, Annotated[list[LabelValue], Field(min_length=1,
                                                                   max_length=100)]],
                  Field(min_length=1, max_length=32,
                        description="policy editors only: rulesets they edit must be scoped "
                                    "inside these labels (key → allowed values)")]
KeyName = Annotated[str, StringConstraints(min_length=1, max_length=64,
                                           pattern=r"^[^\x00-\x1f\x7f]+$")]


class Strict(Input):
    """Request bodies: unknown fields and NUL characters are refused."""


class UserCreate(Strict):
    name: UserName
    password: Password
    role: RoleName
    scope: Scope | None = None


class UserUpdate(Strict):
    """Only the fields given change; `scope: null` clears an editor's scope."""

    role: RoleName | None = None
    scope: Scope | None = None
    disabled: bool | None = None
    password: Password | None = Field(None, description="an administrator's password reset")

    @field_validator("role", "disabled", "password")
    @classmethod
    def _not_null(cls, v: Any) -> Any:
        if v is None:
            raise ValueError("may be omitted but not null")
        return v


class UserPublic(BaseModel):
    id: int
    name: str
    role: str
    scope: dict[str, list[str]] | None
    disabled: bool
    locked: bool = Field(description="refusing logins after repeated failures")
    created_at: datetime
    last_login_at: datetime | None

    @classmethod
    def of(cls, u: User) -> UserPublic:
        return cls(id=u.id, name=u.name, role=u.role, scope=u.scope, disabled=u.disabled,
                   locked=svc.is_locked(u), created_at=u.created_at,
                   last_login_at=u.last_login_at)


class ApiKeyCreate(Strict):
    name: KeyName
    role: RoleName | None = Field(None, description="default: the user's role; may be lower")
    scope: Scope | None = None
    expires_at: AwareDatetime | None = None


class ApiKeyPublic(BaseModel):
    id: int
    user_id: int
    name: str
    hint: str = Field(description="the first characters of the token")
    role: str = Field(description="the role asked for; it acts with at most its user's role")
    scope: dict[str, list[str]] | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    active: bool

    @classmethod
    def of(cls, k: ApiKey) -> ApiKeyPublic:
        now = utcnow()
        active = k.revoked_at is None and (k.expires_at is None or k.expires_at > now)
        return cls(id=k.id, user_id=k.user_id, name=k.name, hint=k.hint, role=k.role,
                   scope=k.scope, created_at=k.created_at, expires_at=k.expires_at,
                   revoked_at=k.revoked_at, last_used_at=k.last_used_at, active=active)


class ApiKeyCreated(ApiKeyPublic):
    token: str = Field(description="the bearer token; shown only in this response")


def create_key(session: SessionDep, actor: Principal, user_id: int,
               body: ApiKeyCreate) -> ApiKeyCreated:
    key, token = svc.create_api_key(session, actor=actor, user_id=user_id, name=body.name,
                                    role=body.role, scope=body.scope,
                                    expires_at=body.expires_at)
    return ApiKeyCreated(**ApiKeyPublic.of(key).model_dump(), token=token)


# -- routes ----------------------------------------------------------------------------------

@router.get("/users", response_model=list[UserPublic], summary="List users")
def list_users(session: SessionDep, _: UsersReader, role: RoleName | None = None,
               disabled: Annotated[bool | None, Query()] = None) -> list[UserPublic]:
    return [UserPublic.of(u) for u in svc.list_users(session, role=role, disabled=disabled)]


@router.post("/users", response_model=UserPublic, status_code=status.HTTP_201_CREATED,
             summary="Create a user (only owners create owners)")
def create_user(session: SessionDep, actor: UsersWriter, body: UserCreate) -> UserPublic:
    user = svc.create_user(session, actor=actor, name=body.name, password=body.password,
                           role=body.role, scope=body.scope)
    return UserPublic.of(user)


@router.get("/users/{user_id}", response_model=UserPublic, summary="One user")
def get_user(session: SessionDep, _: UsersReader, user_id: Id) -> UserPublic:
    return UserPublic.of(svc.get_user(session, user_id=user_id))


@router.patch("/users/{user_id}", response_model=UserPublic,
              summary="Change role, scope, disabled flag or password")
def update_user(session: SessionDep, actor: UsersWriter, user_id: Id,
                body: UserUpdate) -> UserPublic:
    given = body.model_fields_set
    changes: dict[str, Any] = {f: getattr(body, f) for f in given}
    user = svc.update_user(session, actor=actor, user_id=user_id, **changes)
    return UserPublic.of(user)


@router.get("/users/{user_id}/api-keys", response_model=list[ApiKeyPublic],
            summary="A user's API keys")
def list_user_keys(session: SessionDep, _: UsersReader, user_id: Id) -> list[ApiKeyPublic]:
    svc.get_user(session, user_id=user_id)
    return [ApiKeyPublic.of(k) for k in svc.list_api_keys(session, user_id=user_id)]


@router.post("/users/{user_id}/api-keys", response_model=ApiKeyCreated,
             status_code=status.HTTP_201_CREATED,
             summary="Create an API key for a user (e.g. a service account)")
def create_user_key(session: SessionDep, actor: UsersWriter, user_id: Id,
                    body: ApiKeyCreate) -> ApiKeyCreated:
    return create_key(session, actor, user_id, body)


@router.delete("/users/{user_id}/api-keys/{key_id}", response_model=ApiKeyPublic,
               summary="Revoke a user's API key")
def revoke_user_key(session: SessionDep, actor: UsersWriter, user_id: Id,
                    key_id: Id) -> ApiKeyPublic:
    return ApiKeyPublic.of(svc.revoke_api_key(session, actor=actor, key_id=key_id,
                                              user_id=user_id))
