"""Domain errors (raised by services, never HTTPException) and their problem-details form.

Every 4xx is `application/problem+json` (RFC 9457) with `type`, `title`, `status`, `detail`
and, for invalid input, `errors: [{path, message}]` naming each field.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FieldError:
    path: str
    message: str


@dataclass
class DomainError(Exception):
    detail: str
    errors: list[FieldError] = field(default_factory=list)
    status: int = 400
    title: str = "Bad request"
    type: str = "about:blank"

    def __str__(self) -> str:
        return self.detail


class Invalid(DomainError):
    def __init__(self, detail: str, errors: list[FieldError] | None = None) -> None:
        super().__init__(detail, errors or [], 422, "Invalid input", "/problems/invalid")


class NotFound(DomainError):
    def __init__(self, detail: str) -> None:
        super().__init__(detail, [], 404, "Not found", "/problems/not-found")


class Conflict(DomainError):
    def __init__(self, detail: str, errors: list[FieldError] | None = None) -> None:
        super().__init__(detail, errors or [], 409, "Conflict", "/problems/conflict")


class Unauthorized(DomainError):
    def __init__(self, detail: str = "authentication required") -> None:
        super().__init__(detail, [], 401, "Unauthorized", "/problems/unauthorized")


class Forbidden(DomainError):
    def __init__(self, detail: str = "not allowed") -> None:
        super().__init__(detail, [], 403, "Forbidden", "/problems/forbidden")


class TooLarge(DomainError):
    def __init__(self, detail: str) -> None:
        super().__init__(detail, [], 413, "Payload too large", "/problems/too-large")
