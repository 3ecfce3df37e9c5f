"""Who is calling, and what they may do.

A `Principal` is a user (password login → session token, or an API key) or an agent (its
per-agent credential). Tokens are high-entropy random strings shown once and stored as
SHA-256 digests; passwords are stored with Argon2id. Roles map to permissions here, in one
table, so the authorisation matrix test can read it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

ROLES: tuple[str, ...] = ("owner", "admin", "policy_editor", "viewer", "auditor")

READ = ("inventory:read", "policy:read", "traffic:read", "events:read", "agents:read")
PERMISSIONS: dict[str, frozenset[str]] = {
    "owner": frozenset({*READ, "inventory:write", "policy:write", "policy:provision",
                        "agents:write", "users:read", "users:write", "users:owner",
                        "audit:read", "traffic:write"}),
    "admin": frozenset({*READ, "inventory:write", "policy:write", "policy:provision",
                        "agents:write", "users:read", "users:write", "audit:read",
                        "traffic:write"}),
    "policy_editor": frozenset({*READ, "policy:write", "policy:provision"}),
    "viewer": frozenset(READ),
    "auditor": frozenset({*READ, "audit:read", "users:read"}),
}
AGENT_PERMISSIONS = frozenset({"agent"})


@dataclass(frozen=True)
class Principal:
    kind: str  # user | api_key | agent
    id: int
    name: str
    role: str | None = None  # users and API keys
    # policy editors may be limited to rulesets whose scopes lie inside these labels
    scope: dict[str, list[str]] | None = None
    permissions: frozenset[str] = field(default_factory=frozenset)

    def can(self, permission: str) -> bool:
        return permission in self.permissions

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.name}"


def permissions_for(role: str) -> frozenset[str]:
    return PERMISSIONS.get(role, frozenset())


TOKEN_PREFIXES = {"session": "bhs_", "api_key": "bhk_", "agent": "bhg_", "pairing": "bhp_"}


def new_token(kind: str) -> str:
    """`<prefix><43 url-safe chars>`: 256 bits of randomness; the prefix names the kind."""
    return f"{TOKEN_PREFIXES[kind]}{secrets.token_urlsafe(32)}"


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def same_digest(a: str, b: str) -> bool:
    return hmac.compare_digest(a, b)


_hasher = None


def _argon() -> object:
    global _hasher
    if _hasher is None:
        from argon2 import PasswordHasher

        _hasher = PasswordHasher()
    return _hasher


def hash_password(password: str) -> str:
    from argon2 import PasswordHasher

    h = _argon()
    assert isinstance(h, PasswordHasher)
    return h.hash(password)


def verify_password(stored: str, password: str) -> bool:
    from argon2 import PasswordHasher
    from argon2.exceptions import InvalidHashError, VerificationError

    h = _argon()
    assert isinstance(h, PasswordHasher)
    try:
        return h.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False
