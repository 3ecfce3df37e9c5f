"""Recording who changed what (audit) and what happened (events), inside the caller's
transaction, so an audited change and its record commit or roll back together."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from bulkhead.server.auth import Principal
from bulkhead.server.models.audit import AuditEntry, Event

SECRET_PARTS = ("password", "token", "secret", "credential", "api_key", "pairing_key",
                "digest", "authorization", "key_hash")


def is_secret_key(key: object) -> bool:
    k = str(key).lower()
    return any(part in k for part in SECRET_PARTS)


def redact(data: Any) -> Any:
    """A copy with secret-looking fields replaced, for audit before/after images."""
    if isinstance(data, dict):
        return {k: ("<redacted>" if is_secret_key(k) else redact(v)) for k, v in data.items()}
    if isinstance(data, list):
        return [redact(v) for v in data]
    return data


def audit(session: Session, *, actor: Principal | str, action: str, target: str = "",
          before: Any = None, after: Any = None, note: str | None = None) -> AuditEntry:
    entry = AuditEntry(actor=actor if isinstance(actor, str) else actor.label, action=action,
                       target=target, before=redact(before), after=redact(after), note=note)
    session.add(entry)
    return entry


def emit(session: Session, *, kind: str, subject: str = "", severity: str = "info",
         data: dict[str, Any] | None = None) -> Event:
    ev = Event(kind=kind, subject=subject, severity=severity, data=redact(data or {}))
    session.add(ev)
    return ev
