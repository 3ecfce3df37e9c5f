"""Users, logins, sessions and API keys: the use cases behind `/auth`, `/users` and the
`bulkhead server user|api-key` commands.

Theory of operation. A password login creates a `UserSession` row holding the SHA-256 digest of
a fresh `bhs_` token; an API key is an `ApiKey` row holding the digest of a `bhk_` token. Each
request resolves its bearer token to a `Principal` (`resolve_session`, `resolve_api_key`,
registered in `deps.TOKEN_RESOLVERS`) by reading the user's *current* row, so disabling a user
or changing a role takes effect on the next request. A principal's `id` is always the user's id
(for sessions and API keys alike); `kind` says how they authenticated.

An API key carries its user's role unless a lower one was asked for; "lower" means "a subset of
the permissions" (`auth.PERMISSIONS`), re-checked at every use, so demoting a user also caps
their keys. Nobody can mint a credential stronger than the one they act with.

Failed logins cost the same Argon2 verification whether or not the name exists, are audited
(without the password, and without the attempted name when no such user exists, since people
type passwords into name fields), and after `LOCK_AFTER` consecutive failures the account
refuses logins for `LOCK_BASE_S` seconds, doubling per further failure up to `LOCK_MAX_S`;
a refused login looks exactly like a wrong password to the caller.

Functions are keyword-only, run inside the caller's transaction and raise domain errors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bulkhead.server import auth
from bulkhead.server.auth import ROLES, Principal, permissions_for
from bulkhead.server.db import utcnow
from bulkhead.server.errors import Conflict, FieldError, Forbidden, Invalid, NotFound
from bulkhead.server.models.users import ApiKey, User, UserSession
from bulkhead.server.services.audit import audit

MIN_PASSWORD: Final = 12
MAX_PASSWORD: Final = 1024
NAME_PATTERN: Final = r"^[a-z0-9][a-z0-9._@-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)
LOCK_AFTER: Final = 5
LOCK_BASE_S: Final = 60
LOCK_MAX_S: Final = 900
API_KEY_TOUCH_S: Final = 60  # last_used_at is written at most this often per key
USER_KINDS: Final = frozenset({"user", "api_key"})


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset()


# -- validation ------------------------------------------------------------------------------

def check_name(name: str, path: str = "name") -> str:
    if not _NAME_RE.match(name):
        raise Invalid("invalid user name", [FieldError(
            path, "1-64 characters: lower-case letters, digits and . _ @ -, "
                  "starting with a letter or digit")])
    return name


def check_password(password: str, path: str = "password") -> str:
    if len(password) < MIN_PASSWORD:
        raise Invalid("password too short",
                      [FieldError(path, f"must be at least {MIN_PASSWORD} characters")])
    if len(password) > MAX_PASSWORD:
        raise Invalid("password too long",
                      [FieldError(path, f"must be at most {MAX_PASSWORD} characters")])
    return password


def check_role(role: str, path: str = "role") -> str:
    if role not in ROLES:
        raise Invalid("unknown role", [FieldError(path, f"must be one of {', '.join(ROLES)}")])
    return role


def check_scope(role: str, scope: dict[str, list[str]] | None,
                path: str = "scope") -> dict[str, list[str]] | None:
    """A normalised editor scope (sorted, de-duplicated values), or None."""
    if scope is None:
        return None
    if role != "policy_editor":
        raise Invalid("scope applies only to policy editors",
                      [FieldError(path, "only the policy_editor role takes a scope")])
    if not scope:
        raise Invalid("empty scope", [FieldError(path, "give at least one label key, "
                                                       "or omit the scope")])
    out: dict[str, list[str]] = {}
    for key, values in scope.items():
        if not key or not values or any(not v for v in values):
            raise Invalid("invalid scope", [FieldError(
                f"{path}.{key}", "label keys and values must be non-empty")])
        out[key] = sorted(set(values))
    return out


def scope_within(inner: dict[str, list[str]] | None, outer: dict[str, list[str]] | None) -> bool:
    """True when every workload inside `inner` is inside `outer` (None: unrestricted)."""
    if outer is None:
        return True
    if inner is None:
        return False
    return all(k in inner and set(inner[k]) <= set(v) for k, v in outer.items())


def role_within(role: str, other: str) -> bool:
    """`role` grants nothing that `other` does not."""
    return permissions_for(role) <= permissions_for(other)


# -- snapshots (audit images and public forms; never a secret) ------------------------------

def user_image(user: User) -> dict[str, Any]:
    return {"id": user.id, "name": user.name, "role": user.role, "scope": user.scope,
            "disabled": user.disabled}


def key_image(key: ApiKey) -> dict[str, Any]:
    return {"id": key.id, "user_id": key.user_id, "name": key.name, "role": key.role,
            "scope": key.scope, "hint": key.hint,
            "expires_at": key.expires_at.isoformat() if key.expires_at else None,
            "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None}


def is_locked(user: User, now: datetime | None = None) -> bool:
    return user.locked_until is not None and user.locked_until > (now or utcnow())


# -- users -----------------------------------------------------------------------------------

def get_user(session: Session, *, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise NotFound(f"user {user_id} not found")
    return user


def find_user(session: Session, *, name: str) -> User:
    user = session.scalars(select(User).where(User.name == name)).one_or_none()
    if user is None:
        raise NotFound(f"user {name!r} not found")
    return user


def list_users(session: Session, *, role: str | None = None,
               disabled: bool | None = None) -> list[User]:
    q = select(User).order_by(User.id)
    if role is not None:
        q = q.where(User.role == role)
    if disabled is not None:
        q = q.where(User.disabled == disabled)
    return list(session.scalars(q))


def owner_exists(session: Session) -> bool:
    return session.scalar(select(func.count()).select_from(User)
                          .where(User.role == "owner")) != 0


def _other_enabled_owners(session: Session, user: User) -> int:
    # FOR UPDATE serialises concurrent demotions of the last two owners (PostgreSQL);
    # SQLite has a single writer anyway.
    rows = session.scalars(select(User.id).where(User.role == "owner", User.disabled.is_(False),
                                                 User.id != user.id).with_for_update())
    return len(list(rows))


def _require_manage(actor: Principal, *roles: str) -> None:
    if not actor.can("users:write"):
        raise Forbidden(f"{actor.label} lacks permission 'users:write'")
    if "owner" in roles and not actor.can("users:owner"):
        raise Forbidden("only owners can create, change or disable owners")


def create_user(session: Session, *, actor: Principal, name: str, password: str, role: str,
                scope: dict[str, list[str]] | None = None) -> User:
    check_name(name)
    check_role(role)
    scope = check_scope(role, scope)
    check_password(password)
    _require_manage(actor, role)
    if session.scalars(select(User.id).where(User.name == name)).first() is not None:
        raise Conflict(f"user {name!r} already exists", [FieldError("name", "already taken")])
    user = User(name=name, password_hash=auth.hash_password(password), role=role, scope=scope,
                disabled=False, failed_logins=0, created_at=utcnow(),
                password_changed_at=utcnow())
    session.add(user)
    try:
        session.flush()
    except IntegrityError as exc:  # a concurrent create of the same name
        raise Conflict(f"user {name!r} already exists",
                       [FieldError("name", "already taken")]) from exc
    audit(session, actor=actor, action="user.create", target=f"user:{name}",
          after=user_image(user))
    return user


def update_user(session: Session, *, actor: Principal, user_id: int,
                role: str | _Unset = UNSET,
                scope: dict[str, list[str]] | _Unset | None = UNSET,
                disabled: bool | _Unset = UNSET,
                password: str | _Unset = UNSET) -> User:
    """Change role, editor scope, disabled flag and/or password (an administrator's reset).

    Admins manage non-owners; only owners touch owners. The last enabled owner cannot be
    demoted or disabled (409). A password reset or disabling ends the user's sessions."""
    user = get_user(session, user_id=user_id)
    new_role = user.role if isinstance(role, _Unset) else check_role(role)
    _require_manage(actor, user.role, new_role)
    if isinstance(scope, _Unset):
        new_scope = user.scope if new_role == "policy_editor" else None
    else:
        new_scope = check_scope(new_role, scope)
    new_disabled = user.disabled if isinstance(disabled, _Unset) else disabled
    if not isinstance(password, _Unset):
        check_password(password)
    if (user.role == "owner" and not user.disabled
            and (new_role != "owner" or new_disabled)
            and _other_enabled_owners(session, user) == 0):
        raise Conflict("this is the last enabled owner: create or enable another owner first")
    before = user_image(user)
    user.role, user.scope, user.disabled = new_role, new_scope, new_disabled
    notes = []
    if not isinstance(password, _Unset):
        user.password_hash = auth.hash_password(password)
        user.password_changed_at = utcnow()
        user.failed_logins, user.locked_until = 0, None
        notes.append("password reset")
    if new_disabled and not before["disabled"]:
        notes.append("disabled")
    if notes:
        _end_sessions(session, user_id=user.id)
    session.flush()
    audit(session, actor=actor, action="user.update", target=f"user:{user.name}",
          before=before, after=user_image(user), note="; ".join(notes) or None)
    return user


def change_own_password(session: Session, *, actor: Principal, current_password: str,
                        new_password: str, keep_token: str | None = None) -> User:
    """A user changes their own password; every other session of theirs ends."""
    if actor.kind not in USER_KINDS:
        raise Forbidden("only users have passwords")
    user = get_user(session, user_id=actor.id)
    if not auth.verify_password(user.password_hash, current_password):
        raise Invalid("current password is wrong",
                      [FieldError("current_password", "does not match")])
    check_password(new_password, "new_password")
    user.password_hash = auth.hash_password(new_password)
    user.password_changed_at = utcnow()
    keep = auth.token_digest(keep_token) if keep_token else None
    _end_sessions(session, user_id=user.id, keep_digest=keep)
    audit(session, actor=actor, action="user.password_change", target=f"user:{user.name}",
          note="password changed by its user")
    return user


def _end_sessions(session: Session, *, user_id: int, keep_digest: str | None = None) -> None:
    q = delete(UserSession).where(UserSession.user_id == user_id)
    if keep_digest is not None:
        q = q.where(UserSession.digest != keep_digest)
    session.execute(q)


# -- login / logout --------------------------------------------------------------------------

@dataclass(frozen=True)
class LoginOutcome:
    token: str | None  # None: refused (the caller answers 401 after committing)
    expires_at: datetime | None = None
    user: User | None = None

    @property
    def ok(self) -> bool:
        return self.token is not None


_dummy_hash: str | None = None


def _dummy() -> str:
    global _dummy_hash
    if _dummy_hash is None:
        _dummy_hash = auth.hash_password("timing-equaliser-not-a-password")
    return _dummy_hash


def login(session: Session, *, name: str, password: str, session_hours: float,
          client: str | None = None) -> LoginOutcome:
    """Check a password login. Failures are recorded (counter, lock-out, audit) in `session`,
    so the caller must commit even when the outcome is a refusal."""
    now = utcnow()
    dummy = _dummy()  # made before any lookup, so the first unknown name costs no extra hash
    user = (session.scalars(select(User).where(User.name == name)).one_or_none()
            if _NAME_RE.match(name) else None)
    where = f" from {client}" if client else ""
    if user is None:
        auth.verify_password(dummy, password)  # same cost as a real check
        audit(session, actor="anonymous", action="auth.login_failed", target="user:<unknown>",
              note=f"unknown user{where}")
        return LoginOutcome(None)
    locked = is_locked(user, now)
    good = auth.verify_password(user.password_hash, password)
    if locked or user.disabled or not good:
        reason = "locked" if locked else "disabled" if user.disabled else "wrong password"
        if not good and not locked:
            user.failed_logins += 1
            if user.failed_logins >= LOCK_AFTER:
                seconds = min(LOCK_MAX_S, LOCK_BASE_S * 2 ** (user.failed_logins - LOCK_AFTER))
                user.locked_until = now + timedelta(seconds=seconds)
                reason += f"; locked for {seconds}s after {user.failed_logins} failures"
        audit(session, actor="anonymous", action="auth.login_failed",
              target=f"user:{user.name}", note=f"{reason}{where}")
        return LoginOutcome(None)
    if _needs_rehash(user.password_hash):
        user.password_hash = auth.hash_password(password)
    user.failed_logins, user.locked_until, user.last_login_at = 0, None, now
    session.execute(delete(UserSession).where(UserSession.expires_at <= now))
    token = auth.new_token("session")
    expires = now + timedelta(hours=session_hours)
    session.add(UserSession(user_id=user.id, digest=auth.token_digest(token), created_at=now,
                            expires_at=expires))
    audit(session, actor=f"user:{user.name}", action="auth.login", target=f"user:{user.name}",
          note=f"session until {expires.isoformat()}{where}")
    return LoginOutcome(token, expires, user)


def _needs_rehash(stored: str) -> bool:
    from argon2 import PasswordHasher

    hasher = auth._argon()
    return isinstance(hasher, PasswordHasher) and hasher.check_needs_rehash(stored)


def logout(session: Session, *, actor: Principal, token: str) -> bool:
    """End the session of `token`; False when `token` is not a session token."""
    row = session.scalars(select(UserSession)
                          .where(UserSession.digest == auth.token_digest(token))).one_or_none()
    if row is None:
        return False
    session.delete(row)
    audit(session, actor=actor, action="auth.logout", target=f"user:{actor.name}")
    return True


# -- token resolvers (deps.TOKEN_RESOLVERS) --------------------------------------------------

def _principal(kind: str, user: User, role: str,
               scope: dict[str, list[str]] | None) -> Principal:
    return Principal(kind, user.id, user.name, role,
                     scope if role == "policy_editor" else None, permissions_for(role))


def resolve_session(session: Session, token: str) -> Principal | None:
    row = session.execute(select(UserSession, User).join(User, User.id == UserSession.user_id)
                          .where(UserSession.digest == auth.token_digest(token))).one_or_none()
    if row is None:
        return None
    sess, user = row
    if sess.expires_at <= utcnow() or user.disabled:
        return None
    return _principal("user", user, user.role, user.scope)


def effective_key_role(key: ApiKey, user: User) -> tuple[str, dict[str, list[str]] | None]:
    """The role and scope a key acts with today: its own, capped by its user's current role."""
    role = key.role if role_within(key.role, user.role) else user.role
    scope = user.scope if user.role == "policy_editor" else key.scope
    return role, scope


def resolve_api_key(session: Session, token: str) -> Principal | None:
    row = session.execute(select(ApiKey, User).join(User, User.id == ApiKey.user_id)
                          .where(ApiKey.digest == auth.token_digest(token))).one_or_none()
    if row is None:
        return None
    key, user = row
    now = utcnow()
    if (key.revoked_at is not None or (key.expires_at is not None and key.expires_at <= now)
            or user.disabled):
        return None
    if key.last_used_at is None or (now - key.last_used_at).total_seconds() > API_KEY_TOUCH_S:
        key.last_used_at = now
    role, scope = effective_key_role(key, user)
    return _principal("api_key", user, role, scope)


# -- API keys --------------------------------------------------------------------------------

def _may_act_for(actor: Principal, user: User) -> None:
    if actor.kind in USER_KINDS and actor.id == user.id:
        return
    _require_manage(actor, user.role)


def get_api_key(session: Session, *, key_id: int, user_id: int | None = None) -> ApiKey:
    key = session.get(ApiKey, key_id)
    if key is None or (user_id is not None and key.user_id != user_id):
        raise NotFound(f"API key {key_id} not found")
    return key


def list_api_keys(session: Session, *, user_id: int,
                  include_revoked: bool = True) -> list[ApiKey]:
    q = select(ApiKey).where(ApiKey.user_id == user_id).order_by(ApiKey.id)
    if not include_revoked:
        q = q.where(ApiKey.revoked_at.is_(None))
    return list(session.scalars(q))


def create_api_key(session: Session, *, actor: Principal, user_id: int, name: str,
                   role: str | None = None, scope: dict[str, list[str]] | None = None,
                   expires_at: datetime | None = None) -> tuple[ApiKey, str]:
    """A new key for `user_id` (the actor's own, or any user's with users:write); returns the
    row and the token, which is shown once and never stored."""
    user = get_user(session, user_id=user_id)
    _may_act_for(actor, user)
    if user.disabled:
        raise Conflict(f"user {user.name!r} is disabled")
    if not name.strip() or len(name) > 64:
        raise Invalid("invalid key name", [FieldError("name", "1-64 characters")])
    key_role = check_role(role) if role is not None else user.role
    if not role_within(key_role, user.role):
        raise Invalid("role above the user's", [FieldError(
            "role", f"a key of {user.name!r} may have role {user.role!r} or a lower one")])
    if not permissions_for(key_role) <= actor.permissions:
        raise Forbidden("cannot create a key with more permissions than the caller's")
    if user.role == "policy_editor":
        if scope is not None:
            raise Invalid("scope is the user's", [FieldError(
                "scope", "keys of a policy editor always carry that user's scope")])
        key_scope = None
    else:
        key_scope = check_scope(key_role, scope)
    if key_role == "policy_editor" and not scope_within(
            key_scope if user.role != "policy_editor" else user.scope, actor.scope):
        raise Forbidden("cannot create a key with a wider scope than the caller's")
    now = utcnow()
    if expires_at is not None and expires_at <= now:
        raise Invalid("expiry in the past", [FieldError("expires_at", "must be in the future")])
    token = auth.new_token("api_key")
    key = ApiKey(user_id=user.id, name=name.strip(), digest=auth.token_digest(token),
                 hint=token[:8], role=key_role, scope=key_scope, created_at=now,
                 expires_at=expires_at)
    session.add(key)
    session.flush()
    audit(session, actor=actor, action="api_key.create", target=f"user:{user.name}",
          after=key_image(key))
    return key, token


def revoke_api_key(session: Session, *, actor: Principal, key_id: int,
                   user_id: int | None = None) -> ApiKey:
    """Revoke (idempotent: revoking a revoked key changes and audits nothing)."""
    key = get_api_key(session, key_id=key_id, user_id=user_id)
    user = get_user(session, user_id=key.user_id)
    _may_act_for(actor, user)
    if key.revoked_at is None:
        before = key_image(key)
        key.revoked_at = utcnow()
        session.flush()
        audit(session, actor=actor, action="api_key.revoke", target=f"user:{user.name}",
              before=before, after=key_image(key))
    return key


def users_by_id(session: Session, ids: Iterable[int]) -> dict[int, User]:
    wanted = set(ids)
    if not wanted:
        return {}
    return {u.id: u for u in session.scalars(select(User).where(User.id.in_(wanted)))}
